"""``compare --tune``: one small grid per strategy, chosen on the validation split, then every seed.

For each strategy every grid point is trained on the first seed (``plan_runs`` with the point as that
strategy's own overrides, so it wins over the file's ``per_strategy`` block) and scored by
``validation_average_accuracy`` (the final mesh on each task's held-out validation rows, written
by ``runner``); the test split is never read for the choice. The chosen point's run is copied to the
strategy's ``seed<k>`` directory, so the sweep that follows reads it back instead of training it
twice. Runs live in ``OUT/tune/<strategy>/<point>/seed<k>/`` and are read back when finished, so an
interrupted tuning continues where it stopped. A point whose training fails (``TrainingError``: the
loss became NaN/inf) stays in the table as failed and is never chosen; a strategy none of whose points
trained stops the command with one line.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import Any

# Keys a grid may not touch: they change the data, the split the choice is made on, or the seeds.
FORBIDDEN = ("name", "seed", "device", "data", "scenario")
TUNABLE = ("train", "strategy", "expert", "router")


def split_values(text: str) -> list[str]:
    """'0.01,0.1' -> ['0.01', '0.1']; commas inside brackets stay ('[20,20],[50,50]' is two values)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{(" and 1 or (-1 if ch in "]})" else 0)
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def parse_tune(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``['train.lr=0.01,0.1', 'train.batch_size=10,32']`` -> [(key, values)], validated."""
    from ..config import parse_overrides
    from ..errors import ConfigError

    grid: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, eq, text = spec.partition("=")
        key = key.strip()
        values = [v for v in split_values(text) if v] if eq else []
        if not key or not values:
            raise ConfigError(
                f"--tune {spec!r} needs KEY=V1,V2,... with at least one value, e.g. --tune train.lr=0.03,0.1"
            )
        section = key.split(".", 1)[0]
        if section in FORBIDDEN or section not in TUNABLE or "." not in key:
            raise ConfigError(
                f"--tune cannot vary {key!r}: only keys under {', '.join(TUNABLE)} (e.g. train.lr) are tuned; "
                "data, scenario and seeds stay fixed so every point is scored on the same validation split"
            )
        if key in (k for k, _ in grid):
            raise ConfigError(f"--tune {key} is given twice; list all its values once: --tune {key}=V1,V2,...")
        if len(set(values)) != len(values):
            raise ConfigError(f"--tune {key} repeats a value ({text}); list each value once")
        for v in values:
            parse_overrides([f"{key}={v}"])  # a value YAML cannot read is refused here, before anything runs
        grid.append((key, values))
    return grid


def points(grid: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Every combination, in the order given (the first listed value varies slowest)."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in grid))]


def point_name(point: dict[str, str]) -> str:
    """A directory-safe name of one grid point: 'train.lr=0.1,train.batch_size=32'."""
    text = ",".join(f"{k}={v}" for k, v in point.items())
    return "".join(c if c.isalnum() or c in "._=,-" else "_" for c in text)


def as_overrides(strategy: str, point: dict[str, str]) -> list[str]:
    """The point as ``--set`` overrides of this strategy only (strategy.X keys become its own settings)."""
    return [f"{strategy}.{k.removeprefix('strategy.')}={v}" for k, v in point.items()]


def check_conflicts(grid: list[tuple[str, list[str]]], overrides: list[str], strategies: list[str]) -> None:
    """A key both tuned and fixed by --set is ambiguous: refuse it."""
    from ..errors import ConfigError

    for pair in overrides:
        key = pair.split("=", 1)[0].strip()
        head, _, rest = key.partition(".")
        for tuned, _ in grid:
            if key == tuned or (head in strategies and rest in (tuned, tuned.removeprefix("strategy."))):
                raise ConfigError(f"--set {key} fixes a key that --tune {tuned} varies; drop one of the two")


def plan_tuning(config, overrides, strategies, grid, device) -> list[tuple[str, dict, Any]]:
    """[(strategy, point, ExperimentConfig of the first seed)] for every strategy x point, all validated."""
    from ..errors import ConfigError
    from .plan import plan_runs

    check_conflicts(grid, overrides, strategies)
    plan = []
    for s in strategies:
        for p in points(grid):
            (_, _, cfg), *_ = plan_runs(config, overrides + as_overrides(s, p), [s], 1, device)
            if cfg.scenario.val_fraction <= 0:
                raise ConfigError(
                    "--tune chooses on the validation split, but scenario.val_fraction is 0; set it above 0 "
                    "(e.g. --set scenario.val_fraction=0.1)"
                )
            plan.append((s, p, cfg))
    return plan


def tuning_dir(out: Path, strategy: str, point: dict[str, str], seed: int) -> Path:
    return out / "tune" / strategy / point_name(point) / f"seed{seed}"


def choose(plan, results: dict) -> dict[str, dict]:
    """Per strategy: every point's validation accuracy and the chosen point (the highest; ties: the first listed)."""
    from ..errors import ConfigError

    table: dict[str, dict] = {}
    for s, p, cfg in plan:
        m = results[(s, point_name(p))]
        entry = table.setdefault(s, {"grid": [], "seed": cfg.seed})
        if "failed" in m:  # diverged (NaN/inf loss): kept in the table, never chosen
            entry["grid"].append({"point": p, "validation_average_accuracy": None, "failed": m["failed"]})
            continue
        val = m.get("validation_average_accuracy")
        if val is None:
            raise ConfigError(
                f"the tuning run {s} {point_name(p)} has no validation accuracy (scenario.val_fraction is 0, or the "
                "run predates it); set scenario.val_fraction > 0, or use a new --out"
            )
        entry["grid"].append({"point": p, "validation_average_accuracy": val})
    for s, entry in table.items():
        ok = [g for g in entry["grid"] if g["validation_average_accuracy"] is not None]
        if not ok:
            raise ConfigError(
                f"every --tune point of {s} failed ({entry['grid'][0]['failed']}); add smaller values, e.g. a lower "
                "train.lr"
            )
        best = max(ok, key=lambda g: g["validation_average_accuracy"])  # max keeps the first of ties
        entry["chosen"] = best["point"]
        entry["chosen_validation_average_accuracy"] = best["validation_average_accuracy"]
    return table


def seed_chosen_runs(out: Path, table: dict[str, dict]) -> None:
    """Copy each chosen tuning run to ``OUT/<strategy>/seed<k>`` (the identical config), unless one is there."""
    for s, entry in table.items():
        src = tuning_dir(out, s, entry["chosen"], entry["seed"])
        dst = out / s / f"seed{entry['seed']}"
        if dst.exists():
            continue  # finished or partial: the sweep reads back or resumes it (finished_run checks the config)
        tmp = dst.with_name(dst.name + ".copying")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("checkpoint"))
        tmp.rename(dst)


