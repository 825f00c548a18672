"""The one optimizer factory (continual Trainer, upgrades, m2mKD) and the learning-rate schedules.

``make_optimizer`` builds SGD, Adam or AdamW over the trainable parameters it is given; AdamW puts
biases and norm scales (parameters with fewer than two dimensions) in a group without weight
decay, the usual ViT recipe. ``OptimizerSpec`` carries everything ``fit`` needs to build its
optimizer and schedule, so callers pass one object instead of five numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch import nn

from ..errors import ModuleMeshError, TrainingError

OptimizerName = Literal["sgd", "adam", "adamw"]
Schedule = Literal["constant", "warmup_cosine"]


@dataclass(frozen=True)
class OptimizerSpec:
    """Optimizer + schedule for ``fit``: ``warmup`` is a fraction of the steps (``warmup_cosine`` only)."""

    name: OptimizerName = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: Schedule = "constant"
    warmup: float = 0.0
    grad_clip: float = 0.0  # max global gradient norm; 0 = no clipping


def make_optimizer(
    params: Iterable[nn.Parameter],
    name: str = "sgd",
    lr: float = 0.05,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    what: str = "the model",
) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW over the parameters of ``params`` that require gradients.

    ``what`` names the thing being trained in the error raised when every parameter is frozen.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise TrainingError(f"nothing to train: every parameter of {what} is frozen")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
        )
    raise ModuleMeshError(f"unknown optimizer {name!r}; use sgd, adam or adamw")


def warmup_cosine(steps: int, warmup: float):
    """Learning-rate factor of step s (from 0): linear warm-up over ``warmup * steps`` steps, then cosine decay to 0."""
    warm = int(round(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, spec: OptimizerSpec, steps: int):
    """The schedule of ``spec`` over ``steps`` steps, or None for a constant learning rate."""
    if spec.schedule == "constant":
        return None
    if spec.schedule == "warmup_cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, spec.warmup))
    raise ModuleMeshError(f"unknown schedule {spec.schedule!r}; use constant or warmup_cosine")


def build(params: Iterable[nn.Parameter], spec: OptimizerSpec, steps: int, what: str = "the model"):
    """(optimizer, scheduler or None) for ``steps`` steps of ``spec``."""
    opt = make_optimizer(params, spec.name, spec.lr, spec.momentum, spec.weight_decay, what)
    return opt, make_scheduler(opt, spec, steps)


__all__ = ["OptimizerSpec", "make_optimizer", "make_scheduler", "warmup_cosine", "build"]
