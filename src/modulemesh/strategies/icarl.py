"""iCaRL (Rebuffi et al. 2017): herded exemplars, distillation, nearest-mean-of-exemplars classifier.

* Memory: ``strategy.buffer_size`` exemplars in total, ``K // classes seen`` per class. The
  exemplars of a class are chosen by herding on L2-normalized features (the input of the
  network's last linear layer): each next exemplar is the example that brings the mean of the
  chosen set closest to the class mean, so the first is the example nearest the mean and every
  prefix is a good set; shrinking a class's set keeps a prefix.
* Training on task t uses the task's data plus all exemplars, with the paper's loss: binary
  cross-entropy over the classes seen so far, whose targets are the one-hot label for the
  classes new in this task and the old network's sigmoid outputs for the earlier classes.
* Prediction (``predict_log_probs``): the class whose exemplar mean (normalized features,
  recomputed after every task) is nearest to the example's normalized features.

Defaults: Mammoth ``utils/best_args.py``, seq-mnist, ``icarl``: lr=0.1, batch 10, no weight
decay; the paper's herding and NME classifier. No hyper-parameters of its own.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..data.scenarios import as_float
from ..mesh.mesh import NO_COVER
from .monolithic import Monolithic


def penultimate(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of ``net``'s last ``nn.Linear`` (its feature vector) for a batch ``x``."""
    head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    seen: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
    try:
        net(x)
    finally:
        handle.remove()
    return seen[-1].flatten(1)


@torch.no_grad()
def features(net: torch.nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    was = net.training
    net.eval()
    out = torch.cat(
        [F.normalize(penultimate(net, as_float(x[i : i + batch])), dim=1) for i in range(0, x.shape[0], batch)]
    )
    net.train(was)
    return out


def herding(feats: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of ``m`` rows of ``feats`` chosen greedily so their running mean tracks the mean."""
    mu = feats.mean(0)
    m = min(m, feats.shape[0])
    chosen: list[int] = []
    total = torch.zeros_like(mu)
    available = torch.ones(feats.shape[0], dtype=torch.bool, device=feats.device)
    for k in range(1, m + 1):
        dist = (mu - (total + feats) / k).norm(dim=1)
        dist[~available] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        available[i] = False
        total += feats[i]
    return torch.tensor(chosen, dtype=torch.long)


class ICaRL(Monolithic):
    name = "icarl"

    def __init__(self, cfg, scenario, params=None):
        super().__init__(cfg, scenario, params)
        self.ex_x: Optional[torch.Tensor] = None  # exemplars, grouped by class, herding order within a class
        self.ex_y: Optional[torch.Tensor] = None
        self.means: Optional[torch.Tensor] = None  # (C, D) exemplar means; rows of unseen classes are NaN
        self.old = None

    def before_task(self, ctx) -> None:
        super().before_task(ctx)
        self.old_idx = torch.tensor(self.old_classes(ctx.task), dtype=torch.long, device=ctx.device)
        self.seen_idx = torch.tensor(
            sorted(set(self.old_idx.tolist()) | set(ctx.task.classes)), dtype=torch.long, device=ctx.device
        )
        self.old = self.snapshot(ctx.mesh) if self.old_idx.numel() else None

    def train_data(self, ctx):
        x, y, t = super().train_data(ctx)
        if self.ex_y is None or self.ex_y.numel() == 0:
            return x, y, t
        ex_x = self.ex_x.to(x.device, x.dtype)
        ex_y = self.ex_y.to(y.device)
        return torch.cat([x, ex_x]), torch.cat([y, ex_y]), torch.cat([t, torch.full_like(ex_y, ctx.task.id)])

    def loss(self, ctx) -> torch.Tensor:
        logits = self.logits
        target = F.one_hot(ctx.y, self.scenario.num_classes).to(logits.dtype)
        if self.old is not None:
            with torch.no_grad():
                target[:, self.old_idx] = torch.sigmoid(self.old(ctx.x)[:, self.old_idx])
        cols = self.seen_idx
        return F.binary_cross_entropy_with_logits(logits[:, cols], target[:, cols])

    @torch.no_grad()
    def after_task(self, ctx) -> None:
        net, task = self.expert(ctx.mesh).net, ctx.task
        seen = self.seen_idx.tolist()
        m = max(self.cfg.strategy.buffer_size // max(len(seen), 1), 0)
        xs, ys = [], []
        for c in seen:
            parts = []
            if self.ex_y is not None:
                parts.append(self.ex_x[self.ex_y == c])
            if c in task.classes:
                parts.append(task.x_train[task.y_train == c].to(parts[0].device if parts else task.x_train.device))
                cand = torch.cat(parts) if len(parts) > 1 else parts[0]
                keep = herding(features(net, cand.to(ctx.device)), m).to(cand.device)
                chosen = cand[keep]
            else:
                chosen = parts[0][:m]  # herding order: a prefix is the best smaller set
            xs.append(chosen)
            ys.append(torch.full((chosen.shape[0],), c, dtype=torch.long))
        self.ex_x, self.ex_y = torch.cat(xs).cpu(), torch.cat(ys)
        self.compute_means(net, ctx.device)
        self.old = None

    @torch.no_grad()
    def compute_means(self, net, device) -> None:
        feats = features(net, self.ex_x.to(device))
        means = torch.full((self.scenario.num_classes, feats.shape[1]), float("nan"), device=device)
        y = self.ex_y.to(device)
        for c in y.unique().tolist():
            means[c] = F.normalize(feats[y == c].mean(0), dim=0)
        self.means = means

    @torch.no_grad()
    def predict_log_probs(self, mesh, x, task_ids):
        if self.means is None:
            return None
        means = self.means.to(x.device)
        f = features(self.expert(mesh).net, x)
        known = ~torch.isnan(means[:, 0])
        dist = torch.cdist(f, torch.nan_to_num(means))
        scores = torch.where(known, -dist.pow(2), torch.full_like(dist, NO_COVER))
        return F.log_softmax(scores, dim=1)

    def state_dict(self):
        if self.ex_y is None:
            return {}
        return {"ex_x": self.ex_x.cpu(), "ex_y": self.ex_y.cpu(), "means": self.means.cpu()}

    def load_state_dict(self, state):
        if "ex_y" in state:
            self.ex_x, self.ex_y, self.means = state["ex_x"].cpu(), state["ex_y"].cpu(), state["means"]
