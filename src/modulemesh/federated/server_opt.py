"""Server-side optimizer of the aggregated update: FedAvgM (Hsu et al. 2019), pure tensors, no engine.

FedAvg replaces the global weights ``w`` by the clients' average ``avg``, i.e. one SGD step of lr 1 on the
pseudo-gradient ``delta = w - avg``. FedAvgM keeps a heavy-ball buffer of those pseudo-gradients and steps
with a server learning rate: ``v <- beta v + delta``; ``w <- w - server_lr v``. Momentum carries the
direction the rounds agree on and damps the client drift that one round's skewed clients add (the
label-skewed regime). With ``beta = 0`` and ``server_lr = 1`` it is FedAvg; the runners then skip it, so
the default path is FedAvg bit for bit.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

State = Mapping[str, torch.Tensor]


class ServerMomentum:
    """FedAvgM's server step: ``step(w, avg)`` returns the new global weights (float tensors only)."""

    def __init__(self, beta: float, server_lr: float):
        self.beta, self.server_lr = float(beta), float(server_lr)
        self.buffer: Optional[dict[str, torch.Tensor]] = None

    @property
    def active(self) -> bool:
        return self.beta > 0 or self.server_lr != 1.0

    def step(self, w: State, avg: State) -> dict[str, torch.Tensor]:
        """New global weights from the current ones ``w`` and the clients' aggregate ``avg`` (same names)."""
        if not self.active:
            return {n: v.clone() for n, v in avg.items()}
        out, buf = {}, {} if self.buffer is None else self.buffer
        for n, a in avg.items():
            if not a.is_floating_point():  # counters (BatchNorm's num_batches_tracked) take the aggregate
                out[n] = a.clone()
                continue
            delta = w[n].to(a) - a
            buf[n] = delta if n not in buf else self.beta * buf[n].to(a) + delta
            out[n] = w[n].to(a) - self.server_lr * buf[n]
        self.buffer = buf
        return out

    def state(self, prefix: str = "server_momentum") -> dict[str, torch.Tensor]:
        """The buffer for a resume file, as ``<prefix>/<param>`` (empty before the first step)."""
        return {f"{prefix}/{n}": v for n, v in (self.buffer or {}).items()}

    def load_state(self, state: Mapping[str, torch.Tensor], prefix: str = "server_momentum") -> None:
        got = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(prefix + "/")}
        self.buffer = {n: v.clone() for n, v in got.items()} or None
