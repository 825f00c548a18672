"""Name the file behind a read error, for errors that do not carry it (JSON, YAML, UTF-8, safetensors).

``json.loads(path.read_text())`` deep in a loader fails with "Expecting value: line 1 column 1"
and no file name. While a CLI command runs, an audit hook (PEP 578) remembers the last data file
the process opened, so the CLI can say which file is damaged in one line instead of a traceback.
The hook only stores a string; Python source and extension files (lazy imports) are ignored.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

_state: dict[str, object] = {"active": False, "last": None, "installed": False}
_CODE_SUFFIXES = (".py", ".pyc", ".so", ".pth")


def _hook(event: str, args: tuple) -> None:
    if event == "open" and _state["active"] and args and isinstance(args[0], (str, os.PathLike)):
        path = os.fspath(args[0])
        if not path.endswith(_CODE_SUFFIXES):
            _state["last"] = path


@contextmanager
def watch_opened_files() -> Iterator[None]:
    if not _state["installed"]:  # audit hooks cannot be removed: install once, switch on per command
        sys.addaudithook(_hook)
        _state["installed"] = True
    _state["active"], _state["last"] = True, None
    try:
        yield
    finally:
        _state["active"] = False


def last_opened() -> Optional[str]:
    return _state["last"]  # type: ignore[return-value]


def file_problem(e: BaseException) -> Optional[str]:
    """One line naming the file and the fix when ``e`` is a problem with a file's content or access, else None."""
    import yaml

    last = last_opened() or "a file"
    fix = "fix or restore the file (for a damaged results/checkpoint file in --out: rerun with --overwrite)"
    if isinstance(e, OSError) and (e.filename or e.strerror):
        name = e.filename or last
        hints = {
            IsADirectoryError: "it is a directory; pass the path of a file",
            NotADirectoryError: "a part of the path is a file, not a directory",
            FileNotFoundError: "it does not exist; check the path",
            PermissionError: "permission denied; fix the file's permissions or choose another path",
        }
        hint = next((h for cls, h in hints.items() if isinstance(e, cls)), e.strerror or str(e))
        return f"cannot use {name}: {hint}"
    if isinstance(e, UnicodeDecodeError):
        return f"{last} is not a text file (undecodable byte at position {e.start}); {fix}"
    if isinstance(e, json.JSONDecodeError):
        return f"{last} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); {fix}"
    if isinstance(e, yaml.YAMLError):
        return f"{last} is not valid YAML ({str(e).splitlines()[0]}); {fix}"
    if type(e).__name__ == "SafetensorError" or (isinstance(e, RuntimeError) and "PytorchStreamReader" in str(e)):
        return f"{last} is not a valid weights file ({str(e).splitlines()[0]}); {fix}"
    if isinstance(e, EOFError):
        return f"{last} ends early (truncated); {fix}"
    return None
