"""Paper-ready matplotlib figures of a run's results (PNG, written atomically)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .io import atomic_save  # noqa: E402


def save_figure(fig, path: str | os.PathLike) -> Path:
    out = atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=150, bbox_inches="tight", format="png"))
    plt.close(fig)
    return out


def _heatmap(ax, m: np.ndarray, fmt: str, cmap: str, vmin=None, vmax=None):
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    if m.size <= 400:
        for (i, j), v in np.ndenumerate(m):
            ax.text(
                j,
                i,
                format(v, fmt),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if (vmax is not None and v < (vmin + vmax) / 2) else "black",
            )
    return im


def accuracy_matrix_plot(R: Sequence[Sequence[float]], path, title: str = "Accuracy matrix") -> Path:
    m = np.asarray(R, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * m.shape[1], 0.8 + 0.5 * m.shape[0]))
    im = _heatmap(ax, m, ".1f", "viridis", 0, 100)
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task i")
    ax.set_xticks(range(m.shape[1]))
    ax.set_yticks(range(m.shape[0]))
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    return save_figure(fig, path)


def task_accuracy_plot(R: Sequence[Sequence[float]], path, title: str = "Accuracy of each task over time") -> Path:
    m = np.asarray(R, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = np.arange(m.shape[0])
    for j in range(m.shape[1]):
        ax.plot(steps[j:], m[j:, j], marker="o", label=f"task {j}")
    ax.plot(steps, [m[i, : i + 1].mean() for i in steps], "k--", lw=2, label="mean of seen tasks")
    ax.set_xlabel("after training task")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 101)
    ax.set_xticks(steps)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def routing_plot(
    routing: Sequence[Sequence[float]],
    expert_names: Sequence[str],
    path,
    title: str = "Mean routing weight (test data of each task)",
) -> Path:
    m = np.asarray(routing, dtype=float)
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * m.shape[1], 0.8 + 0.5 * m.shape[0]))
    im = _heatmap(ax, m, ".2f", "magma", 0, 1)
    ax.set_xticks(range(len(expert_names)))
    ax.set_xticklabels(expert_names, rotation=45, ha="right")
    ax.set_yticks(range(m.shape[0]))
    ax.set_xlabel("expert")
    ax.set_ylabel("task")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="weight")
    return save_figure(fig, path)
