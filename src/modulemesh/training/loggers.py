"""Logs a user can watch while a run goes: a CSV of scalars, and TensorBoard event files on request.

One long-format CSV per run (``OUT/log.csv``: wall_time, step, task, tag, value), so any tool can
plot it (``pandas.read_csv(...).pivot_table(index="step", columns="tag")``). The training loss goes
in every ``log_every`` steps (reading it costs a host-device sync, so not every step), each task's
accuracy after every task. ``tensorboard`` adds the same scalars to ``OUT/tensorboard/`` through
``torch.utils.tensorboard`` (needs the ``tensorboard`` package: ``pip install modulemesh[tensorboard]``).

A resumed run first drops the rows of tasks that had not finished, so the log reads as if the run
had never stopped.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Optional, Sequence

from ..errors import ConfigError
from ..io import atomic_write_text

LOG_KINDS = ("csv", "tensorboard")
COLUMNS = ["wall_time", "step", "task", "tag", "value"]


def parse_log_kinds(spec: Optional[str | Sequence[str]]) -> tuple[str, ...]:
    """``"csv,tensorboard"`` -> ("csv", "tensorboard"); ``none`` -> (); unknown kinds are refused."""
    if spec is None:
        return ("csv",)
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if items == ["none"]:
        return ()
    bad = [s for s in items if s not in LOG_KINDS]
    if bad:
        raise ConfigError(f"unknown --log kind {bad[0]!r}; use a comma list of {', '.join(LOG_KINDS)}, or none")
    if "tensorboard" in items:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--log tensorboard needs the tensorboard package: pip install 'modulemesh[tensorboard]'"
            ) from None
    return tuple(dict.fromkeys(items))


class RunLog:
    def __init__(self, out: Path, kinds: Sequence[str] = ("csv",), keep_tasks: int = 0, resume_step: int = 0):
        self.kinds = tuple(kinds)
        self.path = Path(out) / "log.csv"
        self.start = time.time()
        self._file = self._writer = self._tb = None
        if "csv" in self.kinds:
            self._open_csv(keep_tasks)
        if "tensorboard" in self.kinds:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events an interrupted task wrote past the resume point.
            self._tb = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=resume_step if keep_tasks else None)

    def _open_csv(self, keep_tasks: int) -> None:
        kept: list[dict[str, str]] = []
        if keep_tasks and self.path.exists():
            with self.path.open(newline="") as f:
                kept = [r for r in csv.DictReader(f) if r.get("task", "").isdigit() and int(r["task"]) < keep_tasks]
        lines = [",".join(COLUMNS)] + [",".join(r[c] for c in COLUMNS) for r in kept]
        atomic_write_text(self.path, "\n".join(lines) + "\n")
        self._file = self.path.open("a", newline="")
        self._writer = csv.writer(self._file)

    def scalar(self, tag: str, value: float, step: int, task: int) -> None:
        if self._writer is not None:
            self._writer.writerow([f"{time.time() - self.start:.3f}", step, task, tag, f"{value:.6g}"])
        if self._tb is not None:
            self._tb.add_scalar(tag, value, step)

    def task_end(self, task: int, step: int, accuracies: Sequence[float]) -> None:
        """Accuracy on every task so far after training ``task``; then flush so a watcher sees it."""
        seen = accuracies[: task + 1]
        for j, a in enumerate(seen):
            self.scalar(f"accuracy/task{j}", a, step, task)
        self.scalar("accuracy/seen_mean", sum(seen) / len(seen), step, task)
        self.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = self._writer = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
