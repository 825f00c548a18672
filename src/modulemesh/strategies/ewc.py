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
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch.func import functional_call, grad, vmap

from ..data.scenarios import as_float
from .baseline import Monolithic, add_quadratic_penalty_grad, quadratic_penalty


class EWCParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    lambda_: float = Field(90.0, ge=0, alias="lambda", description="penalty strength")
    gamma: float = Field(1.0, ge=0, le=1, description="decay of the old Fisher (online EWC)")
    fisher_samples: Optional[int] = Field(None, ge=1, description="examples used for the Fisher; default: the whole task")
    fisher_batch: int = Field(256, ge=1, description="examples per vmap chunk")
    weighted: bool = Field(True, description="weight each example's squared gradient by p(y|x) (Mammoth's estimate)")


def per_sample_fisher(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 256,
                      weighted: bool = True) -> dict[str, torch.Tensor]:
    """Diagonal Fisher: mean over examples of [p(y_i|x_i) *] (d log p(y_i|x_i) / d theta)^2."""
    was_training = net.training
    net.eval()  # batch-norm statistics of a single example are meaningless
    try:
        fisher = _linear_fisher(net, x, y, chunk, weighted)
        if fisher is None:
            fisher = _vmap_fisher(net, x, y, chunk, weighted)
    finally:
        net.train(was_training)
    return {k: v / max(int(y.shape[0]), 1) for k, v in fisher.items()}


def _linear_fisher(net, x, y, chunk, weighted) -> Optional[dict[str, torch.Tensor]]:
    """Exact per-example squared gradients without materializing them, for nets whose parameters all
    sit in ``nn.Linear`` layers fed (N, features) inputs: example i's weight gradient is the outer
    product g_i a_i^T of the layer's output gradient and input, so sum_i w_i (g_i a_i^T)^2 =
    (w * g^2)^T (a^2), one matmul per layer (about 30x faster than vmap on the 784-100-100-10 MLP).
    Returns None when the net has other parameterized layers (the caller falls back to vmap)."""
    linears = {m: name for name, m in net.named_modules() if isinstance(m, torch.nn.Linear)}
    owned = {f"{linears[m]}.{k}".lstrip(".") for m in linears for k, _ in m.named_parameters(recurse=False)}
    params = dict(net.named_parameters())
    if not linears or set(params) != owned or not all(p.requires_grad for p in params.values()):
        return None
    seen: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.__setitem__(mod, (inp[0].detach(), out))) for m in linears]
    fisher = {k: torch.zeros_like(p, requires_grad=False) for k, p in params.items()}
    try:
        for begin in range(0, int(y.shape[0]), chunk):
            seen.clear()
            with torch.enable_grad():
                ll = F.log_softmax(net(as_float(x[begin : begin + chunk])), dim=1).gather(1, y[begin : begin + chunk, None])[:, 0]
                if any(seen[m][0].dim() != 2 for m in linears):
                    return None  # sequence inputs: per-example gradients sum over positions
                mods = list(linears)
                grads = torch.autograd.grad(ll.sum(), [seen[m][1] for m in mods])
            w = ll.detach().exp() if weighted else torch.ones_like(ll)
            for m, g in zip(mods, grads):
                wg2 = g.pow(2) * w[:, None]
                prefix = f"{linears[m]}." if linears[m] else ""
                fisher[prefix + "weight"] += wg2.T @ seen[m][0].pow(2)
                if m.bias is not None:
                    fisher[prefix + "bias"] += wg2.sum(0)
    finally:
        for h in hooks:
            h.remove()
    return fisher


def _vmap_fisher(net, x, y, chunk, weighted) -> dict[str, torch.Tensor]:
    """Any architecture: true per-example gradients from torch.func (vmap over grad)."""
    params = {k: v.detach() for k, v in net.named_parameters()}

    def log_lik(p, xi, yi):
        out = functional_call(net, p, (xi.unsqueeze(0),))
        ll = F.log_softmax(out, dim=1)[0].gather(0, yi.reshape(1))[0]
        return ll, ll.detach().exp()

    per_sample = vmap(grad(log_lik, has_aux=True), in_dims=(None, 0, 0))
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    for begin in range(0, int(y.shape[0]), chunk):
        g, p = per_sample(params, as_float(x[begin : begin + chunk]), y[begin : begin + chunk])
        w = p if weighted else torch.ones_like(p)
        for k in fisher:
            fisher[k] += (w.view(-1, *[1] * (g[k].dim() - 1)) * g[k].pow(2)).sum(0)
    return fisher


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
        return {**{f"fisher.{k}": v.cpu() for k, v in self.fisher.items()}, **{f"anchor.{k}": v.cpu() for k, v in self.anchor.items()}}

    def load_state_dict(self, state):
        self.fisher = {k[7:]: v for k, v in state.items() if k.startswith("fisher.")}
        self.anchor = {k[7:]: v for k, v in state.items() if k.startswith("anchor.")}
