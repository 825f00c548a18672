"""Sweeps: several strategies x seeds on one config (``modulemesh compare`` and the continual benchmark).

``plan`` builds and validates every run's config, ``execute`` trains them (in worker processes with
``jobs > 1``), ``summary`` turns their metrics into mean ± std rows and CSV/markdown tables,
``plots`` draws them; ``run_sweep`` does all of it into one output directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .execute import execute, run_in_worker, split_finished
from .plan import finished_metrics, parse_strategies, plan_runs
from .summary import COLUMNS, cell, summarize_runs, to_csv, to_markdown

OUTPUT_FILES = ("results.csv", "results.md", "results.json", "accuracy_vs_forgetting.png", "seen_accuracy.png")


@dataclass
class SweepResult:
    out: Path
    title: str
    rows: list[dict]


def run_sweep(
    runs: list[tuple[str, int, Any]],
    out: Path,
    jobs: int = 1,
    on_start: Optional[Callable[[int, int], None]] = None,
    on_result: Optional[Callable[[str, int, dict], None]] = None,
    callbacks_for: Optional[Callable[[tuple[str, int]], Any]] = None,
) -> SweepResult:
    """Train ``runs`` (from ``plan_runs``) into ``out/<strategy>/seed<k>/``, skipping finished ones, and
    write the summary files (``OUTPUT_FILES``). ``on_start(total, already_finished)`` is called once;
    ``on_result(strategy, seed, metrics)`` after each trained run."""
    from ..io import atomic_write_json, atomic_write_text
    from .plots import plot_seen_accuracy, plot_tradeoff

    strategies = list(dict.fromkeys(s for s, _, _ in runs))
    planned = [((s, seed), cfg, out / s / f"seed{seed}") for s, seed, cfg in runs]
    results, todo = split_finished(planned)
    if on_start:
        on_start(len(runs), len(runs) - len(todo))

    def finish(key, m):
        results[key] = m
        if on_result:
            on_result(*key, m)

    execute(todo, jobs, finish, callbacks_for=callbacks_for)
    ordered = {s: [results[k] for k in sorted(results) if k[0] == s] for s in strategies}
    rows = summarize_runs(ordered)
    first = runs[0][2]
    title = (
        f"{first.data.name}, {first.scenario.kind}, {first.scenario.n_tasks} tasks, buffer {first.strategy.buffer_size}"
    )
    atomic_write_text(out / "results.csv", to_csv(rows))
    atomic_write_text(out / "results.md", to_markdown(rows, title))
    atomic_write_json(out / "results.json", {"title": title, "rows": rows})
    plot_tradeoff(rows, out / "accuracy_vs_forgetting.png")
    plot_seen_accuracy(rows, out / "seen_accuracy.png")
    return SweepResult(out, title, rows)


__all__ = [
    "run_sweep",
    "SweepResult",
    "OUTPUT_FILES",
    "plan_runs",
    "parse_strategies",
    "finished_metrics",
    "execute",
    "run_in_worker",
    "split_finished",
    "summarize_runs",
    "to_csv",
    "to_markdown",
    "COLUMNS",
    "cell",
]
