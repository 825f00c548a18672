"""Many same-architecture models trained at once: parameters stacked along a client axis, ``torch.func.vmap``.

``Stack`` holds K copies of one mesh ``Expert`` as ``{param: (K, ...)}`` (the training layout of
``weights.stack``); ``member(k)`` / ``set_member(k, state)`` convert to and from the one module
encoding (an expert state dict). The vmapped local update of all K clients at once is the
training toolkit's ``training.fit.fit_stacked`` (each client stopping after its own steps).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.func import functional_call, vmap

from ...training.evaluate import count_correct
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
    def logits(
        self, x: torch.Tensor, params: Optional[Params] = None, batch: Optional[int] = None, clients: int = 64
    ) -> torch.Tensor:
        """``(K, N, C)`` logits of every stacked model on the same inputs.

        Chunked over models as well as inputs: with all K models in every input chunk, a 1,000-client
        stack's weights (800 MB) would be streamed from memory once per small input chunk; ``clients``
        models at a time keep them in cache across ``batch`` inputs (faster at 1,000 clients, same
        numbers: benchmarks/results/federated_round_profile.md). ``clients * batch`` bounds the
        (models, inputs, hidden) activations.
        """
        params = self.params if params is None else params
        k = next(iter(params.values())).shape[0]
        kc = min(k, clients)
        batch = batch or max(32, min(2048, 65536 // kc))
        f = vmap(self.fwd, in_dims=(0, None))
        out = []
        for j in range(0, k, kc):
            pj = {n: v[j : j + kc] for n, v in params.items()}
            out.append(torch.cat([f(pj, as_float(x[i : i + batch])) for i in range(0, len(x), batch)], dim=1))
        return torch.cat(out, dim=0)

    def member(self, k: int) -> Params:
        """Client k's weights in the module encoding (a copy)."""
        return {n: v[k].clone() for n, v in self.params.items()}

    def set_member(self, k: int, state: Params) -> None:
        for n in self.params:
            self.params[n][k] = state[n].to(self.params[n].device)


@torch.no_grad()
def model_accuracy(stack: Stack, params: Params, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of (x, y) one model (unstacked ``params``) classifies right (the toolkit's evaluate loop)."""
    return count_correct(lambda xb: stack.fwd(params, xb), x, y) / max(len(x), 1)


@torch.no_grad()
def accuracy_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Accuracy per leading index of ``(..., N, C)`` logits (the K stacked models at once)."""
    return (logits.argmax(-1) == y).float().mean(-1)
