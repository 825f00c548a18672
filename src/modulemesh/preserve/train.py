"""Upgrade training: a step budget with an accuracy curve, and saving/loading a stand-alone model
as an ``Expert`` record (the one module format every command writes).

An upgrade needs a fixed step budget, a teacher's cached logits and accuracy measured every few
steps: ``train_steps`` is ``training.fit`` with that loss and an evaluation callback. Data stay as
tensors and batches are sliced by index (no DataLoader).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_module, read_manifest
from ..errors import CheckpointError, DataError, TrainingError
from ..training.evaluate import accuracy_fraction
from ..training.fit import TensorBatches, fit
from ..training.losses import kd_loss
from ..training.optim import OptimizerSpec

# Files written before the one module format (kind "model": safetensors + manifest with a weights
# sha256) are still read, through the same hash check; new files are Expert records.
LEGACY_KIND = "model"


# ----------------------------------------------------------------------------- save / load


def save_model(
    path: str | os.PathLike,
    model: nn.Module,
    backbone: Mapping[str, Any],
    input_shape: Sequence[int],
    classes: Sequence[int],
    class_names: Optional[Sequence[str]] = None,
    *,
    data: Optional[str] = None,
    provenance: Optional[Mapping[str, Any]] = None,
    **extra: Any,
) -> str:
    """Save ``model`` (built by ``build_backbone(backbone, input_shape, len(classes))``) as a sealed,
    frozen ``Expert`` record named after ``path``; ``extra`` goes to ``metadata["upgrade"]``.

    ``Expert.load``, ``compose``, ``merge`` and ``hub publish`` read it like any expert."""
    from ..mesh.expert import Expert

    expert = Expert(
        Path(path).name,
        classes,
        backbone,
        input_shape,
        metadata={
            "data": data,
            "class_names": list(class_names) if class_names is not None else [str(c) for c in classes],
            "upgrade": dict(extra),
            "provenance": dict(provenance) if provenance is not None else None,
        },
    )
    try:
        expert.net.load_state_dict(model.state_dict())
    except RuntimeError as e:  # a model not built from ``backbone``: a caller bug, said plainly
        raise CheckpointError(f"model does not match backbone {dict(backbone)}: {str(e).splitlines()[0]}") from e
    return expert.freeze().save(path)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model: an ``Expert`` record (from ``upgrade``, ``run``, ``compose``...) or a
    model file of an older version; returns (network, a flat view of its manifest).

    Seals and the weights' sha256 are checked; a tampered file is refused. The network is
    trainable (an old model's Fisher needs its gradients), whatever the record says.
    """
    from ..mesh.backbones import build_backbone
    from ..mesh.expert import Expert

    manifest = read_manifest(path)
    kind = manifest.get("kind")
    if kind == "expert":
        expert = Expert.load(path)
        manifest = Expert.read_manifest(path)
        meta = manifest["metadata"]
        view = {
            **(meta.get("upgrade") or {}),
            **{k: meta[k] for k in ("data", "class_names") if k in meta},
            **manifest,
            "num_outputs": len(manifest["classes"]),
        }
        return expert.net.requires_grad_(True).to(device), view
    if kind != LEGACY_KIND:
        raise CheckpointError(
            f"{path} holds a {kind!r} module; upgrade needs an expert (or a model of an older version) "
            "saved with its backbone spec"
        )
    state, manifest = load_module(path, device="cpu")
    missing = [k for k in ("backbone", "input_shape", "classes") if k not in manifest]
    if missing:
        raise CheckpointError(f"the manifest of {path} lacks {missing}; it cannot be rebuilt")
    manifest = {"name": Path(path).name, **manifest, "num_outputs": len(manifest["classes"])}
    model = build_backbone(manifest["backbone"], manifest["input_shape"], int(manifest["num_outputs"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(
            f"weights in {path} do not fit the backbone in its manifest: {str(e).splitlines()[0]}"
        ) from e
    return model.to(device), manifest


# ----------------------------------------------------------------------------- training


def train_steps(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 0.05,
    momentum: float = 0.9,
    optimizer: str = "sgd",
    weight_decay: float = 0.0,
    teacher_logits: Optional[torch.Tensor] = None,
    alpha: float = 0.5,
    temperature: float = 4.0,
    seed: int = 0,
    eval_data: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    eval_every: int = 0,
    stop_at: Optional[float] = None,
    on_step: Optional[Callable[[int], None]] = None,
) -> list[dict[str, float]]:
    """Train ``model`` for ``steps`` minibatch steps (``training.fit``); returns the accuracy curve
    ``[{step, accuracy}]``.

    With ``teacher_logits`` (one row per training example) the loss is ``kd_loss(..., alpha,
    temperature)``, else cross-entropy. The minibatch order depends on ``seed`` only, so runs that
    differ only in their initialization see the same batches. Accuracy (a fraction) on ``eval_data``
    is measured at step 0, every ``eval_every`` steps and at the end; ``stop_at`` ends training once
    the accuracy reaches it.
    """
    n = x.shape[0]
    if teacher_logits is not None and teacher_logits.shape[0] != n:
        raise DataError(
            f"teacher_logits has {teacher_logits.shape[0]} rows for {n} training inputs; compute them on the same data"
        )
    device = next(model.parameters()).device
    batches = TensorBatches(x, y, steps, batch_size, seed, device)
    spec = OptimizerSpec(optimizer, lr, momentum, weight_decay)
    curve: list[dict[str, float]] = []

    def measure(step: int) -> bool:
        if eval_data is None:
            return False
        acc = accuracy_fraction(model, *eval_data)
        curve.append({"step": step, "accuracy": acc})
        return stop_at is not None and acc >= stop_at

    def loss_fn(xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        logits = model(xb)
        if teacher_logits is not None:
            return kd_loss(logits, teacher_logits[idx].to(device), yb, alpha=alpha, T=temperature)
        return F.cross_entropy(logits, yb)

    def after_step(step: int, loss: torch.Tensor) -> bool:
        if on_step is not None:
            on_step(step)
        return bool(((eval_every and step % eval_every == 0) or step == steps) and measure(step))

    if steps and not any(p.requires_grad for p in model.parameters()):
        raise TrainingError("nothing to train: every parameter of the model is frozen")
    if measure(0):
        return curve
    fit(model, loss_fn, batches, steps=steps, optimizer=spec, modules=[model], on_step=after_step)
    model.eval()
    return curve


def steps_to_reach(curve: Sequence[Mapping[str, float]], threshold: float) -> Optional[int]:
    """First measured step whose accuracy is >= threshold, or None if the curve never gets there."""
    for point in curve:
        if point["accuracy"] >= threshold:
            return int(point["step"])
    return None


__all__ = ["save_model", "load_model", "train_steps", "steps_to_reach"]
