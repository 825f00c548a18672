"""Membership-inference attacks with power: a loss attack calibrated per example (offline LiRA).

A plain loss attack (Yeom et al. 2018) says "member" when an example's loss is low; it has little
power because easy examples have low loss whether or not they were trained on. Offline LiRA
(Carlini et al. 2022, "Membership Inference Attacks From First Principles", sec. 4 and the
fixed-variance variant) calibrates each example by how confident *reference* models are on it when
they did not train on it:

    phi(x, y)  = log p(y|x) - log(1 - p(y|x))                   (logit-scaled confidence)
    score(x,y) = (phi_target(x, y) - mean_k phi_k(x, y)) / sigma  (sigma: one std over all examples)

where the reference models k are trained like the target on data drawn from the same population
that excludes the examples under test. A higher score means "member". The attack's power is the
ROC AUC of these scores between members and non-members (0.5: no information).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from ..data.scenarios import as_float
from ..errors import DataError

LogProbs = Callable[[torch.Tensor], torch.Tensor]  # inputs (float) -> (N, C) log-probabilities


@torch.no_grad()
def log_confidence(log_probs_fn: LogProbs, x: torch.Tensor, y: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    """phi = log p(y|x) - log(1 - p(y|x)) per example, computed stably in log space."""
    out = []
    for i in range(0, len(y), batch):
        lp = log_probs_fn(as_float(x[i : i + batch])).float().log_softmax(1)
        true = lp.gather(1, y[i : i + batch, None]).squeeze(1).clamp_max(-1e-7)
        out.append(true - torch.log(-torch.expm1(true)))
    return torch.cat(out) if out else torch.zeros(0)


def loss_scores(log_probs_fn: LogProbs, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The uncalibrated loss attack's scores (higher = member): phi itself, a monotone map of -loss."""
    return log_confidence(log_probs_fn, x, y)


def reference_confidences(references: Sequence[LogProbs], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(K, N) phi of each reference model on each example."""
    if not references:
        raise DataError("the calibrated attack needs at least one reference model")
    return torch.stack([log_confidence(r, x, y) for r in references])


def calibrated_scores(target_phi: torch.Tensor, reference_phi: torch.Tensor) -> torch.Tensor:
    """Offline LiRA with a fixed (global) variance: (phi - mean over references) / sigma."""
    mu = reference_phi.mean(0)
    sigma = (reference_phi - mu).std() if reference_phi.shape[0] > 1 else reference_phi.std()
    return (target_phi - mu) / sigma.clamp_min(1e-6)


def membership_auc(member_scores: torch.Tensor | np.ndarray, non_member_scores: torch.Tensor | np.ndarray) -> float:
    """ROC AUC of scores (higher = member); ties count one half (0.5 for a model that leaks nothing)."""
    pos = np.asarray(member_scores, dtype=np.float64).ravel()
    neg = np.asarray(non_member_scores, dtype=np.float64).ravel()
    if len(pos) == 0 or len(neg) == 0:
        raise DataError("membership AUC needs at least one member and one non-member example")
    labels = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    return float(roc_auc_score(labels, np.concatenate([pos, neg])))


def train_reference_models(
    train: Callable[[torch.Tensor, torch.Tensor, int], LogProbs],
    x: torch.Tensor,
    y: torch.Tensor,
    k: int,
    size: int,
    seed: int = 0,
) -> list[LogProbs]:
    """``k`` reference models, each ``train(x_subset, y_subset, seed)`` on a random ``size``-subset of
    the population (x, y), which must exclude every example the attack will be asked about."""
    if size > len(y):
        raise DataError(f"reference models need {size} population examples each, only {len(y)} are available")
    g = torch.Generator().manual_seed(seed)
    models = []
    for i in range(k):
        idx = torch.randperm(len(y), generator=g)[:size]
        models.append(train(x[idx], y[idx], seed + 1 + i))
    return models
