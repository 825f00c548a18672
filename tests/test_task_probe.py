"""The task probe: a logistic regression from every expert's outputs to the expert that owns an input."""

import json

import pytest
import torch

from helpers import run_digits_mesh
from modulemesh.errors import ModuleMeshError
from modulemesh.mesh import DensityRouter, Expert, ModuleMesh
from modulemesh.mesh.task_evidence import fit_task_probe, probe_inputs, task_probe_log_prob


def toy_logits(n: int, seed: int):
    """Three 2-class experts; the owner of a row is told only by how the experts' logits combine (each expert is
    confident on its own rows, and expert 2 also on expert 1's rows, but with the opposite class margin)."""
    g = torch.Generator().manual_seed(seed)
    owner = torch.randint(0, 3, (n,), generator=g)
    logits = []
    for e in range(3):
        z = torch.randn(n, 2, generator=g)
        z[:, 0] += 4.0 * (owner == e)
        logits.append(z)
    logits[2][:, 1] += 5.0 * (owner == 1)  # expert 2 is as 'sure' on expert 1's rows, on its other class
    return logits, owner


def test_probe_recovers_the_owner_where_no_single_expert_does():
    logits, owner = toy_logits(600, 0)
    probe = fit_task_probe(probe_inputs(logits), owner, 3)
    test_logits, test_owner = toy_logits(600, 1)
    acc = float((task_probe_log_prob(probe, test_logits).argmax(1) == test_owner).float().mean())
    # The largest 'mine' logit (logsumexp) confuses experts 1 and 2: the probe must beat it by a wide margin.
    lse = torch.stack([torch.logsumexp(z, 1) for z in test_logits], 1).argmax(1)
    base = float((lse == test_owner).float().mean())
    assert acc > 0.95 and acc > base + 0.2
    # The same rows give the same probe, bit for bit.
    again = fit_task_probe(probe_inputs(logits), owner, 3)
    assert all(torch.equal(probe[k], again[k]) for k in probe)


def test_probe_weights_every_owner_equally():
    # Expert 0 owns 95% of the rows; unweighted, a regularized probe would lean on the prior and miss expert 1.
    logits, owner = toy_logits(2000, 2)
    keep = (owner == 0) | ((owner == 1) & (torch.arange(2000) % 20 == 0))
    probe = fit_task_probe(probe_inputs([z[keep] for z in logits]), owner[keep], 3)
    test_logits, test_owner = toy_logits(600, 3)
    hit = task_probe_log_prob(probe, test_logits).argmax(1) == test_owner
    assert float(hit[test_owner == 1].float().mean()) > 0.9
    # A probe for 3 experts reads nothing for 2: it is ignored, not misapplied.
    assert task_probe_log_prob(probe, test_logits[:2]) is None
    with pytest.raises(ModuleMeshError, match="owners"):
        fit_task_probe(probe_inputs(logits), owner[:5], 3)


def twin_mesh(probe_weight: float) -> ModuleMesh:
    """Two experts whose input densities are the same, so the densities alone cannot route."""
    torch.manual_seed(0)
    mesh = ModuleMesh(4, (6,), DensityRouter(components=2, probe_weight=probe_weight))
    x = torch.randn(200, 6)
    for i, classes in enumerate(([0, 1], [2, 3])):
        mesh.add_expert(Expert(f"e{i}", classes, {"type": "mlp", "hidden": [8]}, (6,))).freeze()
    for i, classes in enumerate(([0, 1], [2, 3])):
        mesh.router.fit_expert(i, x, torch.tensor(classes).repeat(100))
    # Expert i is sure on rows whose feature 0 has sign (-1)^i: the owner is in the experts' outputs only.
    for i, e in enumerate(mesh.experts):
        with torch.no_grad():
            e.net[-1].weight.zero_()
            e.net[-1].bias.zero_()
            e.net[1].weight.zero_()
            e.net[1].weight[0, 0] = 1.0 if i == 0 else -1.0
            e.net[-1].weight[0, 0] = 8.0
    return mesh.eval()


def test_router_adds_the_probe_to_the_densities_and_keeps_it_through_save_and_load(tmp_path):
    mesh = twin_mesh(probe_weight=5.0)
    x = torch.randn(400, 6)
    owner = (x[:, 0] < 0).long()
    with torch.no_grad():
        before = (mesh(x).weights.argmax(1) == owner).float().mean()
        mesh.router.fit_probe([e(x) for e in mesh.experts], owner)
        after = (mesh(x).weights.argmax(1) == owner).float().mean()
    assert before < 0.65 and after > 0.95
    mesh.save(tmp_path / "mesh")
    assert "probe_weight" in json.loads((tmp_path / "mesh" / "mesh.json").read_text())["router"]
    loaded = ModuleMesh.load(tmp_path / "mesh").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x).weights, mesh(x).weights)
    # A new expert makes the probe stale: it is dropped (and refit at the next task's end).
    loaded.add_expert(Expert("e2", [0, 1], {"type": "mlp", "hidden": [8]}, (6,)))
    assert loaded.router.probe is None


def test_a_run_fits_the_probe_on_its_buffer(tmp_path):
    common = ["--set", "strategy.buffer_size=200", "--set", "strategy.reject_weight=1.0"]
    off = run_digits_mesh(tmp_path, "off", *common)
    # A weight this large lets the probe alone route (its log-probabilities outweigh the densities' gaps).
    on = run_digits_mesh(tmp_path, "on", *common, "--set", "router.probe_weight=1000")
    mesh = ModuleMesh.load(tmp_path / "on" / "mesh")
    n = len(mesh.experts)
    assert mesh.router.probe["weight"].shape == (n, sum(len(e.classes) + 1 for e in mesh.experts))
    # The same experts (the probe does not change training); a probe fit on 200 stored rows routes the test
    # inputs of all tasks (chance: 1 in n); a probe fit on wrong owners would not.
    assert on["within_expert_accuracy"] == off["within_expert_accuracy"]
    assert on["task_id_accuracy"] > 70.0
    assert on["router_state_bytes"] > off["router_state_bytes"]


def test_an_interrupted_run_with_the_probe_resumes_to_the_same_numbers(tmp_path):
    from helpers import digits_mesh_full_and_resumed

    # The probe after task 3 needs to know which expert served tasks 0-2: the checkpoint carries that map.
    full, resumed = digits_mesh_full_and_resumed(
        tmp_path, "--set", "strategy.buffer_size=200", "--set", "router.probe_weight=20"
    )
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    a = ModuleMesh.load(tmp_path / "full" / "mesh").router.probe
    b = ModuleMesh.load(tmp_path / "resumed" / "mesh").router.probe
    assert all(torch.equal(a[k], b[k]) for k in a)
