"""Where benchmark scripts leave their tables: benchmarks/results/<name>.md, committed, and spliced
into the README by ``benchmarks/update_readme.py``. Each file says which command wrote it."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

from modulemesh.io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def command_line(argv: list[str] | None = None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *args])


def publish(name: str, title: str, body: str, argv: list[str] | None = None) -> Path:
    """Write ``body`` under a header naming the command and machine; returns the path."""
    header = (
        f"# {title}\n\nWritten by `{command_line(argv)}` (torch {torch.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} cores).\n\n"
    )
    path = RESULTS / f"{name}.md"
    atomic_write_text(path, header + body.rstrip() + "\n")
    print(f"wrote {path}")
    return path
