"""Pieces the commands share: progress bars, result tables, the built-in default config."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..runner import Callbacks


def default_config_path() -> str:
    return str(files("modulemesh") / "configs" / "default.yaml")


class ProgressCallbacks(Callbacks):
    """One progress bar per task, updated every few steps to keep drawing cheap."""

    def __init__(self, console: Console, disable: bool = False):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console, disable=disable)
        self.bar = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def task_start(self, task_index: int, num_tasks: int, total_steps: int) -> None:
        self.bar = self.progress.add_task(f"task {task_index + 1}/{num_tasks}", total=total_steps, info="")

    def step(self, step: int, total: int) -> None:
        if step % 20 == 0 or step == total:
            self.progress.update(self.bar, completed=step)

    def task_end(self, task_index: int, accuracies: list[float]) -> None:
        if self.bar is None:  # a task that trained nothing (e.g. the router-only arm) never started a bar
            self.bar = self.progress.add_task(f"task {task_index + 1}", total=0, info="")
        seen = accuracies[: task_index + 1]
        self.progress.update(self.bar, info=f"mean acc on seen tasks {sum(seen) / len(seen):.1f}%")


def _pct(v) -> str:
    return "—" if v is None else f"{v:.1f}"


def results_table(m: dict[str, Any]) -> Table:
    t = Table(title=f"{m['strategy']} on {m['dataset']} ({m['scenario']}, {m['num_tasks']} tasks, seed {m['seed']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("average accuracy (%)", f"{m['average_accuracy']:.2f}"),
        ("forgetting (%)", f"{m['forgetting']:.2f}"),
        ("BWT (%)", f"{m['bwt']:.2f}"),
        ("FWT (%)", f"{m['fwt']:.2f}"),
        ("task-id accuracy (%)", _pct(m.get("task_id_accuracy"))),
        ("within-expert accuracy (%)", _pct(m.get("within_expert_accuracy"))),
        ("task-id / within-expert per task (%)", " ".join(f"{_pct(a)}/{_pct(b)}" for a, b in zip(
            m.get("task_id_accuracy_per_task") or [], m.get("within_expert_accuracy_per_task") or [None] * m["num_tasks"]))),
        ("bytes kept (params + router state + strategy state)", f"{m['total_bytes']:,}" if "total_bytes" in m else "—"),
        ("final accuracy per task (%)", " ".join(f"{a:.1f}" for a in m["final_accuracies"])),
        ("params trained per task", " ".join(f"{p:,}" for p in m["params_trained_per_task"])),
        ("total parameters (+ router state)", f"{m['total_parameters']:,} (+ {m.get('router_state_elements', 0):,})"),
        ("training FLOPs", f"{m['flops']:.3g}"),
        ("inference FLOPs / sample", f"{m['inference_flops_per_sample']:.3g}"),
        ("specialization (nats)", " ".join(f"{v:.2f}" for v in m["specialization"].values())),
        ("wall time (s)", f"{m['wall_time_s']:.1f}"),
        ("peak memory (MB)", f"{m['peak_memory_mb']:.0f}"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t
