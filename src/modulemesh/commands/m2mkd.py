"""``modulemesh m2mkd``: module-to-module distillation of a monolithic teacher into a modular student.

    modulemesh m2mkd configs/m2mkd_mnist.yaml --teacher vit:dim=64,depth=4 --student moe_vit:dim=48,experts=4,k=2 \
        --modules 2 --jobs 2 --out runs/m2mkd

``--teacher`` is a saved token network (``PATH``, ``PATH.json``) or a spec to train one (saved as
OUT/teacher). ``--stage`` runs one stage so the work can be split over machines: ``meta`` and
``teacher`` once, ``modules --module I`` anywhere (copy OUT/meta.* and OUT/teacher_modules/module_I.*
there, bring OUT/modules/module_I.* back), then ``assemble``, ``baselines`` and ``report``. The work
is done by ``modulemesh.distill.m2mkd``; this module parses, wires progress bars and prints.
"""

from __future__ import annotations

import argparse

from .options import add_set_option

STAGE_CHOICES = ("all", "meta", "teacher", "modules", "assemble", "baselines", "report")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config",
        nargs="?",
        metavar="CONFIG",
        help="YAML config (see configs/m2mkd_*.yaml); defaults are used without one",
    )
    p.add_argument(
        "--teacher",
        metavar="PATH_OR_SPEC",
        help="saved teacher (PATH or PATH.json of a token net) or a spec to train, e.g. vit:dim=64,depth=4,heads=4",
    )
    p.add_argument(
        "--student", metavar="SPEC", help="student spec, e.g. moe_vit:dim=48,depth=4,experts=4,k=2 or vit:dim=32"
    )
    p.add_argument("--modules", type=int, metavar="K", help="number of modules the teacher and student are cut into")
    p.add_argument(
        "--jobs", type=int, metavar="N", help="worker processes for the independent module jobs (default 1: in process)"
    )
    p.add_argument("--stage", default="all", choices=STAGE_CHOICES, help="run one stage (default: all, in order)")
    p.add_argument(
        "--module",
        dest="module_indices",
        type=int,
        action="append",
        metavar="I",
        help="with --stage modules: distill only module I (repeatable)",
    )
    add_set_option(p, "override a config value, e.g. --set distill.steps=200 (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument(
        "--out", default="runs/m2mkd", help="output directory (default runs/m2mkd); finished stages in it are reused"
    )
    p.add_argument("--overwrite", action="store_true", help="delete the outputs of this run in --out and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bars or status lines")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from ..config import load_config
    from ..distill.m2mkd import M2MKD, STAGES, M2MKDConfig, apply_cli
    from ..distill.m2mkd.report import arm_rows
    from ..errors import ConfigError
    from ..io import set_aside
    from ..tables import result_console
    from ..utils import resolve_device
    from .common import step_bars

    if args.modules is not None and args.modules < 1:
        raise ConfigError(f"--modules must be >= 1, got {args.modules}")
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    if args.module_indices and args.stage != "modules":
        raise ConfigError("--module only applies to --stage modules")
    cfg = load_config(
        M2MKDConfig,
        args.config,
        args.overrides,
        **apply_cli(args.overrides, args.teacher, args.student, args.modules, args.jobs),
    )
    device = resolve_device(args.device)
    console = Console(stderr=True, quiet=args.quiet)
    out = Path(args.out)
    if args.overwrite:
        names = ["meta", "student"] + (
            [] if cfg.teacher.path else ["teacher"]
        )  # never delete a teacher the user passed in
        for name in names:
            for suffix in (".json", ".safetensors"):
                set_aside(out / f"{name}{suffix}")  # harden: deleted on success, put back on failure
        for sub in ("teacher_modules", "modules", "baselines"):
            set_aside(out / sub)

    progress, bar = step_bars(console, args.quiet)

    run = M2MKD(cfg, out, seed=args.seed, device=device, progress=bar, log=lambda text: console.print(text))
    stages = STAGES if args.stage == "all" else (args.stage,)
    with progress:
        summary = run.run(stages, jobs=cfg.jobs, modules=args.module_indices)

    if summary is None:
        console.print(f"stage {args.stage} done; outputs in [bold]{out}[/]")
        return 0
    rows = arm_rows(summary)
    table = Table(
        title=f"m2mKD on {summary['data']} (K={summary['modules']}, "
        f"{summary['budget']['student_steps_per_arm']} student steps per arm)"
    )
    for col in rows[0]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(*map(str, r.values()))
    result_console(quiet=args.quiet).print(table)
    result_console(quiet=args.quiet).print(
        f"results in [bold]{out}[/]: student.json and baselines/*.json (expert records: compose, merge and "
        "hub publish take them), modules/module_*.safetensors, report.md, report.csv, report.json, m2mkd.png"
    )
    return 0
