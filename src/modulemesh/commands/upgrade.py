"""``modulemesh upgrade``: carry a deprecated model's knowledge into a new architecture.

    modulemesh upgrade --from runs/teacher --to configs/upgrade_mlp_wider_deeper.yaml --data mnist \
        --train-teacher configs/upgrade_teacher_mlp.yaml --out runs/upgrade

``--from`` names an expert record (``PATH.safetensors`` + ``PATH.json``: from ``run``, ``compose``,
a hub pull or an earlier upgrade; model files of older versions are read too). When it does not
exist yet, ``--train-teacher SPEC.yaml`` trains one on ``--data`` and saves it there first. The
upgraded model ``OUT/new_model`` is an expert record as well, so ``compose``, ``merge`` and
``hub publish`` take it. The work is done by
``modulemesh.preserve.upgrade.run_upgrade``; this module only parses, loads and prints.
"""

from __future__ import annotations

import argparse

from .options import add_set_option


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from",
        dest="old",
        required=True,
        metavar="OLD",
        help="the old model: an expert record (PATH, PATH.json or PATH.safetensors)",
    )
    p.add_argument(
        "--to",
        dest="new",
        required=True,
        metavar="NEW.yaml",
        help="config of the new model (backbone, train, distill, transfer)",
    )
    p.add_argument(
        "--data", help="dataset: mnist, fashion_mnist, digits, ... (default: the one the old model was trained on)"
    )
    p.add_argument(
        "--train-teacher",
        metavar="SPEC.yaml",
        help="if OLD does not exist, train this model on --data and save it as OLD first (e.g. "
        "configs/upgrade_teacher_mlp.yaml)",
    )
    p.add_argument(
        "--beta", type=float, help="transfer weight: theta' = beta*mapped + (1-beta)*random (overrides transfer.beta)"
    )
    p.add_argument("--tau", type=float, help="transfer only parameters with Fisher > tau (overrides transfer.tau)")
    p.add_argument(
        "--top-q",
        type=float,
        help="transfer only the top-q fraction of parameters by Fisher (overrides transfer.top_q)",
    )
    p.add_argument("--steps", type=int, help="training steps per arm (overrides train.steps; 0 = transfer only)")
    p.add_argument("--no-distill", action="store_true", help="skip the KD arms; the new model is the transfer-only one")
    add_set_option(p, "override a value of NEW.yaml, e.g. --set train.lr=0.1 (repeatable)")
    p.add_argument(
        "--out",
        default="runs/upgrade",
        help="output directory (default: runs/upgrade); rerunning resumes finished arms",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument(
        "--overwrite", action="store_true", help="recompute every arm instead of reusing finished ones in --out"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from ..checkpoint import module_paths
    from ..config import load_config
    from ..data.datasets import load_dataset
    from ..errors import CheckpointError, ConfigError
    from ..io import set_aside
    from ..preserve.train import load_model
    from ..preserve.upgrade import TeacherConfig, UpgradeConfig, results_rows, run_upgrade, train_teacher
    from ..tables import result_console
    from ..utils import resolve_device
    from .common import step_bars

    overrides = list(args.overrides)
    for flag, key in (
        ("beta", "transfer.beta"),
        ("tau", "transfer.tau"),
        ("top_q", "transfer.top_q"),
        ("steps", "train.steps"),
    ):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.no_distill:
        overrides.append("distill.enabled=false")
    cfg = load_config(UpgradeConfig, args.new, overrides)
    device = resolve_device(args.device)
    console = Console(stderr=True)
    out = Path(args.out)
    if args.overwrite and (out / "arms").exists():
        set_aside(out / "arms")  # harden: deleted if the upgrade succeeds, put back if it fails

    progress, bar = step_bars(console, args.quiet)

    _, manifest_path = module_paths(args.old)
    with progress:
        if manifest_path.exists():
            if args.train_teacher:
                console.print(
                    f"{manifest_path} exists: upgrading it (not training a new teacher from {args.train_teacher})"
                )
            teacher, manifest = load_model(args.old, device)
            data_name = args.data or manifest.get("data")
            if not data_name:
                raise ConfigError(
                    f"{manifest_path} does not record its dataset; pass --data (mnist, fashion_mnist, digits, ...)"
                )
            ds = load_dataset(data_name)
        else:
            if not args.train_teacher:
                raise CheckpointError(
                    f"no old model at {manifest_path}; pass the path of a saved module, or add "
                    "--train-teacher configs/upgrade_teacher_mlp.yaml --data mnist to train one "
                    "there first"
                )
            if not args.data:
                raise ConfigError(
                    "--train-teacher needs --data to know what to train the old model on (mnist, "
                    "fashion_mnist, digits, ...)"
                )
            tcfg = load_config(TeacherConfig, args.train_teacher)
            ds = load_dataset(args.data)
            teacher, manifest = train_teacher(tcfg, ds, args.old, seed=args.seed, device=device, progress=bar)
            console.print(f"trained the old model: accuracy {manifest['test_accuracy']:.2%}, saved to {manifest_path}")
        summary = run_upgrade(teacher, manifest, cfg, ds, out, seed=args.seed, device=device, progress=bar)

    rows = results_rows(summary)
    table = Table(
        title=f"upgrade on {summary['data']}: old model {summary['old_model']['accuracy']:.2%}, "
        f"target {summary['target_accuracy']:.2%} ({summary['target_fraction']:.0%})"
    )
    for col in rows[0]:
        table.add_column(col, justify="left" if col == "arm" else "right")
    for r in rows:
        table.add_row(*map(str, r.values()))
    result_console().print(table)
    t = summary["transfer"]
    result_console().print(
        f"transferred {t['fraction_transferred']:.1%} of the new model's parameters, carrying "
        f"{t['importance_mass_carried']:.1%} of the old model's Fisher mass"
    )
    for w in t["warnings"]:
        console.print(f"[yellow]warning:[/] {w}")
    files = "new_model.json + .safetensors (an expert record), " if summary["new_model"]["path"] else ""
    result_console().print(
        f"results in [bold]{out}[/]: {files}report.md, report.json, results.csv, accuracy_vs_steps.png"
    )
    if files:
        result_console().print(
            f"use it like any expert: modulemesh compose {out / 'new_model.json'} --out MESH, or "
            f"modulemesh hub publish {out / 'new_model.json'} HUB"
        )
    return 0
