"""The sweep's two plots: accuracy vs forgetting, and the average accuracy on the tasks seen so far."""

from __future__ import annotations


def plot_tradeoff(rows: list[dict], path) -> None:
    from ..plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        ax.errorbar(
            r["forgetting_mean"],
            r["average_accuracy_mean"],
            xerr=r["forgetting_std"],
            yerr=r["average_accuracy_std"],
            fmt="o",
            capsize=3,
            label=r["strategy"],
        )
        ax.annotate(
            r["strategy"],
            (r["forgetting_mean"], r["average_accuracy_mean"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    ax.set_xlabel("forgetting (%)  (lower is better)")
    ax.set_ylabel("average accuracy (%)  (higher is better)")
    ax.set_title("Accuracy vs forgetting (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_seen_accuracy(rows: list[dict], path) -> None:
    from ..plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        curve = r["seen_accuracy_curve"]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=r["strategy"])
    ax.set_xlabel("after training task")
    ax.set_ylabel("average accuracy on seen tasks (%)")
    ax.set_ylim(0, 101)
    ax.set_title("Average accuracy on the tasks seen so far")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
