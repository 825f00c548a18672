"""Small, fast training pieces for upgrades: whole-tensor minibatch SGD with an accuracy curve,
and saving/loading a stand-alone model (backbone spec + weights) with ``modulemesh.checkpoint``.

The continual ``Trainer`` (``modulemesh.training``) trains meshes task by task; an upgrade needs a
fixed step budget, a teacher's cached logits and accuracy measured every few steps, so it uses
``train_steps`` below. Data stay as tensors and batches are sliced by index (no DataLoader).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_module, save_module
from ..errors import CheckpointError, DataError, ModuleMeshError, TrainingError
from ..data.scenarios import as_float

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
        state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
        manifest = {**manifest, "num_outputs": len(manifest.get("classes", []))}
    elif kind != MODEL_KIND:
        raise CheckpointError(f"{path} holds a {kind!r} module; upgrade needs a model or expert saved with its backbone spec")
    missing = [k for k in ("backbone", "input_shape", "classes") if k not in manifest]
    if missing:
        raise CheckpointError(f"the manifest of {path} lacks {missing}; it cannot be rebuilt, re-save it with save_model()")
    manifest.setdefault("num_outputs", len(manifest["classes"]))
    model = build_backbone(manifest["backbone"], manifest["input_shape"], int(manifest["num_outputs"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {path} do not fit the backbone in its manifest: {str(e).splitlines()[0]}") from e
    return model.to(device), manifest


# ----------------------------------------------------------------------------- training


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048,
             device: Optional[torch.device] = None) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (in eval mode) on uint8 or float inputs (x, y)."""
    if x.shape[0] == 0:
        raise DataError("cannot evaluate on an empty set")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        pred = model(as_float(x[i : i + batch_size].to(device))).argmax(-1)
        correct += int((pred == y[i : i + batch_size].to(device)).sum())
    model.train(was_training)
    return correct / x.shape[0]


def make_optimizer(model: nn.Module, optimizer: str, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("nothing to train: every parameter of the model is frozen")
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ModuleMeshError(f"unknown optimizer {optimizer!r}; use sgd or adam")


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices for ``steps`` minibatches (epochs of random permutations), shape (steps, batch)."""
    g = torch.Generator().manual_seed(int(seed))
    need = steps * batch_size
    epochs = -(-need // n)  # ceil
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(epochs)]) if epochs else torch.zeros(0, dtype=torch.long)
    return order[:need].view(steps, batch_size)


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
    """Train ``model`` for ``steps`` minibatch steps; returns the accuracy curve ``[{step, accuracy}]``.

    With ``teacher_logits`` (one row per training example) the loss is ``kd_loss(..., alpha,
    temperature)``, else cross-entropy. The minibatch order depends on ``seed`` only, so runs that
    differ only in their initialization see the same batches. Accuracy on ``eval_data`` is measured
    at step 0, every ``eval_every`` steps and at the end; ``stop_at`` ends training once the
    accuracy reaches it.
    """
    from ..distill.losses import kd_loss

    n = x.shape[0]
    if n == 0 or y.shape[0] != n:
        raise DataError(f"training data must be non-empty with one label per input (got {n} inputs, {y.shape[0]} labels)")
    if teacher_logits is not None and teacher_logits.shape[0] != n:
        raise DataError(f"teacher_logits has {teacher_logits.shape[0]} rows for {n} training inputs; compute them on the same data")
    if steps < 0 or batch_size < 1:
        raise ModuleMeshError(f"steps must be >= 0 and batch_size >= 1 (got {steps}, {batch_size})")
    device = next(model.parameters()).device
    opt = make_optimizer(model, optimizer, lr, momentum, weight_decay) if steps else None
    order = batch_order(n, steps, min(batch_size, n), seed)
    curve: list[dict[str, float]] = []

    def measure(step: int) -> bool:
        if eval_data is None:
            return False
        acc = evaluate(model, *eval_data)
        curve.append({"step": step, "accuracy": acc})
        return stop_at is not None and acc >= stop_at

    if measure(0):
        return curve
    model.train()
    for step in range(1, steps + 1):
        idx = order[step - 1]
        xb = as_float(x[idx].to(device))
        yb = y[idx].to(device)
        logits = model(xb)
        if teacher_logits is not None:
            loss = kd_loss(logits, teacher_logits[idx].to(device), yb, alpha=alpha, T=temperature)
        else:
            loss = F.cross_entropy(logits, yb)
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {float(loss)} at step {step}; lower the learning rate or check the data for NaN/inf")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step)
        if (eval_every and step % eval_every == 0) or step == steps:
            if measure(step):
                break
    model.eval()
    return curve


def steps_to_reach(curve: Sequence[Mapping[str, float]], threshold: float) -> Optional[int]:
    """First measured step whose accuracy is >= threshold, or None if the curve never gets there."""
    for point in curve:
        if point["accuracy"] >= threshold:
            return int(point["step"])
    return None


__all__ = ["save_model", "load_model", "evaluate", "train_steps", "steps_to_reach", "batch_order", "make_optimizer"]
