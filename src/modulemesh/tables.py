"""Markdown tables for reports: one row per dict, columns in the first row's key order."""

from __future__ import annotations

import os
from typing import Any, Sequence

from rich.console import Console

# Wide enough for every result table we print; rich would otherwise cut columns to "..." at 80.
PIPE_WIDTH = 240


def markdown_table(rows: Sequence[dict[str, Any]], right: Sequence[str] = ()) -> str:
    """A GitHub-flavoured markdown table; columns named in ``right`` are right-aligned (numbers)."""
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if c in right else "---" for c in cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def result_console(**kwargs: Any) -> Console:
    """A console for result tables: the terminal's width on a terminal; when output goes to a file,
    a pipe or CI (``| tee``, logs), wide enough that no column is cut (``COLUMNS`` still wins)."""
    console = Console(**kwargs)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPE_WIDTH
    return console


__all__ = ["markdown_table", "result_console"]
