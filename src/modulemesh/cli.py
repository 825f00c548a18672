"""``modulemesh`` command line: parse, call the library, print. No experiment logic lives here.

Each subcommand is a module in ``modulemesh.commands`` with ``add_arguments(parser)`` and
``main(args) -> int``; modules are imported lazily so ``modulemesh --help`` stays fast and an
optional engine (Flower, hivemind) is only imported by the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .errors import ModuleMeshError

COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("modulemesh.commands.run", "run one continual-learning experiment from a config"),
    "federate": ("modulemesh.commands.federate", "federated / decentralized training of expert modules"),
    "compare": ("modulemesh.commands.compare", "run several strategies x seeds and compare them"),
    "upgrade": ("modulemesh.commands.upgrade", "carry a deprecated model's knowledge into a new architecture"),
    "m2mkd": ("modulemesh.commands.m2mkd", "module-to-module distillation of a monolithic teacher into a modular student"),
    "hub": ("modulemesh.commands.hub", "publish, pull, list and verify experts and meshes on a hub (any fsspec URL)"),
    "compose": ("modulemesh.commands.compose", "one mesh from experts trained apart, routed with no retraining"),
    "merge": ("modulemesh.commands.merge", "merge copies of one expert (mean, Fisher-weighted or TIES)"),
    "forget": ("modulemesh.commands.forget", "exact unlearning: remove experts and their router state"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modulemesh", description="Modular, continually learned neural networks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).main(args) or 0)
    except ModuleMeshError as e:
        print(f"modulemesh {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"modulemesh {args.command}: interrupted; finished results are on disk, rerun with the same --out to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
