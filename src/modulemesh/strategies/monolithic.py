"""Shared pieces of the classic continual-learning baselines (EWC, SI, LwF, iCaRL, ER, DER, DER++).

Every baseline trains one monolithic expert over the global label space, as ``finetune`` does
(``mesh.experts[0]``). The mesh's forward pass already runs that expert; a forward hook keeps its
raw logits (``self.logits``) so logit-based losses (DER's MSE, distillation) cost no second
forward pass. Helpers here: the quadratic penalty of EWC and SI, a snapshot of the network, the
classes seen before the current task (the replay plumbing is ``replay.ReplayMixin``).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from .finetune import Finetune


def quadratic_penalty(
    net: torch.nn.Module, importance: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], strength: float
) -> torch.Tensor:
    """``strength * sum_k importance_k (theta_k - anchor_k)^2`` (EWC's and SI's penalty), as a value."""
    total = torch.zeros((), device=next(net.parameters()).device)
    for k, p in net.named_parameters():
        if k in importance:
            total = total + (importance[k] * (p - anchor[k]).pow(2)).sum()
    return strength * total


@torch.no_grad()
def add_quadratic_penalty_grad(
    net: torch.nn.Module, importance: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], strength: float
) -> None:
    """Add the exact gradient of :func:`quadratic_penalty`, ``2 * strength * importance * (theta - anchor)``,
    to each parameter's ``.grad``. Done after backward with fused foreach ops instead of inside the
    loss: in the autograd graph the penalty doubled the cost of a batch-10 step of the MLP."""
    named = [(k, p) for k, p in net.named_parameters() if k in importance and p.grad is not None]
    if not named:
        return
    diffs = torch._foreach_sub([p.detach() for _, p in named], [anchor[k] for k, _ in named])
    torch._foreach_mul_(diffs, [importance[k] for k, _ in named])
    torch._foreach_add_([p.grad for _, p in named], diffs, alpha=2.0 * strength)


class ReplayParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    minibatch_size: Optional[int] = Field(None, ge=1, description="replay rows per step; default: train.batch_size")


class Monolithic(Finetune):
    """One expert over all classes plus a logit-capturing hook. Subclasses add the protection."""

    name = "monolithic"

    def __init__(self, cfg, scenario, params=None):
        super().__init__(cfg, scenario, params)
        self.logits: Optional[torch.Tensor] = None
        self._hook = None
        self._hooked = None

    # --------------------------------------------------------------- model access
    @staticmethod
    def expert(mesh):
        return mesh.experts[0]

    def _capture(self, module, inputs, output) -> None:
        if module is self._hooked:
            self.logits = output

    def before_task(self, ctx) -> None:
        expert = self.expert(ctx.mesh)
        if self._hooked is not expert:  # a resumed run loads a fresh mesh: hook its expert
            if self._hook is not None:
                self._hook.remove()
            self._hook, self._hooked = expert.register_forward_hook(self._capture), expert

    def trainable_parameters(self, ctx):
        return list(self.expert(ctx.mesh).parameters())

    def snapshot(self, mesh) -> torch.nn.Module:
        """A frozen copy of the current network (``expert.net``: no hooks travel with it)."""
        net = copy.deepcopy(self.expert(mesh).net).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    def old_classes(self, task) -> list[int]:
        """Classes of the tasks before ``task`` (all classes in domain-IL, where every task has them)."""
        seen = sorted({c for t in self.scenario.tasks[: task.id] for c in t.classes})
        return seen

    # --------------------------------------------------------------- losses
    def current_nll(self, ctx) -> torch.Tensor:
        n = ctx.n_current
        return F.nll_loss(ctx.out.log_probs[:n], ctx.y[:n])
