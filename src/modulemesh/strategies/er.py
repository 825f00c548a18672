"""Experience Replay (Chaudhry et al. 2019; Riemer et al. 2019) with a reservoir buffer.

Every step appends a minibatch sampled from the buffer to the current minibatch and trains on
the cross-entropy of all rows; after the step the current rows are offered to the buffer by
reservoir sampling, so the buffer is a uniform sample of the stream.

Defaults: Mammoth ``utils/best_args.py``, seq-mnist, ``er``: minibatch_size = batch size = 10
(Mammoth used lr=0.1 at buffer 500, 0.01 at 200); buffer from ``strategy.buffer_size``.
"""

from __future__ import annotations

from ..training.buffer import ReplayBuffer
from .baseline import Monolithic, ReplayParams


class ER(Monolithic):
    name = "er"
    Params = ReplayParams

    def __init__(self, cfg, scenario, params=None):
        super().__init__(cfg, scenario, params)
        self.buffer = ReplayBuffer(cfg.strategy.buffer_size, seed=cfg.seed)

    def before_task(self, ctx) -> None:
        super().before_task(ctx)
        self.buffer.to(ctx.device)

    def before_batch(self, ctx) -> None:
        if len(self.buffer):
            x, y, t, _ = self.buffer.sample(self.params.minibatch_size or ctx.batch_size, ctx.generator)
            self.append_rows(ctx, x, y, t)

    def after_batch(self, ctx) -> None:
        n = ctx.n_current
        self.buffer.add(ctx.x[:n].detach(), ctx.y[:n], ctx.t[:n])

    def state_dict(self):
        return {f"buffer.{k}": v for k, v in self.buffer.state_dict().items()}

    def load_state_dict(self, state):
        self.buffer.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("buffer.")})
