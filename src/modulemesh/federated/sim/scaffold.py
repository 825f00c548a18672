"""SCAFFOLD (Karimireddy et al. 2020): control variates that correct each client's drift under skewed data.

The server keeps a control variate ``c`` (an estimate of the global gradient), client i its own ``c_i``
(of its local gradient). Each local step follows ``g_i(y) + c - c_i``, i.e. the client's gradient with
its own bias swapped for the global one; here that is a linear term ``<p, c - c_i>`` added to the local
loss, so the vmapped step of every client stays one ``fit_stacked`` call. After its K_i steps at lr eta
a client updates ``c_i+ = c_i - c + (x - y_i) / (K_i eta)`` (the paper's option II) and sends ``c_i+ - c_i``
with its weights; the server adds the example-weighted mean of the received differences to ``c`` (with
every client reporting, ``c`` is the weighted mean of the ``c_i``, the weights FedAvg uses). Messages
double: ``c`` goes down with the model, ``c_i+ - c_i`` comes up with the weights, both through the codec.
A client that fails mid-round keeps its old ``c_i`` (its update never reached the server).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .runner import load_stacked, save_stacked
from .stacked import Params


def with_correction(loss_fn, batch_fn, corr: Params):
    """``loss_fn`` plus ``<p, corr_k>`` per client: its gradient is the client's own plus ``corr_k``."""

    def loss(p, *args):
        *batch, cr = args
        return loss_fn(p, *batch) + sum((p[n] * cr[n]).sum() for n in p)

    def batch(t):
        return (*batch_fn(t), corr)

    return loss, batch


class Controls:
    """The server's ``c`` and every client's ``c_i`` (stacked ``(K, ...)``), both starting at zero."""

    def __init__(self, like: Params, k: int):
        self.c = {n: torch.zeros_like(v[0]) for n, v in like.items()}
        self.ci = {n: torch.zeros(k, *v.shape[1:], dtype=v.dtype, device=v.device) for n, v in like.items()}

    def correction(self, c_rx: Params) -> Params:
        """Each client's ``c - c_i`` (``c_rx``: the server's ``c`` as the clients decoded it)."""
        return {n: c_rx[n].unsqueeze(0) - v for n, v in self.ci.items()}

    def client_deltas(self, c_rx: Params, start: Params, trained: Params, steps: torch.Tensor, lr: float) -> Params:
        """``c_i+ - c_i = -c + (x - y_i) / (K_i lr)`` for every client (stacked; ``start``: the x they received)."""
        out = {}
        for n, y in trained.items():
            k = steps.to(y.device, y.dtype).view(-1, *([1] * (y.dim() - 1)))
            out[n] = (start[n].unsqueeze(0) - y) / (k * lr) - c_rx[n].unsqueeze(0)
        return out

    def commit(self, deltas: Params, rx: Params, senders: Sequence[int], weights: Sequence[float]) -> None:
        """Senders adopt ``c_i+``; the server adds the weighted mean of the received ``rx`` deltas to ``c``
        (weights: each sender's examples over all clients' examples)."""
        idx = torch.as_tensor(list(senders), dtype=torch.long)
        w = torch.as_tensor(list(weights), dtype=torch.float64)
        for n in self.ci:
            self.ci[n][idx] += deltas[n][idx.to(deltas[n].device)]
            shape = (-1,) + (1,) * (rx[n].dim() - 1)
            self.c[n] += (rx[n].to(torch.float64) * w.view(shape).to(rx[n].device)).sum(0).to(self.c[n].dtype)

    def state(self) -> dict[str, torch.Tensor]:
        return {**save_stacked("scaffold_ci", self.ci), **save_stacked("scaffold_c", self.c)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        load_stacked("scaffold_ci", state, self.ci)
        load_stacked("scaffold_c", state, self.c)
