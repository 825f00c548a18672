"""``modulemesh run``: one continual experiment from a config, with progress bars and a result table."""

from __future__ import annotations

import argparse

from .options import add_set_option


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config", nargs="?", help="experiment YAML (default: the built-in Split-MNIST ModuleMesh experiment)"
    )
    add_set_option(p, "override a config value, e.g. --set train.epochs=2 --set router.type=entropy (repeatable)")
    p.add_argument("--seed", type=int, help="random seed (overrides the config)")
    p.add_argument("--device", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--out", default=None, help="results directory (default: runs/<experiment name>)")
    p.add_argument("--overwrite", action="store_true", help="discard a checkpoint in --out instead of resuming it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--log",
        default="csv",
        metavar="KINDS",
        help="logs to watch while it runs: csv (OUT/log.csv, default), tensorboard (OUT/tensorboard/), "
        "a comma list of both, or none",
    )
    p.add_argument(
        "--from",
        dest="from_mesh",
        metavar="MESH",
        help="continue this saved/pulled/composed mesh: experts stay frozen, tasks with new classes train",
    )
    p.add_argument("--tasks", type=_task_list, metavar="I,J", help="train only these task indices (e.g. 2)")


def _task_list(text: str) -> list[int]:
    try:
        return sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected task indices like 0,2 (got {text!r})") from None


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..config import ExperimentConfig, load_config
    from ..runner import run_experiment
    from ..tables import result_console
    from ..training.loggers import parse_log_kinds
    from .common import ProgressCallbacks, claim_out, default_config_path, results_table

    cfg = load_config(
        ExperimentConfig, args.config or default_config_path(), args.overrides, seed=args.seed, device=args.device
    )
    log = parse_log_kinds(args.log)
    out = claim_out(args.out or f"runs/{cfg.name}")  # the default --out is known only now: lock it
    console = Console(stderr=True)
    with ProgressCallbacks(console, disable=args.quiet) as cb:
        metrics = run_experiment(
            cfg, out, cb, overwrite=args.overwrite, log=log, from_mesh=args.from_mesh, tasks=args.tasks
        )
    result_console().print(results_table(metrics))
    result_console().print(
        f"results in [bold]{out}[/]: metrics.json, config.yaml, log.csv, accuracy_matrix.png, "
        "task_accuracy.png, routing.png, mesh/"
    )
    return 0
