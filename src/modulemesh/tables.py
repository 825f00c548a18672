"""Markdown tables for reports: one row per dict, columns in the first row's key order."""

from __future__ import annotations

from typing import Any, Sequence


def markdown_table(rows: Sequence[dict[str, Any]], right: Sequence[str] = ()) -> str:
    """A GitHub-flavoured markdown table; columns named in ``right`` are right-aligned (numbers)."""
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if c in right else "---" for c in cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


__all__ = ["markdown_table"]
