"""Upgrade training: a step budget with an accuracy curve, and saving/loading a stand-alone model
(backbone spec + weights) with ``modulemesh.checkpoint``.

An upgrade needs a fixed step budget, a teacher's cached logits and accuracy measured every few
steps: ``train_steps`` is ``training.fit`` with that loss and an evaluation callback. Data stay as
tensors and batches are sliced by index (no DataLoader).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_module, save_module
from ..errors import CheckpointError, DataError, TrainingError
from ..training.evaluate import accuracy_fraction
from ..training.fit import TensorBatches, fit
from ..training.losses import kd_loss
from ..training.optim import OptimizerSpec

MODEL_KIND = "model"


# ----------------------------------------------------------------------------- save / load


def save_model(
    path: str | os.PathLike,
    model: nn.Module,
    backbone: Mapping[str, Any],
    input_shape: Sequence[int],
    classes: Sequence[int],
    class_names: Optional[Sequence[str]] = None,
    **extra: Any,
) -> str:
    """Save ``model`` (built by ``build_backbone(backbone, input_shape, len(classes))``) as a module."""
    manifest = {
        "kind": MODEL_KIND,
        "backbone": dict(backbone),
        "input_shape": [int(s) for s in input_shape],
        "num_outputs": len(classes),
        "classes": [int(c) for c in classes],
        "class_names": list(class_names) if class_names is not None else [str(c) for c in classes],
        **extra,
    }
    return str(save_module(path, model.state_dict(), manifest))


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model (``kind: model``, or an ``Expert``'s backbone) from its manifest + weights.

    The weights' sha256 is checked against the manifest; a tampered file is refused.
    """
    from ..mesh.backbones import build_backbone

    state, manifest = load_module(path, device="cpu")
    kind = manifest.get("kind")
    if kind == "expert":
        state = {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}
        manifest = {**manifest, "num_outputs": len(manifest.get("classes", []))}
    elif kind != MODEL_KIND:
        raise CheckpointError(
            f"{path} holds a {kind!r} module; upgrade needs a model or expert saved with its backbone spec"
        )
    missing = [k for k in ("backbone", "input_shape", "classes") if k not in manifest]
    if missing:
        raise CheckpointError(
            f"the manifest of {path} lacks {missing}; it cannot be rebuilt, re-save it with save_model()"
        )
    manifest.setdefault("num_outputs", len(manifest["classes"]))
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
