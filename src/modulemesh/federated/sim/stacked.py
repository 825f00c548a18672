"""Many same-architecture models trained at once: parameters stacked along a client axis, ``torch.func.vmap``.

``Stack`` holds K copies of one mesh ``Expert`` as ``{param: (K, ...)}`` (the training layout of
``weights.stack``); ``member(k)`` / ``set_member(k, state)`` convert to and from the one module
encoding (an expert state dict). ``sgd_train`` is the vmapped local update: one SGD step for all
K clients at a time, each client stopping after its own number of steps.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.func import functional_call, grad_and_value, vmap

from ...errors import TrainingError
from ..expert_init import new_expert
from .data import as_float

Params = dict[str, torch.Tensor]


class Stack:
    """K same-architecture experts as stacked parameters ``{name: (K, ...)}`` on ``device``."""

    def __init__(
        self,
        spec: dict,
        input_shape,
        num_classes: int,
        k: int,
        seed: int,
        same_init: bool = True,
        device: str | torch.device = "cpu",
        name: str = "model",
    ):
        self.spec, self.input_shape, self.num_classes, self.k = dict(spec), tuple(input_shape), num_classes, k
        self.base = new_expert(name, self.spec, input_shape, num_classes, seed, device)
        if same_init:
            self.params = {
                n: p.detach().unsqueeze(0).repeat(k, *([1] * p.dim())).clone() for n, p in self.base.named_parameters()
            }
        else:
            models = [
                new_expert(name, self.spec, input_shape, num_classes, seed * 1000003 + i, device) for i in range(k)
            ]
            self.params = {
                n: torch.stack([dict(m.named_parameters())[n].detach() for m in models])
                for n, _ in self.base.named_parameters()
            }
        self.base.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def fwd(self, p: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base, p, (x,))

    @torch.no_grad()
    def logits(self, x: torch.Tensor, params: Optional[Params] = None, batch: int = 2048) -> torch.Tensor:
        """``(K, N, C)`` logits of every stacked model on the same inputs."""
        params = self.params if params is None else params
        f = vmap(self.fwd, in_dims=(0, None))
        return torch.cat([f(params, as_float(x[i : i + batch])) for i in range(0, len(x), batch)], dim=1)

    def member(self, k: int) -> Params:
        """Client k's weights in the module encoding (a copy)."""
        return {n: v[k].clone() for n, v in self.params.items()}

    def set_member(self, k: int, state: Params) -> None:
        for n in self.params:
            self.params[n][k] = state[n].to(self.params[n].device)


def sgd_train(
    params: Params,
    loss_fn: Callable,
    batch_fn: Callable[[int], tuple],
    steps: torch.Tensor,
    lr: float,
    momentum: float = 0.0,
    sq_grads: Optional[Params] = None,
    mask: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
) -> tuple[Params, float]:
    """vmapped SGD: ``loss_fn(p_k, *batch_k)`` per client; client k stops after ``steps[k]`` steps.

    ``sq_grads`` (optional, zeros like params) accumulates the mean squared gradient per client,
    a cheap diagonal empirical Fisher estimate. ``mask(name, active)`` may narrow the (K,) mask of
    clients still stepping per parameter (e.g. to the modules a peer trains this round). Returns
    the new params and the last mean loss.
    """
    if not params:
        return params, float("nan")
    device = next(iter(params.values())).device
    total = int(steps.max()) if len(steps) else 0
    g_fn = vmap(grad_and_value(loss_fn))
    params = {n: v.clone() for n, v in params.items()}
    steps = steps.to(device)
    buf = {n: torch.zeros_like(v) for n, v in params.items()} if momentum else None
    last = float("nan")
    for t in range(total):
        active = (steps > t).to(next(iter(params.values())).dtype)
        grads, loss = g_fn(params, *batch_fn(t))
        if not torch.isfinite(loss).all():
            raise TrainingError(f"local training diverged (loss {loss.tolist()[:4]}...) at step {t}; lower lr")
        last = float((loss * active).sum() / active.sum().clamp_min(1))
        for n, g in grads.items():
            shape = (-1, *([1] * (g.dim() - 1)))
            a = (mask(n, active) if mask is not None else active).view(shape)
            if sq_grads is not None:
                sq_grads[n] += a * g * g / steps.clamp_min(1).view(shape)
            if buf is not None:
                buf[n].mul_(momentum).add_(g)
                g = buf[n]
            params[n] -= lr * a * g
    return params, last


@torch.no_grad()
def accuracy_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Accuracy per leading index of ``(..., N, C)`` logits."""
    return (logits.argmax(-1) == y).float().mean(-1)
