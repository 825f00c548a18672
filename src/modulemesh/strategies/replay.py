"""``ReplayMixin``: the reservoir-buffer plumbing every replay strategy repeats (ER, DER, DER++; ModuleMesh).

A replay strategy keeps a ``ReplayBuffer`` of ``strategy.buffer_size`` examples seeded by the run's
seed, moves it to the device at the start of each task, appends sampled rows to the current batch
(``ctx.n_current`` still counts the current task's rows only), offers the current rows to the
buffer after the step, and checkpoints the buffer under ``buffer.*`` keys so a resumed run
continues with the same memory.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..data.scenarios import as_float
from ..training.buffer import ReplayBuffer


class ReplayMixin:
    """Mix in before the strategy's base class (``class ER(ReplayMixin, Monolithic)``); call ``init_buffer`` in
    ``__init__``."""

    buffer: ReplayBuffer

    def init_buffer(self, cfg) -> None:
        self.buffer = ReplayBuffer(cfg.strategy.buffer_size, seed=cfg.seed)

    def buffer_to_device(self, ctx) -> None:
        self.buffer.to(ctx.device)

    @staticmethod
    def append_rows(ctx, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """Append rows (uint8 or float inputs) to the current batch."""
        ctx.x = torch.cat([ctx.x, as_float(x)])
        ctx.y = torch.cat([ctx.y, y])
        ctx.t = torch.cat([ctx.t, t])

    def replay(self, ctx, n: Optional[int] = None) -> Optional[dict[str, torch.Tensor]]:
        """Append ``n`` (default: the batch size) buffer rows to the batch; returns their extras (None if empty)."""
        if not len(self.buffer):
            return None
        x, y, t, extras = self.buffer.sample(n or ctx.batch_size, ctx.generator)
        self.append_rows(ctx, x, y, t)
        return extras

    def remember_current(self, ctx, **extras: torch.Tensor) -> None:
        """Offer the batch's current-task rows (with per-row ``extras``) to the buffer."""
        n = ctx.n_current
        self.buffer.add(ctx.x[:n].detach(), ctx.y[:n], ctx.t[:n], **extras)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"buffer.{k}": v for k, v in self.buffer.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.buffer.load_state_dict({k[len("buffer.") :]: v for k, v in state.items() if k.startswith("buffer.")})


__all__ = ["ReplayMixin"]
