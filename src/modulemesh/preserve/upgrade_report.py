"""The report of ``modulemesh upgrade``: a markdown/CSV/JSON summary and the accuracy-vs-steps plot."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Optional

from ..io import atomic_save, atomic_write_json, atomic_write_text
from ..tables import markdown_table

# One colour per arm in every report (the order of upgrade.ARMS).
ARM_ORDER = ("random", "kd", "transfer", "transfer_kd")


def _fmt_steps(v: Optional[int], budget: int) -> str:
    return f"> {budget}" if v is None else str(v)


def results_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    budget = summary["config"]["train"]["steps"]
    rows = []
    for arm, r in summary["arms"].items():
        rows.append(
            {
                "arm": r["label"],
                "accuracy at init": f"{r['init_accuracy']:.2%}",
                "final accuracy": f"{r['final_accuracy']:.2%}",
                f"steps to {summary['target_fraction']:.0%} of old": _fmt_steps(r["steps_to_target"], budget),
                "steps vs (b)": "-" if r.get("steps_ratio_vs_kd") is None else f"{r['steps_ratio_vs_kd']:.2f}",
            }
        )
    return rows


def write_report(out: Path, summary: dict[str, Any], transfer_md: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    old, new = summary["old_model"], summary["new_model"]
    md = [
        f"# Upgrade report: {summary['data']}\n",
        f"Old model: `{json.dumps(old['backbone'])}` ({old['num_parameters']:,} parameters), accuracy "
        f"{old['accuracy']:.2%} "
        f"on {summary['eval_examples']} test examples.  ",
        f"New model: `{json.dumps(new['backbone'])}` ({new['num_parameters']:,} parameters). Target: "
        f"{summary['target_fraction']:.0%} of the old "
        f"model's accuracy = {summary['target_accuracy']:.2%}.  ",
        f"{summary['config']['train']['steps']} steps per arm, batch {summary['config']['train']['batch_size']}, "
        "accuracy every "
        f"{summary['config']['train']['eval_every']} steps; seed {summary['seed']}.\n",
        "## Accuracy\n",
        markdown_table(results_rows(summary)),
        "\n## Transfer (per layer of the new model)\n",
        transfer_md,
        f"\nFisher: {summary['fisher']['kind']}, {summary['fisher']['samples']} training examples, "
        f"{summary['fisher']['seconds']} s.\n",
    ]
    atomic_write_text(out / "report.md", "\n".join(md))
    atomic_write_json(out / "report.json", summary)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["arm", "step", "accuracy"])
    for arm, r in summary["arms"].items():
        for p in r["curve"]:
            w.writerow([arm, p["step"], f"{p['accuracy']:.6f}"])
    atomic_write_text(out / "results.csv", buf.getvalue())

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, r in summary["arms"].items():
        ax.plot(
            [p["step"] for p in r["curve"]],
            [100 * p["accuracy"] for p in r["curve"]],
            label=r["label"],
            marker=".",
            markersize=3,
            color=f"C{ARM_ORDER.index(arm)}",
        )
    ax.axhline(100 * old["accuracy"], color="black", linestyle="--", linewidth=1, label="old model")
    ax.axhline(
        100 * summary["target_accuracy"],
        color="grey",
        linestyle=":",
        linewidth=1,
        label=f"{summary['target_fraction']:.0%} of old",
    )
    ax.set_xlabel("training steps")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Upgrade on {summary['data']}: accuracy vs steps")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_save(out / "accuracy_vs_steps.png", lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
