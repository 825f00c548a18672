"""``modulemesh compose EXPERT_OR_MESH... --out MESH``: one mesh from experts trained apart, no retraining."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "sources", nargs="+", metavar="EXPERT_OR_MESH", help="expert records (NAME.json) and/or mesh directories"
    )
    p.add_argument("--out", required=True, help="directory for the composed mesh")
    p.add_argument(
        "--router",
        choices=("auto", "density", "entropy"),
        default="auto",
        help="auto: density when every expert carries its input density, else entropy",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="router temperature")
    p.add_argument("--num-classes", type=int, help="size of the label space (default: largest class covered + 1)")
    p.add_argument(
        "--data", help="evaluate on this data set's test split, restricted to the union of the experts' classes"
    )
    p.add_argument("--data-root", help="where the data set lives (see `run`'s data.root)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..errors import ConfigError
    from ..io import atomic_write_json
    from ..sharing.compose import compose, load_experts
    from ..sharing.output import accuracy, check_out, class_split, write_atomically

    if args.temperature <= 0:
        raise ConfigError(f"--temperature must be > 0 (got {args.temperature})")
    out = check_out(args.out, args.overwrite)
    found = load_experts(args.sources)
    mesh = compose(found, args.router, args.num_classes, args.temperature).eval()
    report = {
        "sources": [s for s, _ in found],
        "experts": {e.name: e.classes for e in mesh.experts},
        "router": type(mesh.router).__name__,
        "num_classes": mesh.num_classes,
    }
    if args.data:
        x, y = class_split(args.data, args.data_root, mesh.covered_classes())
        if tuple(x.shape[1:]) != mesh.input_shape:
            raise ConfigError(
                f"data set {args.data!r} has inputs {tuple(x.shape[1:])}, the experts take {mesh.input_shape}"
            )
        report["accuracy"] = accuracy(mesh.predict, x, y)
        report["test_examples"] = len(y)

    def write(tmp):
        mesh.save(tmp)
        atomic_write_json(tmp / "compose.json", report)

    write_atomically(out, write)
    console = Console(width=160)
    console.print(f"composed {len(mesh.experts)} experts ({mesh.num_classes} classes, {report['router']}) into {out}")
    if "accuracy" in report:
        console.print(
            f"accuracy on the union of their classes ({report['test_examples']} test examples of {args.data}): "
            f"{report['accuracy']:.2f}%"
        )
    return 0
