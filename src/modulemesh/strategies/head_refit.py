"""Refit an expert's last linear layer in closed form when its task ends (``strategy.head_refit: lda``).

Why: one epoch of SGD leaves a small expert's head behind its features (Permuted-MNIST: 9,000 images, seen
once). Linear discriminant analysis on the expert's own penultimate features of the task's training data is a
linear classifier, so it replaces the last ``nn.Linear`` exactly (no new state): with class means m_c, shared
covariance S (plus a small ridge) and class priors pi_c,

    logit_c(h) = h^T S^-1 m_c - 1/2 m_c^T S^-1 m_c + log pi_c.

It costs one forward pass over the task's data (as the density fit does) and no gradient step. The logits'
scale changes, so it is not for experts whose logsumexp is read as rejection evidence (class-IL blocks).
"""

from __future__ import annotations

import torch

from ..data.scenarios import as_float
from ..errors import ModuleMeshError
from .icarl import penultimate

# Added to S's diagonal, times its mean variance: keeps S invertible when features are dead, and bounds the
# weight a near-constant feature gets (S^-1 m_c), so the head's rows keep a range that int8 rounding can hold
# (strategy.head_ridge).
RIDGE = 1e-3


def last_linear(expert) -> torch.nn.Linear:
    """The expert's output layer (the last ``nn.Linear`` of its network)."""
    return [m for m in expert.net.modules() if isinstance(m, torch.nn.Linear)][-1]


@torch.no_grad()
def refit_head_lda(expert, x: torch.Tensor, y: torch.Tensor, ridge: float = RIDGE, batch: int = 2048) -> None:
    """Replace ``expert``'s last linear layer by LDA on its penultimate features of (``x``, ``y``: global labels)."""
    head = last_linear(expert)
    was = expert.training
    expert.eval()
    h = torch.cat([penultimate(expert.net, as_float(x[i : i + batch])) for i in range(0, len(x), batch)]).double()
    expert.train(was)
    local = {c: j for j, c in enumerate(expert.classes)}
    if any(int(c) not in local for c in torch.unique(y).tolist()):
        raise ModuleMeshError(f"head refit: labels outside expert {expert.name!r}'s classes {expert.classes}")
    yl = torch.tensor([local[int(c)] for c in y.tolist()], device=h.device)
    k = len(expert.classes)
    counts = torch.bincount(yl, minlength=k).double()
    if bool((counts == 0).any()):
        raise ModuleMeshError(f"head refit: expert {expert.name!r} has a class with no training example")
    means = torch.zeros(k, h.shape[1], dtype=torch.float64, device=h.device).index_add_(0, yl, h) / counts[:, None]
    centred = h - means[yl]
    cov = centred.t() @ centred / len(h)
    cov += ridge * cov.diagonal().mean().clamp_min(1e-12) * torch.eye(h.shape[1], dtype=torch.float64, device=h.device)
    proj = torch.linalg.solve(cov, means.t()).t()  # (k, d) = m_c^T S^-1
    bias = -0.5 * (proj * means).sum(1) + (counts / counts.sum()).log()
    head.weight.copy_(proj.to(head.weight.dtype))
    head.bias.copy_(bias.to(head.bias.dtype))
