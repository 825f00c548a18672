"""``modulemesh compare``: several strategies x seeds on one config, one table and two plots.

Each run is ``runner.run_experiment`` into ``OUT/<strategy>/seed<k>/``. A run whose directory
already holds ``metrics.json`` for the same resolved config is read back instead of rerun, and a
run interrupted mid-way resumes from its checkpoint, so an interrupted compare is continued by
rerunning it with the same ``--out``. ``--jobs N`` trains independent runs in N worker processes
(spawn context, one torch thread each).

Overrides: ``--set key=value`` applies to every run; ``--set STRATEGY.key=value`` applies to one
strategy only (``--set der.alpha=0.2``, ``--set er.train.lr=0.1``): a key under a config section
(train, data, ...) goes there, any other key is a ``strategy:`` setting of that strategy.
"""

from __future__ import annotations

import argparse

SECTIONS = ("name", "seed", "device", "data", "scenario", "expert", "router", "strategy", "train")
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="experiment YAML (default: the built-in Split-MNIST experiment)")
    p.add_argument("--strategies", default="all", help="'all' or a comma-separated list, e.g. ewc,er,der (default: all)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per strategy: config seed, +1, ... (default: 3)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained in parallel worker processes (default: 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value for every run, or STRATEGY.KEY=VALUE for one strategy (repeatable)")
    p.add_argument("--out", default=None, help="results directory (default: runs/compare_<experiment name>)")
    p.add_argument("--device", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# ---------------------------------------------------------------- planning


def parse_strategies(text: str) -> list[str]:
    from ..errors import ConfigError
    from ..strategies import STRATEGIES

    if text.strip() == "all":
        return list(STRATEGIES)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise ConfigError(f"unknown strategy {', '.join(map(repr, unknown)) or '(none given)'} in --strategies; "
                          f"choose 'all' or from: {', '.join(STRATEGIES)}")
    return list(dict.fromkeys(names))


def plan_runs(config: str | None, overrides: list[str], strategies: list[str], seeds: int, device: str | None):
    """[(strategy, seed, ExperimentConfig)] for every run, validated before anything trains."""
    from ..config import PER_STRATEGY, ExperimentConfig, apply_per_strategy, deep_merge, parse_overrides, read_yaml, validate
    from ..errors import ConfigError
    from .common import default_config_path

    if seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    path = config or default_config_path()
    base = read_yaml(path)
    blocks = base.pop(PER_STRATEGY, None)  # the file's per-strategy settings (config.apply_per_strategy)
    shared, per = [], {s: [] for s in strategies}
    from ..strategies import STRATEGIES

    for pair in overrides:
        head = pair.split("=", 1)[0].split(".", 1)[0].strip()
        if "=" in pair and head in STRATEGIES and head not in SECTIONS:
            key, value = pair.split(".", 1)[1].split("=", 1)
            section = key.split(".", 1)[0]
            if head in per:
                per[head].append(f"{key}={value}" if section in SECTIONS else f"strategy.{key}={value}")
        else:
            shared.append(pair)
    shared_nested = parse_overrides(shared)
    common = deep_merge(base, shared_nested)
    file_strategy = dict(base.get("strategy") or {})
    first_seed = int(common.get("seed", 0) or 0)
    runs = []
    for s in strategies:
        per_nested = parse_overrides(per[s])
        data = deep_merge(common, per_nested)
        if blocks is not None:
            own = apply_per_strategy({**base, PER_STRATEGY: blocks}, s, source=str(path))
            data = deep_merge(deep_merge(own, shared_nested), per_nested)
            file_strategy = dict(own.get("strategy") or {})
        # The file's strategy-specific keys belong to the strategy the file names; buffer_size is shared.
        strategy = {k: v for k, v in file_strategy.items() if k == "buffer_size" or file_strategy.get("name") == s}
        strategy.update(shared_nested.get("strategy", {}))
        strategy.update(per_nested.get("strategy", {}))
        strategy["name"] = s
        data["strategy"] = strategy
        if device:
            data["device"] = device
        for k in range(seeds):
            cfg = validate(ExperimentConfig, {**data, "seed": first_seed + k}, source=f"{path} ({s})")
            STRATEGIES[s](cfg, None, cfg.strategy.model_extra)  # the strategy's own keys, checked before training
            runs.append((s, first_seed + k, cfg))
    return runs


def finished_metrics(out, cfg) -> dict | None:
    """metrics.json of a finished run of exactly this config, else None."""
    import json
    from pathlib import Path

    import yaml

    from ..config import to_dict

    out = Path(out)
    try:
        if yaml.safe_load((out / "config.yaml").read_text()) == to_dict(cfg):
            return json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return None


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _run_in_worker(cfg_dict: dict, out: str) -> dict:
    from ..config import ExperimentConfig
    from ..runner import run_experiment

    return run_experiment(ExperimentConfig.model_validate(cfg_dict), out)


# ---------------------------------------------------------------- summary


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


def _cell(r: dict, key: str, fmt: str) -> str:
    if r[f"{key}_mean"] != r[f"{key}_mean"]:  # NaN: not applicable to this arm
        return "—"
    return f"{format(r[f'{key}_mean'], fmt)} ± {format(r[f'{key}_std'], fmt)}"


def to_markdown(rows: list[dict], title: str) -> str:
    head = ["strategy", "seeds"] + [h for _, _, h, _ in COLUMNS]
    lines = [f"# {title}", "", "mean ± std over seeds (sample std; 0 with one seed)", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(COLUMNS)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([r["strategy"], str(r["seeds"])] + [_cell(r, k, f) for k, _, _, f in COLUMNS]) + " |")
    return "\n".join(lines) + "\n"


def plot_tradeoff(rows: list[dict], path) -> None:
    from ..plots import _save, plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        ax.errorbar(r["forgetting_mean"], r["average_accuracy_mean"], xerr=r["forgetting_std"], yerr=r["average_accuracy_std"],
                    fmt="o", capsize=3, label=r["strategy"])
        ax.annotate(r["strategy"], (r["forgetting_mean"], r["average_accuracy_mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("forgetting (%)  (lower is better)")
    ax.set_ylabel("average accuracy (%)  (higher is better)")
    ax.set_title("Accuracy vs forgetting (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_seen_accuracy(rows: list[dict], path) -> None:
    from ..plots import _save, plt

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
    _save(fig, path)


def rich_table(rows: list[dict], title: str):
    from rich.table import Table

    t = Table(title=title)
    for h in ["strategy", "seeds"] + [h for _, _, h, _ in COLUMNS]:
        t.add_column(h, justify="left" if h == "strategy" else "right")
    for r in rows:
        t.add_row(r["strategy"], str(r["seeds"]), *[_cell(r, k, f) for k, _, _, f in COLUMNS])
    return t


# ---------------------------------------------------------------- main


def main(args: argparse.Namespace) -> int:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from pathlib import Path

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..config import to_dict
    from ..errors import ConfigError
    from ..io import atomic_write_json, atomic_write_text
    from ..runner import Callbacks, run_experiment

    strategies = parse_strategies(args.strategies)
    if args.jobs < 1:
        raise ConfigError("--jobs must be at least 1")
    runs = plan_runs(args.config, args.overrides, strategies, args.seeds, args.device)
    out = Path(args.out or f"runs/compare_{runs[0][2].name}")
    results: dict[str, dict[int, dict]] = {s: {} for s in strategies}
    todo = []
    for s, seed, cfg in runs:
        done = finished_metrics(out / s / f"seed{seed}", cfg)
        if done is not None:
            results[s][seed] = done
        else:
            todo.append((s, seed, cfg))
    console = Console(stderr=True)
    if len(todo) < len(runs):
        console.print(f"{len(runs) - len(todo)} of {len(runs)} runs already finished in {out}; skipping them")

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[info]}"), console=console, disable=args.quiet)
    with progress:
        overall = progress.add_task("runs", total=len(runs), completed=len(runs) - len(todo), info="")

        def finish(s, seed, m):
            results[s][seed] = m
            progress.update(overall, advance=1, info=f"{s} seed {seed}: avg acc {m['average_accuracy']:.1f}%")

        if args.jobs == 1 or len(todo) <= 1:
            for s, seed, cfg in todo:
                bar = progress.add_task(f"  {s} seed {seed}", total=None, info="")

                class Cb(Callbacks):
                    def task_start(self, i, n, total):
                        progress.update(bar, total=total, completed=0, info=f"task {i + 1}/{n}")

                    def step(self, step, total):
                        if step % 20 == 0 or step == total:
                            progress.update(bar, completed=step)

                finish(s, seed, run_experiment(cfg, out / s / f"seed{seed}", Cb()))
                progress.remove_task(bar)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx, initializer=_init_worker) as pool:
                futures = {pool.submit(_run_in_worker, to_dict(cfg), str(out / s / f"seed{seed}")): (s, seed) for s, seed, cfg in todo}
                for f in as_completed(futures):
                    finish(*futures[f], f.result())

    ordered = {s: [results[s][k] for k in sorted(results[s])] for s in strategies}
    rows = summarize_runs(ordered)
    first = runs[0][2]
    title = f"{first.data.name}, {first.scenario.kind}, {first.scenario.n_tasks} tasks, buffer {first.strategy.buffer_size}"
    atomic_write_text(out / "results.csv", to_csv(rows))
    atomic_write_text(out / "results.md", to_markdown(rows, title))
    atomic_write_json(out / "results.json", {"title": title, "rows": rows})
    plot_tradeoff(rows, out / "accuracy_vs_forgetting.png")
    plot_seen_accuracy(rows, out / "seen_accuracy.png")
    from rich.console import Console as _C

    _C().print(rich_table(rows, title))
    _C().print(f"results in [bold]{out}[/]: results.csv, results.md, results.json, accuracy_vs_forgetting.png, seen_accuracy.png, <strategy>/seed<k>/")
    return 0
