"""``modulemesh forget MESH (--classes C,... | --expert NAME) --out MESH2``: exact unlearning by removal,
measured against a mesh retrained from scratch without the forgotten data."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mesh", help="mesh directory (e.g. RUN/mesh)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--classes", type=_class_list, metavar="C,...", help="forget these classes (removes every expert covering one)"
    )
    what.add_argument("--expert", metavar="NAME", help="forget this expert")
    p.add_argument("--out", required=True, help="directory for the mesh without them")
    p.add_argument(
        "--config",
        help="the config the mesh was trained with (default: MESH/../config.yaml when present); "
        "needed for the accuracy, membership-attack and retraining comparison",
    )
    p.add_argument("--no-retrain", action="store_true", help="skip training the from-scratch comparison mesh")
    p.add_argument("--references", type=int, default=4, help="reference models of the membership attack (default 4)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def _class_list(text: str) -> list[int]:
    try:
        classes = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected class indices like 2,3 (got {text!r})") from None
    if not classes:
        raise argparse.ArgumentTypeError("give at least one class")
    return classes


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..errors import ConfigError
    from ..io import atomic_write_json
    from ..mesh import ModuleMesh
    from ..sharing.forget import evaluate_forgetting, experts_to_remove, read_training_config, remove, retrain_without
    from ..sharing.output import check_out, write_atomically

    if args.references < 1:
        raise ConfigError(f"--references must be >= 1 (got {args.references})")
    out = check_out(args.out, args.overwrite)
    mesh = ModuleMesh.load(args.mesh)
    names = experts_to_remove(mesh, args.classes, args.expert)
    config = Path(args.config) if args.config else Path(args.mesh).resolve().parent / "config.yaml"
    cfg = scenario = None
    if args.config or config.exists():
        from ..runner import build_experiment

        cfg = read_training_config(config, mesh)
        scenario = build_experiment(cfg)[0]
        if (scenario.num_classes, tuple(scenario.input_shape)) != (mesh.num_classes, tuple(mesh.input_shape)):
            raise ConfigError(
                f"{config} describes {scenario.num_classes} classes of inputs {tuple(scenario.input_shape)}, "
                f"the mesh {mesh.num_classes} of {tuple(mesh.input_shape)}; pass the config it was trained with"
            )

    start = time.perf_counter()
    forgotten = remove(mesh, names)
    write_atomically(out, mesh.save)
    forget_s = time.perf_counter() - start
    report = {
        "mesh": str(args.mesh),
        "removed_experts": names,
        "forgotten_classes": forgotten,
        "forget_time_s": forget_s,
    }
    if scenario is not None:
        meshes = {"before": ModuleMesh.load(args.mesh), "after forgetting": mesh}
        if not args.no_retrain:
            meshes["retrained from scratch"], report["retrain_time_s"] = retrain_without(cfg, forgotten, scenario)
            report["speedup"] = report["retrain_time_s"] / max(forget_s, 1e-9)
        report["evaluation"] = evaluate_forgetting(
            meshes, scenario, forgotten, cfg.expert.backbone, args.references, seed=cfg.seed
        )
    atomic_write_json(out / "forget.json", report)

    console = Console(width=160)
    console.print(f"removed {', '.join(names)} (classes {forgotten}) in {forget_s:.3f} s; mesh without them in {out}")
    if "evaluation" in report:
        table = Table(title="forgetting, measured")
        for col in ("mesh", "forget-set acc (%)", "retain-set acc (%)", "forget-set MIA AUC", "time (s)"):
            table.add_column(col)
        times = {"after forgetting": forget_s, "retrained from scratch": report.get("retrain_time_s")}
        for label, row in report["evaluation"].items():
            if label != "attack":
                t = times.get(label)
                table.add_row(
                    label,
                    f"{row['forget_accuracy']:.2f}",
                    f"{row['retain_accuracy']:.2f}",
                    f"{row['forget_mia_auc']:.3f}",
                    "" if t is None else f"{t:.3f}",
                )
        console.print(table)
    else:
        console.print(f"no config at {config}: accuracy and membership attack not measured (pass --config)")
    return 0
