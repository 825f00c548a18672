"""``modulemesh merge A B ... --method mean|fisher|ties --out DIR``: one expert from copies of a module."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "experts", nargs="+", metavar="EXPERT", help="expert records (NAME.json) with the same architecture and classes"
    )
    p.add_argument("--method", choices=("mean", "fisher", "ties"), default="mean")
    p.add_argument("--out", required=True, help="directory for the merged expert record")
    p.add_argument("--name", help="name of the merged expert (default: FIRST_merged)")
    p.add_argument("--data", help="data set for the Fisher (train split) and the accuracy report (test split)")
    p.add_argument("--data-root", help="where the data set lives")
    p.add_argument("--base", metavar="EXPERT", help="ties: the copies' common parent (required for ties)")
    p.add_argument("--density", type=float, default=0.2, help="ties: fraction of each task vector kept (default 0.2)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..errors import ConfigError
    from ..io import atomic_write_json
    from ..mesh import Expert
    from ..sharing.compose import load_experts
    from ..sharing.merge import check_mergeable, merge_experts
    from ..sharing.output import accuracy, check_out, class_split, write_atomically

    out = check_out(args.out, args.overwrite)
    experts = load_experts(args.experts)
    check_mergeable(experts)
    base = Expert.load(args.base) if args.base else None
    classes = experts[0][1].classes
    train = None
    if args.data:
        train = class_split(args.data, args.data_root, classes, "train")
        if tuple(train[0].shape[1:]) != tuple(experts[0][1].input_shape):
            raise ConfigError(
                f"data set {args.data!r} has inputs {tuple(train[0].shape[1:])}, the experts take "
                f"{tuple(experts[0][1].input_shape)}"
            )
    merged = merge_experts(experts, args.method, args.name, train, base, args.density)
    report = {"method": args.method, "inputs": [s for s, _ in experts], "merged": merged.name}
    if args.data:
        x, y = class_split(args.data, args.data_root, classes)
        index = merged.class_index
        for label, e in [*experts, ("merged", merged)]:
            report.setdefault("accuracy", {})[label] = accuracy(lambda xb, e=e: index[e(xb).argmax(1)], x, y)

    def write(tmp):
        merged.save(tmp / merged.name)
        atomic_write_json(tmp / "merge.json", report)

    write_atomically(out, write)
    console = Console(width=160)
    console.print(f"merged {len(experts)} experts ({args.method}) into {out / (merged.name + '.json')}")
    if "accuracy" in report:
        table = Table(title=f"accuracy on {args.data} test examples of classes {classes} (%)")
        table.add_column("expert")
        table.add_column("accuracy", justify="right")
        for label, acc in report["accuracy"].items():
            table.add_row(label, f"{acc:.2f}")
        console.print(table)
    return 0
