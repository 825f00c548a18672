"""Small builders several test files share (pytest puts this folder on sys.path)."""

from __future__ import annotations

import json
from contextlib import contextmanager

import torch
from sklearn.datasets import load_digits

from modulemesh.cli import main
from modulemesh.federated.config import FederationConfig


def digits_fed_data(digits, k=5, alpha=1.0, proxy=300, seed=0, partition="dirichlet"):
    """Digits split over k clients (rows 0..1399 private, the rest test), a 300-image proxy set by default."""
    from modulemesh.federated import sim

    x, y = digits
    return sim.make_fed_data(x[:1400], y[:1400], x[1400:], y[1400:], k, partition, alpha, proxy, seed=seed, min_size=10)


def digits_tensors():
    """scikit-learn's 8x8 digits as float pixels in [0, 1] and integer labels."""
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def small_federation(**kw):
    """A small federation on digits (5 clients, 2 rounds, MLP 32); keyword arguments override its fields."""
    base = dict(
        clients=5,
        rounds=2,
        lr=0.2,
        local_epochs=5,
        backbone={"type": "mlp", "hidden": [32]},
        distill={"proxy_size": 300, "student_epochs": 4, "student_lr": 0.2},
    )
    return FederationConfig(**{**base, **kw})


def fd_config(**distill):
    """A small logit-FD federation on digits (5 clients, 2 rounds); keyword arguments override distill.*."""
    return small_federation(
        mode="distill", distill={"proxy_size": 300, "student_epochs": 4, "student_lr": 0.2, **distill}
    )


# `modulemesh run` of a density-routed mesh of small MLP experts on Split-Digits (seconds)
DIGITS_MESH_RUN = [
    "run",
    "--quiet",
    "--set",
    "data.name=digits",
    "--set",
    "strategy.name=modulemesh",
    "--set",
    "train.batch_size=16",
    "--set",
    "train.epochs=3",
    "--set",
    "router.type=density",
    "--set",
    "router.components=5",
    "--set",
    "expert.backbone={type: mlp, hidden: [32]}",
]


def run_digits_mesh(tmp_path, name, *extra):
    """Runs DIGITS_MESH_RUN plus ``extra`` into tmp_path/name and returns its metrics.json."""
    assert main([*DIGITS_MESH_RUN, *extra, "--out", str(tmp_path / name)]) == 0
    return json.loads((tmp_path / name / "metrics.json").read_text())


def digits_mesh_full_and_resumed(tmp_path, *extra):
    """Metrics of a DIGITS_MESH_RUN + ``extra`` run straight through ('full') and of one stopped after its 2nd task
    checkpoint and run again ('resumed'), in that order."""
    full = run_digits_mesh(tmp_path, "full", *extra)
    with interrupted_at_checkpoint(2):
        assert main([*DIGITS_MESH_RUN, *extra, "--out", str(tmp_path / "resumed")]) == 130
    return full, run_digits_mesh(tmp_path, "resumed", *extra)


def save_small_mesh(where):
    """A saved two-expert density-routed mesh on 6 features (classes 0-1 and 2-3), frozen; returns its folder."""
    from modulemesh.mesh import DensityRouter, Expert, ModuleMesh

    torch.manual_seed(0)
    mesh = ModuleMesh(4, (6,), DensityRouter(components=2))
    for i, classes in enumerate(([0, 1], [2, 3])):
        mesh.add_expert(Expert(f"e{i}", classes, {"type": "mlp", "hidden": [8]}, (6,))).freeze()
        mesh.router.fit_expert(i, torch.randn(40, 6) + 3 * i, torch.tensor(classes).repeat(20))
    mesh.save(where / "mesh")
    return where / "mesh"


@contextmanager
def interrupted_at_checkpoint(n: int = 2):
    """Inside, a run stops with KeyboardInterrupt (as Ctrl-C would) right after writing its n-th task checkpoint."""
    import modulemesh.runner as runner

    original, calls = runner._checkpoint, [0]

    def crash(*a, **k):
        original(*a, **k)
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt

    runner._checkpoint = crash
    try:
        yield
    finally:
        runner._checkpoint = original
