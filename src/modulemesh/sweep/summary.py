"""Statistics of a sweep (mean and sample std over seeds per strategy) and their CSV / markdown tables."""

from __future__ import annotations

COLUMNS = [  # (csv key, metrics.json key, table header, format)
    ("average_accuracy", "average_accuracy", "avg acc (%)", ".2f"),
    ("forgetting", "forgetting", "forgetting (%)", ".2f"),
    ("task_id_accuracy", "task_id_accuracy", "task-id acc (%)", ".2f"),
    ("within_expert_accuracy", "within_expert_accuracy", "within-expert acc (%)", ".2f"),
    ("bwt", "bwt", "BWT (%)", ".2f"),
    ("fwt", "fwt", "FWT (%)", ".2f"),
    ("params_trained_per_task", "params_trained_per_task", "params trained / task", ",.0f"),
    ("total_bytes", "total_bytes", "bytes kept", ",.0f"),
    ("flops", "flops", "train FLOPs", ".3g"),
    ("wall_time_s", "wall_time_s", "wall time (s)", ".1f"),
]


def summarize_runs(results: dict[str, list[dict]]) -> list[dict]:
    """One row per strategy: mean and sample std over seeds of each column."""
    import numpy as np

    rows = []
    for s, ms in results.items():
        row = {"strategy": s, "seeds": len(ms)}
        for key, mkey, _, _ in COLUMNS:
            # NaN where a run has no such value (no within-expert accuracy for arms without experts).
            vals = np.array([float(np.mean(m[mkey])) if m.get(mkey) is not None else np.nan for m in ms], dtype=float)
            row[f"{key}_mean"] = float(vals.mean())
            row[f"{key}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        curves = np.array([[np.mean(r[: i + 1]) for i, r in enumerate(m["accuracy_matrix"])] for m in ms], dtype=float)
        row["seen_accuracy_curve"] = curves.mean(0).tolist()
        rows.append(row)
    return rows


def to_csv(rows: list[dict]) -> str:
    import csv
    import io

    fields = ["strategy", "seeds"] + [f"{k}_{s}" for k, *_ in COLUMNS for s in ("mean", "std")]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def cell(r: dict, key: str, fmt: str) -> str:
    if r[f"{key}_mean"] != r[f"{key}_mean"]:  # NaN: not applicable to this arm
        return "—"
    return f"{format(r[f'{key}_mean'], fmt)} ± {format(r[f'{key}_std'], fmt)}"


def to_markdown(rows: list[dict], title: str) -> str:
    head = ["strategy", "seeds"] + [h for _, _, h, _ in COLUMNS]
    lines = [
        f"# {title}",
        "",
        "mean ± std over seeds (sample std; 0 with one seed)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * len(COLUMNS)) + "|",
    ]
    for r in rows:
        lines.append(
            "| " + " | ".join([r["strategy"], str(r["seeds"])] + [cell(r, k, f) for k, _, _, f in COLUMNS]) + " |"
        )
    return "\n".join(lines) + "\n"
