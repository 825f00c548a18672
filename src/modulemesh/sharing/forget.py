"""``forget``: exact unlearning by removal. An expert is trained only on its own task's data, and
its router state (e.g. its input density) is fit only on that data too; removing both leaves a mesh
in which nothing was computed from that data: the mesh a retraining without it would give, up to
the randomness of training the other experts (which removal does not even touch).

``evaluate_forgetting`` measures it: forget-set and retain-set accuracy, and the calibrated
membership attack's AUC on the forget set (members: the forgotten tasks' training examples,
non-members: their test examples), for the mesh before, after, and a mesh retrained from scratch
without the forgotten tasks, with the time of each.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import ModuleMeshError
from ..mesh import Expert, ModuleMesh
from ..privacy import calibrated_scores, log_confidence, membership_auc, reference_confidences, train_reference_models
from ..training.fit import fit
from ..training.optim import OptimizerSpec
from .output import accuracy


def experts_to_remove(
    mesh: ModuleMesh, classes: Optional[Sequence[int]] = None, expert: Optional[str] = None
) -> list[str]:
    """Names of the experts to remove: the one named, or every expert covering any of ``classes``."""
    if (classes is None) == (expert is None):
        raise ModuleMeshError("give exactly one of --classes C,... or --expert NAME")
    if expert is not None:
        mesh.pool.get(expert)  # unknown name -> one line listing the known ones
        names = [expert]
    else:
        missing = sorted(set(classes) - mesh.covered_classes())
        if missing:
            raise ModuleMeshError(
                f"classes {missing} are not covered by any expert of this mesh (it covers "
                f"{sorted(mesh.covered_classes())}); nothing to forget for them"
            )
        names = [e.name for e in mesh.experts if set(e.classes) & set(classes)]
    if len(names) == len(mesh.experts):
        raise ModuleMeshError(f"forgetting that removes every expert ({', '.join(names)}); nothing would be left")
    return names


def remove(mesh: ModuleMesh, names: Sequence[str]) -> list[int]:
    """Remove the experts and their router state in place; returns the classes no longer covered."""
    before = mesh.covered_classes()
    for name in names:
        mesh.remove_expert(name)
    return sorted(before - mesh.covered_classes())


TRAINING_SECTIONS = ("data", "scenario", "expert", "router", "strategy", "train")


def read_training_config(path, mesh: ModuleMesh):
    """The config to retrain with: a run's config.yaml (its ``start`` record dropped) or any config
    file, refused when it trains differently from the experts' recorded configs (seeds may differ)."""
    from ..config import ExperimentConfig, read_yaml, validate

    data = read_yaml(path)
    data.pop("start", None)
    cfg = validate(ExperimentConfig, data, source=str(path))
    mine = cfg.model_dump(mode="json")
    for expert in mesh.experts:
        theirs = (expert.metadata.get("provenance") or {}).get("config")
        if isinstance(theirs, dict):
            differ = [k for k in TRAINING_SECTIONS if theirs.get(k) != mine.get(k)]
            if differ:
                raise ModuleMeshError(
                    f"{path} trains differently from expert {expert.name!r} (sections {', '.join(differ)} "
                    "differ from its provenance); pass the config the mesh was trained with"
                )
    return cfg


def _reference_trainer(backbone: dict[str, Any], input_shape, num_classes: int, epochs: int):
    """Reference models for the attack: the experts' architecture over every class, trained alone."""

    def train(x: torch.Tensor, y: torch.Tensor, seed: int):
        torch.manual_seed(seed)
        net = Expert("reference", list(range(num_classes)), backbone, input_shape)
        steps = epochs * math.ceil(len(y) / 32)
        fit(
            net,
            lambda xb, yb, idx: F.cross_entropy(net(xb), yb),
            (x, y),
            steps=steps,
            optimizer=OptimizerSpec(name="adam", lr=1e-3),
            batch_size=32,
            seed=seed,
            what="a reference model",
        )
        return net.eval()

    return train


def evaluate_forgetting(
    meshes: dict[str, ModuleMesh],
    scenario,
    forgotten: Sequence[int],
    backbone: dict[str, Any],
    references: int = 4,
    max_examples: int = 2000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Forget/retain accuracy and forget-set membership AUC of each mesh in ``meshes``."""
    lost = torch.tensor(sorted(forgotten))

    def rows(x, y, keep):
        m = torch.isin(y, lost) if keep else ~torch.isin(y, lost)
        return x[m], y[m]

    x_test = torch.cat([t.x_test for t in scenario])
    y_test = torch.cat([t.y_test for t in scenario])
    forget_test, retain_test = rows(x_test, y_test, True), rows(x_test, y_test, False)
    members = rows(torch.cat([t.x_train for t in scenario]), torch.cat([t.y_train for t in scenario]), True)
    g = torch.Generator().manual_seed(seed)
    n = min(len(members[1]), len(forget_test[1]), max_examples)
    mi, ni = torch.randperm(len(members[1]), generator=g)[:n], torch.randperm(len(forget_test[1]), generator=g)[:n]
    px = torch.cat([members[0][mi], forget_test[0][ni]])
    py = torch.cat([members[1][mi], forget_test[1][ni]])
    # Reference models see only validation rows: never members, never the non-members under test.
    vx, vy = torch.cat([t.x_val for t in scenario]), torch.cat([t.y_val for t in scenario])
    train = _reference_trainer(
        backbone, scenario.input_shape, scenario.num_classes, epochs=max(1, math.ceil(2000 / max(len(vy), 1)))
    )
    refs = train_reference_models(train, vx, vy, k=references, size=max(2, len(vy) // 2), seed=seed)
    ref_phi = reference_confidences(refs, px, py)
    out = {}
    for label, mesh in meshes.items():
        mesh.eval()
        scores = calibrated_scores(log_confidence(lambda x, m=mesh: m(x).log_probs, px, py), ref_phi)
        out[label] = {
            "forget_accuracy": accuracy(mesh.predict, *forget_test),
            "retain_accuracy": accuracy(mesh.predict, *retain_test),
            "forget_mia_auc": membership_auc(scores[:n], scores[n:]),
        }
    out["attack"] = {
        "members": n,
        "non_members": n,
        "reference_models": references,
        "reference_examples": max(2, len(vy) // 2),
    }
    return out


def retrain_without(cfg, forgotten: Sequence[int], scenario) -> tuple[ModuleMesh, float]:
    """Train the same config from scratch on the tasks that hold none of the forgotten classes; (mesh, seconds)."""
    from ..runner import run_experiment

    kept = [t.id for t in scenario if not set(t.classes) & set(forgotten)]
    if not kept:
        raise ModuleMeshError("every task of the config holds a forgotten class; there is nothing to retrain on")
    with tempfile.TemporaryDirectory(prefix="modulemesh-retrain-") as tmp:
        start = time.perf_counter()
        run_experiment(cfg, Path(tmp) / "run", tasks=kept)
        seconds = time.perf_counter() - start
        return ModuleMesh.load(Path(tmp) / "run" / "mesh"), seconds
