"""``modulemesh upcycle MODEL --experts E --out MESH``: a trained dense model into a mesh of E experts.

    modulemesh upcycle runs/dense/expert --experts 4 --data mnist --steps 500 --out runs/upcycled

MODEL is an expert record (PATH or PATH.json), one expert of a saved mesh (``MESH_DIR:NAME``) or a
stand-alone model file. Every expert starts as a copy of it behind a neutral gate (the mesh computes
the dense model's function), then the mesh trains on ``--data`` (``modulemesh.sharing.upcycle``).
``--out`` becomes a mesh directory that ``ModuleMesh.load``, ``compose``, ``hub publish`` and
``run --from`` read, plus ``upcycle.json`` (accuracies, FLOPs).
"""

from __future__ import annotations

import argparse

from .options import add_set_option


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="the dense model: expert record, MESH_DIR:NAME or model file")
    p.add_argument("--experts", type=int, help="number of experts E >= 2 (overrides experts; default 4)")
    p.add_argument("--out", required=True, help="directory for the upcycled mesh")
    p.add_argument("--config", metavar="CFG.yaml", help="router, noise and training settings (UpcycleConfig)")
    p.add_argument("--steps", type=int, help="continued-training steps (overrides train.steps; 0 = copy only)")
    p.add_argument("--data", help="data set to continue training on (default: the one in the model's provenance)")
    p.add_argument("--data-root", help="where the data set lives")
    add_set_option(p, "override a config value, e.g. --set router.k=2 (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="random seed (noise, gate init, batch order; default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _data_name(args: argparse.Namespace, dense) -> str:
    from ..errors import ConfigError

    if args.data:
        return args.data
    prov = dense.metadata.get("provenance") or {}
    name = ((prov.get("config") or {}).get("data") or {}).get("name") or dense.metadata.get("data")
    if not isinstance(name, str):
        raise ConfigError(f"the model {args.model} does not record its data set; pass --data (mnist, digits, ...)")
    return name


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from ..config import load_config, to_dict
    from ..io import atomic_write_json
    from ..sharing.output import accuracy, check_out, class_split, write_atomically
    from ..sharing.upcycle import (
        UpcycleConfig,
        break_symmetry,
        check_data,
        continue_training,
        evaluate_mesh,
        load_dense,
        record_provenance,
        upcycle,
    )
    from ..tables import result_console
    from ..utils import resolve_device, seed_everything

    overrides = list(args.overrides)
    for flag, key in (("experts", "experts"), ("steps", "train.steps")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    cfg = load_config(UpcycleConfig, args.config, overrides)
    out = check_out(args.out, args.overwrite)
    dense = load_dense(args.model)
    data = _data_name(args, dense)
    x, y = class_split(data, args.data_root, dense.classes, "train")
    x_te, y_te = class_split(data, args.data_root, dense.classes, "test")
    check_data(dense, x, data)

    seed_everything(args.seed)
    device = resolve_device(args.device)
    mesh = upcycle(dense, cfg).to(device)
    dense = dense.to(device).eval()
    dense_acc = accuracy(lambda xb: dense.class_index[dense(xb.to(device)).argmax(1)].cpu(), x_te, y_te)
    step0 = evaluate_mesh(mesh, x_te, y_te)["accuracy"]
    if cfg.train.steps > 0:  # identical copies would stay identical (see sharing.upcycle)
        break_symmetry(mesh, cfg.noise, args.seed)
    noised = evaluate_mesh(mesh, x_te, y_te)["accuracy"]

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=args.quiet,
    )
    with progress:
        bar = progress.add_task(f"training {cfg.experts} upcycled experts", total=cfg.train.steps)
        fit_result = continue_training(
            mesh, x, y, cfg, seed=args.seed, device=device, on_step=lambda s: progress.update(bar, completed=s)
        )
    final = evaluate_mesh(mesh, x_te, y_te)
    report = {
        "model": str(args.model),
        "data": data,
        "experts": cfg.experts,
        "config": to_dict(cfg),
        "seed": args.seed,
        "dense_accuracy": dense_acc,
        "step0_accuracy": step0,
        "after_noise_accuracy": noised,
        "train": fit_result.as_dict(),
        **{f"final_{k}" if k == "accuracy" else k: v for k, v in final.items()},
    }
    record_provenance(mesh, dense, x, y, report["config"], final["accuracy"])

    def write(tmp):
        mesh.save(tmp)
        atomic_write_json(tmp / "upcycle.json", report)

    write_atomically(out, write)
    table = Table(title=f"upcycled {args.model} into {cfg.experts} experts on {data} ({len(y_te)} test examples)")
    table.add_column("model")
    table.add_column("test accuracy (%)", justify="right")
    table.add_column("expert FLOPs / sample", justify="right")
    table.add_row("dense", f"{dense_acc:.2f}", f"{final['all_experts_flops_per_sample'] / cfg.experts:.3g}")
    table.add_row("upcycled, step 0", f"{step0:.2f}", "")
    table.add_row(f"after symmetry-breaking noise ({cfg.noise:g})", f"{noised:.2f}", "")
    table.add_row(
        f"upcycled, {fit_result.steps} steps ({cfg.train_k} of {cfg.experts} experts trained per input)",
        f"{final['accuracy']:.2f}",
        f"{final['expert_flops_per_sample']:.3g} ({final['experts_run_per_sample']:.2f} experts)",
    )
    result_console().print(table)
    result_console().print(
        f"training FLOPs {fit_result.train_flops:.3g} ({fit_result.flops_per_step:.3g} per step); mesh in {out}"
    )
    return 0
