"""``modulemesh`` command line: parse, call the library, print. No experiment logic lives here.

Each subcommand is a module in ``modulemesh.commands`` with ``add_arguments(parser)`` and
``main(args) -> int``; modules are imported lazily so ``modulemesh --help`` stays fast and an
optional engine (Flower, hivemind) is only imported by the command that needs it.

Every command runs inside ``command_scope``: its ``--out`` is locked against a second writer and
cleared of temporary files a killed run left. A user's mistake is one line on stderr and exit code 2:
``ModuleMeshError`` carries its own message; a file that cannot be read or parsed (permissions, a
directory where a file should be, binary or truncated content) is reported with the file's name.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .errors import ModuleMeshError
from .files_opened import file_problem, watch_opened_files

COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("modulemesh.commands.run", "run one continual-learning experiment from a config"),
    "federate": ("modulemesh.commands.federate", "federated / decentralized training of expert modules"),
    "compare": ("modulemesh.commands.compare", "run several strategies x seeds and compare them"),
    "upgrade": ("modulemesh.commands.upgrade", "carry a deprecated model's knowledge into a new architecture"),
    "m2mkd": (
        "modulemesh.commands.m2mkd",
        "module-to-module distillation of a monolithic teacher into a modular student",
    ),
    "hub": ("modulemesh.commands.hub", "publish, pull, list and verify experts and meshes on a hub (any fsspec URL)"),
    "compose": ("modulemesh.commands.compose", "one mesh from experts trained apart, routed with no retraining"),
    "merge": ("modulemesh.commands.merge", "merge copies of one expert (mean, Fisher-weighted or TIES)"),
    "forget": ("modulemesh.commands.forget", "exact unlearning: remove experts and their router state"),
    "upcycle": ("modulemesh.commands.upcycle", "sparse upcycling: a trained dense model into a mesh of E experts"),
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
    from .commands.common import command_scope

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    try:
        with watch_opened_files(), command_scope(args, argv):
            return int(importlib.import_module(args._module).main(args) or 0)
    except ModuleMeshError as e:
        print(f"modulemesh {args.command}: error: {with_out_hint(e, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"modulemesh {args.command}: interrupted; finished results are on disk, rerun with the same --out "
            "to resume",
            file=sys.stderr,
        )
        return 130
    except Exception as e:
        problem = file_problem(e)
        if problem is None:
            raise  # a bug, not a user's file: keep the traceback
        print(f"modulemesh {args.command}: error: {problem}", file=sys.stderr)
        return 2


def with_out_hint(e: ModuleMeshError, args: argparse.Namespace) -> str:
    """A damaged file inside --out is the command's own output: say that --overwrite recomputes it."""
    from pathlib import Path

    from .errors import CheckpointError

    message, out = str(e), getattr(args, "out", None)
    if isinstance(e, CheckpointError) and out and str(Path(out)) in message and "--overwrite" not in message:
        if hasattr(args, "overwrite"):
            return f"{message} (it is an output in --out {out}: rerun with --overwrite to recompute it)"
    return message


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
