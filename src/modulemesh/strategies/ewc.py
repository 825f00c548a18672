"""Online EWC (Schwarz et al. 2018, "Progress & Compress"; Kirkpatrick et al. 2017).

After each task the diagonal Fisher information of the network is estimated on that task's
training data and folded into a running estimate, ``F <- gamma * F + F_task``; the parameters at
the end of the task become the anchor ``theta*``. Training on later tasks adds

    lambda * sum_k F_k (theta_k - theta*_k)^2

(Mammoth's convention, no 1/2). The Fisher is the mean over the task's examples of
``p(y_i|x_i) * (d log p(y_i|x_i) / d theta)^2``: the observed label's term of the true Fisher's
expectation over labels, weighted by its probability; this is the estimate Mammoth uses, so its
lambda values carry over (``weighted: false`` gives the plain empirical Fisher). The gradients are
true per-example gradients from ``torch.func.vmap(grad(...))``, not squared batch gradients (the
square of a mean is not the mean of squares and underestimates F by about the batch size).

Defaults: Mammoth ``utils/best_args.py``, seq-mnist, ``ewc_on``: e_lambda=90, gamma=1.0
(lr=0.03, batch 10, 1 epoch: the train settings of configs/split_mnist_*.yaml).
"""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..preserve.fisher import fisher_diagonal
from .monolithic import Monolithic, add_quadratic_penalty_grad, quadratic_penalty


class EWCParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    lambda_: float = Field(90.0, ge=0, alias="lambda", description="penalty strength")
    gamma: float = Field(1.0, ge=0, le=1, description="decay of the old Fisher (online EWC)")
    fisher_samples: Optional[int] = Field(
        None, ge=1, description="examples used for the Fisher; default: the whole task"
    )
    fisher_batch: int = Field(256, ge=1, description="examples per vmap chunk")
    weighted: bool = Field(True, description="weight each example's squared gradient by p(y|x) (Mammoth's estimate)")


def per_sample_fisher(
    net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 256, weighted: bool = True
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher: mean over examples of [p(y_i|x_i) *] (d log p(y_i|x_i) / d theta)^2, on x's device.

    ``preserve.fisher.fisher_diagonal`` with its matmul fast path for all-Linear nets (vmap otherwise).
    """
    fisher = fisher_diagonal(net, (x, y), batch_size=chunk, weighted=weighted, linear_fast_path=True, device=x.device)
    return {k: v.to(x.device) for k, v in fisher.items()}


class EWC(Monolithic):
    name = "ewc"
    Params = EWCParams

    def __init__(self, cfg, scenario, params=None):
        super().__init__(cfg, scenario, params)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def penalty(self, net: torch.nn.Module) -> torch.Tensor:
        return quadratic_penalty(net, self.fisher, self.anchor, self.params.lambda_)

    def after_backward(self, ctx) -> None:
        # the penalty enters training through its gradient only (the reported loss is the task loss)
        add_quadratic_penalty_grad(self.expert(ctx.mesh).net, self.fisher, self.anchor, self.params.lambda_)

    def after_task(self, ctx) -> None:
        net, task = self.expert(ctx.mesh).net, ctx.task
        x, y = task.x_train, task.y_train
        if self.params.fisher_samples and self.params.fisher_samples < int(y.shape[0]):
            idx = torch.randperm(int(y.shape[0]), generator=ctx.generator)[: self.params.fisher_samples]
            x, y = x[idx], y[idx]
        new = per_sample_fisher(net, x.to(ctx.device), y.to(ctx.device), self.params.fisher_batch, self.params.weighted)
        g = self.params.gamma
        self.fisher = {k: (g * self.fisher[k] + v if k in self.fisher else v) for k, v in new.items()}
        self.anchor = {k: p.detach().clone() for k, p in net.named_parameters()}

    def state_dict(self):
        return {
            **{f"fisher.{k}": v.cpu() for k, v in self.fisher.items()},
            **{f"anchor.{k}": v.cpu() for k, v in self.anchor.items()},
        }

    def load_state_dict(self, state):
        self.fisher = {k[7:]: v for k, v in state.items() if k.startswith("fisher.")}
        self.anchor = {k[7:]: v for k, v in state.items() if k.startswith("anchor.")}
