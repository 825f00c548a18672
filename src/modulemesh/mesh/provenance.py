"""Where an expert came from, written into its manifest so a pulled module can be judged alone.

``metadata["provenance"]`` holds the library version, the training config and its sha256, the
parent expert (the one it was initialized from, if any) and one entry per task it was trained on:
task id and name, classes, the sha256 of the training tensors (data fingerprint) and the accuracy
on that task's test set when the task ended. No timestamps: the same config and seed give the
same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import __version__
from .expert import Expert
from .integrity import canonical


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    """sha256 over dtype, shape and bytes of each tensor (order matters)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def config_sha256(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(dict(config))).hexdigest()


def stamp(expert: Expert, task, config: Mapping[str, Any], accuracy: float, parent: Expert | None = None) -> None:
    """Record that ``expert`` was (further) trained on ``task`` under ``config``."""
    prov = dict(expert.metadata.get("provenance") or {})
    prov["library_version"] = __version__
    prov["config_sha256"] = config_sha256(config)
    prov["config"] = dict(config)
    if parent is not None and "parent" not in prov:
        first = (parent.metadata.get("provenance") or {}).get("tasks") or [{}]
        prov["parent"] = {"name": parent.name, "version": parent.version, "data_sha256": first[0].get("data_sha256")}
    prov.setdefault("parent", None)
    tasks = [t for t in prov.get("tasks", []) if t.get("task") != task.id]
    tasks.append(
        {
            "task": int(task.id),
            "name": task.name,
            "classes": [int(c) for c in task.classes],
            "data_sha256": tensor_fingerprint(task.x_train, task.y_train),
            "train_examples": task.num_train,
            "test_accuracy": round(float(accuracy), 4),
        }
    )
    prov["tasks"] = tasks
    expert.metadata["provenance"] = prov


def stamp_trained(mesh, task, config: Mapping[str, Any], accuracy: float) -> None:
    """Stamp every expert of ``mesh`` that was trainable during ``task`` (the ones it changed)."""
    by_name = {e.name: e for e in mesh.experts}
    for expert in mesh.experts:
        if any(p.requires_grad for p in expert.parameters()):
            stamp(expert, task, config, accuracy, by_name.get(expert.metadata.get("initialized_from")))


def standalone_provenance(
    *,
    data_name: str,
    classes: Sequence[int],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    config: Mapping[str, Any],
    accuracy: float,
    parent: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Provenance of a model trained in one go on a whole data set (``upgrade``, ``m2mkd``): the same
    fields ``stamp`` writes, with the data set as the one task, so hub listings read alike."""
    config = json.loads(json.dumps(dict(config), default=str))  # plain JSON, so it hashes and seals
    return {
        "library_version": __version__,
        "config_sha256": config_sha256(config),
        "config": config,
        "parent": dict(parent) if parent is not None else None,
        "tasks": [
            {
                "task": 0,
                "name": data_name,
                "classes": [int(c) for c in classes],
                "data_sha256": tensor_fingerprint(x_train, y_train),
                "train_examples": int(x_train.shape[0]),
                "test_accuracy": round(float(accuracy), 4),
            }
        ],
    }


def parent_record(manifest: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Who a model was derived from: its name, weights sha256, manifest seal (experts) and data fingerprint."""
    prov = (manifest.get("metadata") or {}).get("provenance") or {}
    first = (prov.get("tasks") or [{}])[0]
    return {
        "name": str(manifest.get("name") or name),
        "version": manifest.get("version"),
        "sha256": manifest.get("sha256"),
        "seal": manifest.get("seal"),
        "backbone": manifest.get("backbone"),
        "data_sha256": first.get("data_sha256"),
    }
