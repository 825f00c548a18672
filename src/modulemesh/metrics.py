"""Continual-learning metrics from the accuracy matrix.

``R[i][j]`` is the accuracy (%) on task j after training task i, for every i and j (later tasks
are evaluated too, which forward transfer needs). ``b[j]`` is the accuracy of a randomly
initialized model on task j. Definitions follow Lopez-Paz & Ranzato 2017 (BWT, FWT) and
Chaudhry et al. 2018 (forgetting).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _matrix(R: Sequence[Sequence[float]]) -> np.ndarray:
    m = np.asarray(R, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square T x T with T >= 1, got shape {m.shape}")
    return m


def average_accuracy(R) -> float:
    """Mean accuracy over all tasks after the last one: (1/T) sum_j R[T-1][j]."""
    m = _matrix(R)
    return float(m[-1].mean())


def average_incremental_accuracy(R) -> float:
    """Mean over steps i of the mean accuracy on tasks seen so far (tasks 0..i)."""
    m = _matrix(R)
    return float(np.mean([m[i, : i + 1].mean() for i in range(len(m))]))


def forgetting(R) -> float:
    """Mean over tasks j < T-1 of (max_{j <= l < T-1} R[l][j]) - R[T-1][j]; 0 for one task."""
    m = _matrix(R)
    t = len(m)
    if t < 2:
        return 0.0
    return float(np.mean([m[j : t - 1, j].max() - m[-1, j] for j in range(t - 1)]))


def backward_transfer(R) -> float:
    """BWT = mean over j < T-1 of R[T-1][j] - R[j][j] (negative = forgetting)."""
    m = _matrix(R)
    t = len(m)
    if t < 2:
        return 0.0
    return float(np.mean([m[-1, j] - m[j, j] for j in range(t - 1)]))


def forward_transfer(R, b: Sequence[float]) -> float:
    """FWT = mean over j >= 1 of R[j-1][j] - b[j]: accuracy on a task before training it, vs random init."""
    m = _matrix(R)
    t = len(m)
    if len(b) != t:
        raise ValueError(f"need one reference accuracy per task ({t}), got {len(b)}")
    if t < 2:
        return 0.0
    return float(np.mean([m[j - 1, j] - b[j] for j in range(1, t)]))


def summarize(R, b: Sequence[float]) -> dict[str, float]:
    return {
        "average_accuracy": average_accuracy(R),
        "average_incremental_accuracy": average_incremental_accuracy(R),
        "forgetting": forgetting(R),
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R, b),
    }
