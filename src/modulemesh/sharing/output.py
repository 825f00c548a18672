"""Pieces compose, forget and merge share: refusing an occupied --out before any work, writing a
mesh or expert into it atomically, and accuracy on a data set's test split."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from ..data.scenarios import as_float
from ..errors import ConfigError, DataError


def check_out(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an --out that is a file, or a non-empty directory without --overwrite (before any work)."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--out {p} is a file; name a directory")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise ConfigError(f"--out {p} already exists and is not empty; pick a new directory or pass --overwrite")
    return p


def write_atomically(out: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` and move the finished directory to ``out`` (replacing it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def class_split(
    name: str, root: Optional[str], classes: Iterable[int], split: str = "test"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``split`` ("train" or "test") of data set ``name`` restricted to ``classes``."""
    from ..data.datasets import load_dataset

    ds = load_dataset(name, root)
    y = torch.as_tensor(getattr(ds, f"y_{split}")).long()
    keep = torch.isin(y, torch.tensor(sorted(set(classes))))
    if not bool(keep.any()):
        raise DataError(f"data set {name!r} has no {split} examples of classes {sorted(set(classes))}")
    return torch.as_tensor(getattr(ds, f"x_{split}"))[keep], y[keep]


@torch.no_grad()
def accuracy(
    predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch: int = 2048
) -> float:
    """Accuracy (%) of ``predict`` (inputs -> class predictions) on (x, y)."""
    if len(y) == 0:
        return float("nan")
    correct = sum(int((predict(as_float(x[i : i + batch])) == y[i : i + batch]).sum()) for i in range(0, len(y), batch))
    return 100.0 * correct / len(y)