def tuning_markdown(table: dict[str, dict], grid: list[tuple[str, list[str]]], command: str | None = None) -> str:
    keys = [k for k, _ in grid]
    lines = [
        "# Tuning grid (validation split)",
        "",
        *([f"Written by `{command}`.", ""] if command else []),
        "Average accuracy (%) of the final model on every task's validation rows (the scenario's val_fraction "
        "hold-out), first seed only; the chosen point (bold) then runs on every seed. The test split is not read.",
        "",
        "| strategy | " + " | ".join(keys) + " | val avg acc (%) | chosen |",
        "|---|" + "---:|" * len(keys) + "---:|---|",
    ]
    for s, entry in table.items():
        for g in entry["grid"]:
            mark = g["point"] == entry["chosen"]
            val = g["validation_average_accuracy"]
            acc = "failed (diverged)" if val is None else f"{val:.2f}"
            lines.append(
                f"| {s} | "
                + " | ".join(g["point"][k] for k in keys)
                + f" | {'**' + acc + '**' if mark else acc} | {'yes' if mark else ''} |"
            )
    return "\n".join(lines) + "\n"


def write_tuning(out: Path, table: dict[str, dict], grid, command: str | None = None) -> None:
    from ..io import atomic_write_json, atomic_write_text

    atomic_write_json(out / "tuning.json", {"command": command, "grid": dict(grid), "strategies": table})
    atomic_write_text(out / "tuning.md", tuning_markdown(table, grid, command))
