"""Dark Experience Replay, DER and DER++ (Buzzega et al. 2020).

The reservoir buffer keeps each example with the logits the network produced for it when it was
seen (``extras["logits"]``). DER adds ``alpha * MSE(z(x_buf), z_stored)`` on a replayed
minibatch; DER++ also adds ``beta * CE(x_buf', y_buf')`` on a second, independent minibatch.
Replay rows are appended to the current batch, so the one forward pass of the loop serves all
terms, and the network's raw logits come from the expert's forward hook.

Defaults: Mammoth ``utils/best_args.py``, seq-mnist at buffer 500 (the configs' buffer):
DER alpha=1.0; DER++ alpha=1.0, beta=0.5 (lr=0.03, batch 10). At buffer 200 Mammoth used
DER alpha=0.2 and DER++ alpha=0.2, beta=1.0: pass them with --set.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import Field

from .monolithic import Monolithic, ReplayParams
from .replay import ReplayMixin


class DERParams(ReplayParams):
    alpha: float = Field(1.0, ge=0, description="weight of the logit-matching (MSE) term")


class DERPPParams(DERParams):
    beta: float = Field(0.5, ge=0, description="weight of the replayed-label cross-entropy term")


class DER(ReplayMixin, Monolithic):
    name = "der"
    Params = DERParams
    label_replay = False

    def __init__(self, cfg, scenario, params=None):
        super().__init__(cfg, scenario, params)
        self.init_buffer(cfg)
        self.stored_logits: Optional[torch.Tensor] = None  # the replayed rows' logits from when they were stored
        self.n_logit_rows = 0

    def before_task(self, ctx) -> None:
        super().before_task(ctx)
        self.buffer_to_device(ctx)

    def before_batch(self, ctx) -> None:
        self.stored_logits, self.n_logit_rows = None, 0
        n_before = int(ctx.y.shape[0])
        extras = self.replay(ctx, self.params.minibatch_size)
        if extras is None:
            return
        self.stored_logits, self.n_logit_rows = extras["logits"], int(ctx.y.shape[0]) - n_before
        if self.label_replay:
            self.replay(ctx, self.params.minibatch_size)

    def loss(self, ctx) -> torch.Tensor:
        loss = self.current_nll(ctx)
        if self.stored_logits is None:
            return loss
        n, m = ctx.n_current, self.n_logit_rows
        loss = loss + self.params.alpha * F.mse_loss(self.logits[n : n + m], self.stored_logits)
        if self.label_replay:
            loss = loss + self.params.beta * F.nll_loss(ctx.out.log_probs[n + m :], ctx.y[n + m :])
        return loss

    def after_batch(self, ctx) -> None:
        self.remember_current(ctx, logits=self.logits[: ctx.n_current].detach())


class DERPP(DER):
    name = "derpp"
    Params = DERPPParams
    label_replay = True
