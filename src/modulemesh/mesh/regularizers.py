"""Routing regularizers and the specialization score.

Why not the seeds' L1 sparsity penalty: sum_i |w_i| over softmax weights is always exactly 1, so
its gradient is zero and it does nothing. ``routing_entropy`` (mean entropy of w(x)) is minimal
exactly when each input uses one expert, so it is the sparsity term that acts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_given_expert(weights: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """p(c | E_i) = sum_x w_i(x) 1[y=c] / sum_x w_i(x); (E, C), rows of unused experts are 0."""
    mass = weights.t() @ F.one_hot(targets, num_classes).to(weights.dtype)  # (E, C)
    return mass / mass.sum(1, keepdim=True).clamp_min(1e-12)


def specialization_scores(weights: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Seed 001: S(E_i) = -sum_c p(c|E_i) log p(c|E_i) per expert (nats); lower = more specialized."""
    p = class_given_expert(weights, targets, num_classes)
    return -(p * p.clamp_min(1e-12).log()).sum(1)


def specialization_loss(weights: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Sum over experts that received any weight of S(E_i) (differentiable in the weights)."""
    used = weights.sum(0) > 0
    return specialization_scores(weights, targets, num_classes)[used].sum()


def load_balance_loss(weights: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance term E * sum_i f_i * P_i (1.0 when perfectly balanced).

    f_i: fraction of inputs whose top expert is i (no gradient); P_i: mean weight of expert i.
    """
    e = weights.shape[1]
    f = F.one_hot(weights.argmax(1), e).to(weights.dtype).mean(0)
    return e * (f * weights.mean(0)).sum()


def routing_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the routing distribution: 0 when every input uses a single expert."""
    return -(weights * weights.clamp_min(1e-12).log()).sum(1).mean()
