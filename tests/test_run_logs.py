"""Watchable logs: OUT/log.csv always, TensorBoard event files with --log tensorboard."""

import csv

import pytest

from modulemesh.cli import main
from modulemesh.errors import ConfigError
from modulemesh.training.loggers import RunLog, parse_log_kinds


def rows(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_run_writes_loss_and_accuracy_to_csv_and_tensorboard(tmp_path):
    out = tmp_path / "out"
    code = main(
        [
            "run",
            "--set",
            "data.name=digits",
            "--set",
            "scenario.n_tasks=3",
            "--set",
            "train.count_flops=false",
            "--out",
            str(out),
            "--quiet",
            "--log",
            "csv,tensorboard",
        ]
    )
    assert code == 0
    log = rows(out / "log.csv")
    loss = [r for r in log if r["tag"] == "train/loss"]
    steps = [int(r["step"]) for r in loss]
    assert steps == sorted(steps) and len(set(steps)) == len(steps) and len(loss) >= 6
    assert {r["task"] for r in loss} == {"0", "1", "2"}
    assert all(float(r["value"]) > 0 for r in loss)
    acc = [r for r in log if r["tag"].startswith("accuracy/task")]
    assert len(acc) == 1 + 2 + 3  # after task i: accuracy on tasks 0..i
    seen = [float(r["value"]) for r in log if r["tag"] == "accuracy/seen_mean"]
    assert len(seen) == 3 and all(0 < v <= 100 for v in seen)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == steps
    assert [round(e.value, 3) for e in events.Scalars("accuracy/seen_mean")] == [round(v, 3) for v in seen]


def test_a_resumed_log_drops_the_rows_of_the_unfinished_task(tmp_path):
    log = RunLog(tmp_path)
    for task in range(3):
        log.scalar("train/loss", 1.0, task * 10 + 5, task)
        log.task_end(task, task * 10 + 10, [90.0] * (task + 1))
    log.close()
    again = RunLog(tmp_path, keep_tasks=2)  # task 2 had not been checkpointed
    again.close()
    assert {r["task"] for r in rows(tmp_path / "log.csv")} == {"0", "1"}
    fresh = RunLog(tmp_path)  # a run that starts over starts an empty log
    fresh.close()
    assert rows(tmp_path / "log.csv") == []


def test_log_kinds_are_checked():
    assert parse_log_kinds("csv") == ("csv",) and parse_log_kinds("none") == ()
    assert parse_log_kinds("tensorboard,csv") == ("tensorboard", "csv")
    with pytest.raises(ConfigError, match="unknown --log kind 'wandb'"):
        parse_log_kinds("csv,wandb")
