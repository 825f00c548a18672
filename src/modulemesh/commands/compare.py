"""``modulemesh compare``: several strategies x seeds on one config, one table and two plots.

Each run is ``runner.run_experiment`` into ``OUT/<strategy>/seed<k>/``. A run whose directory
already holds ``metrics.json`` for the same resolved config is read back instead of rerun, and a
run interrupted mid-way resumes from its checkpoint, so an interrupted compare is continued by
rerunning it with the same ``--out``. ``--jobs N`` trains independent runs in N worker processes
(``training.pool``: one torch thread each; killing compare kills them too). The sweep itself (planning,
workers, statistics, tables, plots) is ``modulemesh.sweep``; this command parses and prints.

Overrides: ``--set key=value`` applies to every run; ``--set STRATEGY.key=value`` applies to one
strategy only (``--set der.alpha=0.2``, ``--set er.train.lr=0.1``): a key under a config section
(train, data, ...) goes there, any other key is a ``strategy:`` setting of that strategy.

``--tune train.lr=0.03,0.1 --tune train.batch_size=10,32`` first trains every grid point of every
strategy on the first seed, picks each strategy's point by validation accuracy (``sweep.tune``; the test
split is never read for it), writes ``tuning.json`` / ``tuning.md``, then runs the chosen point on all seeds.
"""

from __future__ import annotations

import argparse

from .options import add_set_option


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="experiment YAML (default: the built-in Split-MNIST experiment)")
    p.add_argument(
        "--strategies", default="all", help="'all' or a comma-separated list, e.g. ewc,er,der (default: all)"
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per strategy: config seed, +1, ... (default: 3)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained in parallel worker processes (default: 1)")
    add_set_option(p, "override a config value for every run, or STRATEGY.KEY=VALUE for one strategy (repeatable)")
    p.add_argument(
        "--tune",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="grid values of a train/strategy/expert/router key, chosen per strategy on the validation split of "
        "the first seed, then run on every seed (repeatable: the grid is every combination)",
    )
    p.add_argument("--out", default=None, help="results directory (default: runs/compare_<experiment name>)")
    p.add_argument("--device", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def rich_table(rows: list[dict], title: str):
    from rich.table import Table

    from ..sweep import COLUMNS, cell

    t = Table(title=title)
    for h in ["strategy", "seeds"] + [h for _, _, h, _ in COLUMNS]:
        t.add_column(h, justify="left" if h == "strategy" else "right")
    for r in rows:
        t.add_row(r["strategy"], str(r["seeds"]), *[cell(r, k, f) for k, _, _, f in COLUMNS])
    return t


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..errors import ConfigError
    from ..runner import Callbacks
    from ..sweep import OUTPUT_FILES, parse_strategies, plan_runs, run_sweep
    from ..sweep import tune as tuning
    from ..tables import result_console
    from .common import claim_out

    strategies = parse_strategies(args.strategies)
    if args.jobs < 1:
        raise ConfigError("--jobs must be at least 1")
    grid = tuning.parse_tune(args.tune)
    runs = plan_runs(args.config, args.overrides, strategies, args.seeds, args.device)
    # Every grid point is planned (so validated) before anything is written.
    tune_plan = tuning.plan_tuning(args.config, args.overrides, strategies, grid, args.device) if grid else []
    out = claim_out(args.out or f"runs/compare_{runs[0][2].name}")  # lock the default --out too
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=args.quiet,
    )
    overall = None
    bars: dict[tuple[str, int], object] = {}  # per-run progress bars of in-process runs

    def on_start(total: int, finished: int) -> None:
        nonlocal overall
        if finished:
            console.print(f"{finished} of {total} runs already finished in {out}; skipping them")
        overall = progress.add_task("runs", total=total, completed=finished, info="")

    def on_result(s: str, seed: int, m: dict) -> None:
        progress.update(overall, advance=1, info=f"{s} seed {seed}: avg acc {m['average_accuracy']:.1f}%")
        if (s, seed) in bars:
            progress.remove_task(bars.pop((s, seed)))

    def callbacks_for(key: tuple[str, int]) -> Callbacks:
        bar = bars[key] = progress.add_task(f"  {key[0]} seed {key[1]}", total=None, info="")

        class Cb(Callbacks):
            def task_start(self, i, n, total):
                progress.update(bar, total=total, completed=0, info=f"task {i + 1}/{n}")

            def step(self, step, total):
                if step % 20 == 0 or step == total:
                    progress.update(bar, completed=step)

        return Cb()

    with progress:
        if grid:
            table = tune_stage(tune_plan, grid, out, args.jobs, progress, callbacks_for, bars)
            result_console().print(tuning.tuning_markdown(table, grid), markup=False)
            runs = []
            for s in strategies:
                chosen = tuning.as_overrides(s, table[s]["chosen"])
                runs += plan_runs(args.config, args.overrides + chosen, [s], args.seeds, args.device)
        result = run_sweep(runs, out, args.jobs, on_start, on_result, callbacks_for)
    result_console().print(rich_table(result.rows, result.title))
    files = ", ".join(OUTPUT_FILES + (("tuning.json", "tuning.md", "tune/") if grid else ()))
    result_console().print(f"results in [bold]{out}[/]: {files}, <strategy>/seed<k>/")
    return 0


def tune_stage(plan, grid, out, jobs: int, progress, callbacks_for, bars: dict) -> dict:
    """Train (or read back) every grid point on the first seed, choose per strategy, write the tuning files."""
    from ..errors import TrainingError
    from ..sweep import execute, split_finished
    from ..sweep import tune as tuning
    from .common import running_command

    todo_all = [((s, tuning.point_name(p)), cfg, tuning.tuning_dir(out, s, p, cfg.seed)) for s, p, cfg in plan]
    results, todo = split_finished(todo_all)
    bar = progress.add_task("tuning grid", total=len(todo_all), completed=len(todo_all) - len(todo), info="")

    def finish(key, m):
        results[key] = m
        val = m.get("validation_average_accuracy")
        info = f"{key[0]} {key[1]}: val acc {val:.1f}%" if val is not None else f"{key[0]} {key[1]}"
        progress.update(bar, advance=1, info=info)
        if key in bars:
            progress.remove_task(bars.pop(key))

    def failed(key, e):  # a diverged point is a result of the grid (never chosen), not the end of the sweep
        if not isinstance(e, TrainingError):
            raise e
        results[key] = {"failed": str(e).splitlines()[0]}
        progress.update(bar, advance=1, info=f"{key[0]} {key[1]}: failed")
        if key in bars:
            progress.remove_task(bars.pop(key))

    execute(todo, jobs, finish, on_error=failed, callbacks_for=callbacks_for)
    progress.remove_task(bar)
    table = tuning.choose(plan, results)
    tuning.write_tuning(out, table, grid, running_command())
    tuning.seed_chosen_runs(out, table)
    return table
