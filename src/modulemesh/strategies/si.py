"""Synaptic Intelligence (Zenke, Poole & Ganguli 2017).

Each parameter's contribution to the decrease of the loss is integrated along the training path:
after every optimizer step ``w_k += -g_k * (theta_k(after) - theta_k(before))`` with ``g`` the
gradient the optimizer used (exact for any optimizer, not only plain SGD). At the end of a task
the importance grows by ``Omega_k += max(w_k, 0) / (Delta_k^2 + xi)``, ``Delta`` being the
parameter's total change over the task; ``w`` is clipped at 0 so a parameter that the noisy path
moved against the loss is not counted as important (Omega stays non-negative). Later tasks add
``c * sum_k Omega_k (theta_k - theta*_k)^2`` with ``theta*`` the parameters at the task's start.

Defaults: Mammoth ``utils/best_args.py``, seq-mnist, ``si``: c=1.0, xi=0.9 (Mammoth used lr=0.1).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from .monolithic import Monolithic, add_quadratic_penalty_grad, quadratic_penalty


class SIParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    c: float = Field(1.0, ge=0, description="penalty strength")
    xi: float = Field(0.9, gt=0, description="damping of the importance normalization")


class SI(Monolithic):
    name = "si"
    Params = SIParams

    def __init__(self, cfg, scenario, params=None):
        super().__init__(cfg, scenario, params)
        self.omega: dict[str, torch.Tensor] = {}
        self.start: dict[str, torch.Tensor] = {}
        self.w: dict[str, torch.Tensor] = {}
        self._grad: dict[str, torch.Tensor] = {}
        self._before: dict[str, torch.Tensor] = {}

    def before_task(self, ctx) -> None:
        super().before_task(ctx)
        net = self.expert(ctx.mesh).net
        self.start = {k: p.detach().clone() for k, p in net.named_parameters()}
        self.w = {k: torch.zeros_like(p) for k, p in self.start.items()}

    def penalty(self, net: torch.nn.Module) -> torch.Tensor:
        return quadratic_penalty(net, self.omega, self.start, self.params.c)

    def after_backward(self, ctx) -> None:
        net = self.expert(ctx.mesh).net
        # the penalty's gradient first: the path integral uses the gradient the optimizer applies
        add_quadratic_penalty_grad(net, self.omega, self.start, self.params.c)
        for k, p in net.named_parameters():
            if p.grad is not None:
                self._grad[k] = p.grad.detach().clone()
                self._before[k] = p.detach().clone()

    def after_batch(self, ctx) -> None:
        for k, p in self.expert(ctx.mesh).net.named_parameters():
            if k in self._grad:
                self.w[k] -= self._grad[k] * (p.detach() - self._before[k])
        self._grad, self._before = {}, {}

    def after_task(self, ctx) -> None:
        for k, p in self.expert(ctx.mesh).net.named_parameters():
            delta = p.detach() - self.start[k]
            gain = self.w[k].clamp_min(0) / (delta.pow(2) + self.params.xi)
            self.omega[k] = self.omega[k] + gain if k in self.omega else gain

    def state_dict(self):
        return {f"omega.{k}": v.cpu() for k, v in self.omega.items()}

    def load_state_dict(self, state):
        self.omega = {k[6:]: v for k, v in state.items() if k.startswith("omega.")}
