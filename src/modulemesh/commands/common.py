"""Pieces the commands share: the output-directory guard, progress bars, result tables, the default config."""

from __future__ import annotations

import os
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any, Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..runner import Callbacks


def default_config_path() -> str:
    return str(files("modulemesh") / "configs" / "default.yaml")


# ---------------------------------------------------------------- one writer per --out

_held: dict[str, Any] = {}  # absolute --out -> its OutputLock, for the command now running in this process
_scope: dict[str, str | None] = {"command": None}  # the running CLI command line; None outside the CLI


@contextmanager
def command_scope(args: Any, argv: Sequence[str]) -> Iterator[None]:
    """Around one CLI command: lock its ``--out`` (when given) and release every lock it took on the way out;
    old outputs that ``--overwrite`` set aside (``io.set_aside``) are deleted on success, restored on failure.

    Commands whose default ``--out`` depends on the config (run, compare) call :func:`claim_out` once they know it.
    """
    from ..io import overwrite_transaction

    _scope["command"] = " ".join(["modulemesh", *argv])
    try:
        refuse_empty_paths(args)
        if getattr(args, "out", None):
            claim_out(args.out)
        remove_old_cache_temps()
        with overwrite_transaction():  # what --overwrite set aside comes back if the command fails
            yield
    finally:
        _scope["command"] = None
        while _held:
            _held.popitem()[1].release()


def running_command() -> str | None:
    """The CLI command line now running (for files that say how they were made); None outside the CLI."""
    return _scope["command"]


PATH_ARGUMENTS = {
    "config": "the config path",
    "out": "--out",
    "old": "--from",
    "new": "--to",
    "train_teacher": "--train-teacher",
    "teacher": "--teacher",
}


def refuse_empty_paths(args: Any) -> None:
    """``modulemesh run ""`` (an unset shell variable) must not fall back to the defaults or write into ``.``."""
    from ..errors import ConfigError

    for dest, flag in PATH_ARGUMENTS.items():
        value = getattr(args, dest, None)
        if value is not None and not str(value).strip():
            raise ConfigError(
                f"{flag} is empty (an unset shell variable?); give a path, or leave it out for the default"
            )


def remove_old_cache_temps(age_s: float = 3600.0) -> None:
    """Temporary files a killed process left in the shared data cache; an hour old, no live writer owns them."""
    from ..data.cache import cache_dir
    from ..io import stale_temp_files

    for tmp in stale_temp_files(cache_dir(), older_than_s=age_s):
        tmp.unlink(missing_ok=True)


def claim_out(out: str | os.PathLike) -> Path:
    """Lock ``out`` for this command (idempotent); refuses an ``out`` that is a file or that another process writes.

    Also removes the ``.*.tmp`` files a killed writer left in it. Outside the CLI (library use) this is a no-op
    beyond the file check, so scripts that call the runners directly stay lock-free.
    """
    from ..io import OutputLock, check_output_path

    check_output_path(out)
    key = os.path.abspath(out)
    if key not in _held and _scope["command"]:
        _held[key] = OutputLock(out, _scope["command"]).acquire()
    return Path(out)


def step_bars(console: Console, disable: bool = False):
    """A rich ``Progress`` and ``bar(label, total)``, which adds a bar and returns its per-step callback
    (updated every 10 steps to keep drawing cheap): the ``progress=`` hook of upgrade and m2mkd."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
    )

    def bar(label: str, total: int):
        task = progress.add_task(label, total=max(total, 1))
        if total == 0:
            progress.update(task, completed=1)

        def step(i: int) -> None:
            if i % 10 == 0 or i == total:
                progress.update(task, completed=i)

        return step

    return progress, bar


class ProgressCallbacks(Callbacks):
    """One progress bar per task, updated every few steps to keep drawing cheap."""

    def __init__(self, console: Console, disable: bool = False):
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            disable=disable,
        )
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
        (
            "task-id / within-expert per task (%)",
            " ".join(
                f"{_pct(a)}/{_pct(b)}"
                for a, b in zip(
                    m.get("task_id_accuracy_per_task") or [],
                    m.get("within_expert_accuracy_per_task") or [None] * m["num_tasks"],
                )
            ),
        ),
        ("bytes kept (params + router state + strategy state)", f"{m['total_bytes']:,}" if "total_bytes" in m else "—"),
        ("final accuracy per task (%)", " ".join(f"{a:.1f}" for a in m["final_accuracies"])),
        ("params trained per task", " ".join(f"{p:,}" for p in m["params_trained_per_task"])),
        ("total parameters (+ router state)", f"{m['total_parameters']:,} (+ {m.get('router_state_elements', 0):,})"),
        ("training FLOPs", f"{m['flops']:.3g}"),
        ("inference FLOPs / sample", f"{m['inference_flops_per_sample']:.3g}"),
        (
            "expert FLOPs / sample (experts run)",
            f"{m['expert_flops_per_sample']:.3g} ({m['experts_run_per_sample']:.2f})"
            if "expert_flops_per_sample" in m
            else "—",
        ),
        ("specialization (nats)", " ".join(f"{v:.2f}" for v in m["specialization"].values())),
        ("wall time (s)", f"{m['wall_time_s']:.1f}"),
        ("peak memory (MB)", f"{m['peak_memory_mb']:.0f}"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t
