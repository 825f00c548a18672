"""Experience Replay (Chaudhry et al. 2019; Riemer et al. 2019) with a reservoir buffer.

Every step appends a minibatch sampled from the buffer to the current minibatch and trains on
the cross-entropy of all rows; after the step the current rows are offered to the buffer by
reservoir sampling, so the buffer is a uniform sample of the stream.

Defaults: Mammoth ``utils/best_args.py``, seq-mnist, ``er``: minibatch_size = batch size = 10
(Mammoth used lr=0.1 at buffer 500, 0.01 at 200); buffer from ``strategy.buffer_size``.
"""

from __future__ import annotations

from .monolithic import Monolithic, ReplayParams
from .replay import ReplayMixin


class ER(ReplayMixin, Monolithic):
    name = "er"
    Params = ReplayParams

    def __init__(self, cfg, scenario, params=None):
        super().__init__(cfg, scenario, params)
        self.init_buffer(cfg)

    def before_task(self, ctx) -> None:
        super().before_task(ctx)
        self.buffer_to_device(ctx)

    def before_batch(self, ctx) -> None:
        self.replay(ctx, self.params.minibatch_size)

    def after_batch(self, ctx) -> None:
        self.remember_current(ctx)
