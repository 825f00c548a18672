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

import torch
import torch.nn.functional as F
from pydantic import Field

from ..training.buffer import ReplayBuffer
from .baseline import Monolithic, ReplayParams


class DERParams(ReplayParams):
    alpha: float = Field(1.0, ge=0, description="weight of the logit-matching (MSE) term")


class DERPPParams(DERParams):
    beta: float = Field(0.5, ge=0, description="weight of the replayed-label cross-entropy term")


class DER(Monolithic):
    name = "der"
    Params = DERParams
    label_replay = False

    def __init__(self, cfg, scenario, params=None):
        super().__init__(cfg, scenario, params)
        self.buffer = ReplayBuffer(cfg.strategy.buffer_size, seed=cfg.seed)
        self._stored = None
        self._n_logit = 0

    def before_task(self, ctx) -> None:
        super().before_task(ctx)
        self.buffer.to(ctx.device)

    def before_batch(self, ctx) -> None:
        self._stored, self._n_logit = None, 0
        if not len(self.buffer):
            return
        m = self.params.minibatch_size or ctx.batch_size
        x, y, t, extras = self.buffer.sample(m, ctx.generator)
        self._stored, self._n_logit = extras["logits"], int(y.shape[0])
        self.append_rows(ctx, x, y, t)
        if self.label_replay:
            x, y, t, _ = self.buffer.sample(m, ctx.generator)
            self.append_rows(ctx, x, y, t)

    def loss(self, ctx) -> torch.Tensor:
        loss = self.current_nll(ctx)
        if self._stored is None:
            return loss
        n, m = ctx.n_current, self._n_logit
        loss = loss + self.params.alpha * F.mse_loss(self.logits[n : n + m], self._stored)
        if self.label_replay:
            loss = loss + self.params.beta * F.nll_loss(ctx.out.log_probs[n + m :], ctx.y[n + m :])
        return loss

    def after_batch(self, ctx) -> None:
        n = ctx.n_current
        self.buffer.add(ctx.x[:n].detach(), ctx.y[:n], ctx.t[:n], logits=self.logits[:n].detach())

    def state_dict(self):
        return {f"buffer.{k}": v for k, v in self.buffer.state_dict().items()}

    def load_state_dict(self, state):
        self.buffer.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("buffer.")})


class DERPP(DER):
    name = "derpp"
    Params = DERPPParams
    label_replay = True
