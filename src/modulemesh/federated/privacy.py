"""Membership inference: how much does a model's loss give away about who was in its training set?

The loss-threshold attack (Yeom et al., 2018) guesses "member" when the per-example loss is
below a threshold. Sweeping the threshold gives a ROC curve; its area (``attack_auc``) is 0.5 for
a model that leaks nothing through its loss and 1.0 when every member has a lower loss than every
non-member. ``auc`` is the Mann-Whitney statistic with ties counted as one half.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError


def auc(pos_scores: np.ndarray | torch.Tensor, neg_scores: np.ndarray | torch.Tensor) -> float:
    """P(score(pos) > score(neg)) + 0.5 P(equal), from ranks (O(n log n))."""
    pos = np.asarray(pos_scores, dtype=np.float64).ravel()
    neg = np.asarray(neg_scores, dtype=np.float64).ravel()
    if len(pos) == 0 or len(neg) == 0:
        raise DataError("membership AUC needs at least one member and one non-member example")
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks over ties
    start = 0
    while start < len(sorted_v):
        end = start
        while end + 1 < len(sorted_v) and sorted_v[end + 1] == sorted_v[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@torch.no_grad()
def per_example_loss(
    predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048
) -> torch.Tensor:
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        if xb.dtype == torch.uint8:
            xb = xb.float() / 255
        out.append(F.cross_entropy(predict(xb), y[i : i + batch_size], reduction="none"))
    return torch.cat(out) if out else torch.zeros(0)


def loss_threshold_auc(
    predict: Callable[[torch.Tensor], torch.Tensor],
    members: tuple[torch.Tensor, torch.Tensor],
    non_members: tuple[torch.Tensor, torch.Tensor],
    max_examples: int = 5000,
    seed: int = 0,
) -> float:
    """AUC of the loss-threshold attack; members and non-members are ``(x, y)`` pairs.

    Both sets are subsampled (seeded) to the same size, at most ``max_examples``.
    """
    g = torch.Generator().manual_seed(seed)
    n = min(len(members[0]), len(non_members[0]), max_examples)
    mi = torch.randperm(len(members[0]), generator=g)[:n]
    ni = torch.randperm(len(non_members[0]), generator=g)[:n]
    lm = per_example_loss(predict, members[0][mi], members[1][mi])
    ln = per_example_loss(predict, non_members[0][ni], non_members[1][ni])
    return auc(-lm.cpu().numpy(), -ln.cpu().numpy())
