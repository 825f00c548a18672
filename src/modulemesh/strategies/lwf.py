"""Learning without Forgetting (Li & Hoiem 2016), single-head version for class-IL.

At the start of task t > 0 the network is frozen into an "old model". Training on the new data
adds ``alpha * KL(softmax(z_old / T) || softmax(z / T))`` restricted to the classes of earlier
tasks, computed on the current task's inputs only (no stored data). The distillation term is zero
when the network equals the old model. As in Mammoth the term is not multiplied by T^2.

Defaults: Mammoth ``utils/best_args.py``, seq-mnist, ``lwf``: alpha=1, softmax_temp=2.0
(T=2 is also the paper's value); Mammoth also used lr=0.03 and weight decay 5e-4
(``train.weight_decay``).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..training.losses import kl_divergence
from .monolithic import Monolithic


class LwFParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(1.0, ge=0, description="weight of the distillation term")
    T: float = Field(2.0, gt=0, description="distillation temperature")


class LwF(Monolithic):
    name = "lwf"
    Params = LwFParams

    def __init__(self, cfg, scenario, params=None):
        super().__init__(cfg, scenario, params)
        self.old = None
        self.old_idx = None

    def before_task(self, ctx) -> None:
        super().before_task(ctx)
        old = self.old_classes(ctx.task)
        self.old = self.snapshot(ctx.mesh) if old else None
        self.old_idx = torch.tensor(old, dtype=torch.long, device=ctx.device) if old else None

    def distill(self, ctx) -> torch.Tensor:
        if self.old is None:
            return torch.zeros((), device=ctx.device)
        with torch.no_grad():
            old_logits = self.old(ctx.x)[:, self.old_idx]
        return kl_divergence(self.logits[:, self.old_idx], old_logits, self.params.T)

    def loss(self, ctx) -> torch.Tensor:
        return super().loss(ctx) + self.params.alpha * self.distill(ctx)

    def after_task(self, ctx) -> None:
        self.old = None  # the old model is rebuilt from the mesh at the next task (also after a resume)
