"""``ArrayDataset`` (a train/test split in memory) and the helpers every loader shares: label
finalization, the on-disk cache, and option checks that name the fix."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import DataError
from .cache import cached
from .formats import remap_labels


@dataclass
class ArrayDataset:
    """A train/test split held in memory as numpy arrays.

    ``train_groups``/``test_groups`` (optional, int64 per sample) carry a domain or session id, e.g.
    the CORe50 session or the DomainNet domain, for new-instance / domain-incremental scenarios;
    ``group_names`` maps each group id to a readable name.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    label_map: dict[str, int]
    train_groups: np.ndarray | None = None
    test_groups: np.ndarray | None = None
    group_names: dict[int, str] | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes K (labels are 0..K-1)."""
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(1, 28, 28)`` or ``(D,)``."""
        return tuple(self.x_train.shape[1:])


def finalize(
    name: str,
    source: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    class_name: Callable[[Any], str] = str,
    train_groups: np.ndarray | None = None,
    test_groups: np.ndarray | None = None,
    group_names: dict[int, str] | None = None,
) -> ArrayDataset:
    """Check lengths, remap original labels to 0..K-1 and build the :class:`ArrayDataset`.

    ``class_name(original_label)`` gives the readable name of each class.
    """
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) == 0:
            raise DataError(f"{source}: the {split} split is empty; it needs at least one sample")
        if len(x) != len(y):
            raise DataError(f"{source}: {split} has {len(x)} samples but {len(y)} labels; they must match one to one")
    ytr, yte, originals = remap_labels(np.asarray(y_train), np.asarray(y_test), source)
    originals_list = originals.tolist()
    return ArrayDataset(
        name=name,
        x_train=x_train,
        y_train=ytr,
        x_test=x_test,
        y_test=yte,
        class_names=[class_name(o) for o in originals_list],
        label_map={str(o): i for i, o in enumerate(originals_list)},
        train_groups=None if train_groups is None else np.asarray(train_groups, dtype=np.int64),
        test_groups=None if test_groups is None else np.asarray(test_groups, dtype=np.int64),
        group_names=group_names,
    )


def cached_dataset(kind: str, key: dict[str, Any], build: Callable[[], ArrayDataset]) -> ArrayDataset:
    """Load ``kind``/``key`` from the on-disk cache, or build it and store it (see ``cache.py``)."""

    def build_arrays() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        ds = build()
        arrays = {
            k: getattr(ds, k)
            for k in ("x_train", "y_train", "x_test", "y_test", "train_groups", "test_groups")
            if getattr(ds, k) is not None
        }
        meta = {
            "name": ds.name,
            "class_names": ds.class_names,
            "label_map": ds.label_map,
            "group_names": None if ds.group_names is None else {str(k): v for k, v in ds.group_names.items()},
        }
        return arrays, meta

    arrays, meta = cached(kind, key, build_arrays)
    groups = meta.get("group_names")
    return ArrayDataset(
        name=meta["name"],
        x_train=arrays["x_train"],
        y_train=arrays["y_train"],
        x_test=arrays["x_test"],
        y_test=arrays["y_test"],
        class_names=list(meta["class_names"]),
        label_map={str(k): int(v) for k, v in meta["label_map"].items()},
        train_groups=arrays.get("train_groups"),
        test_groups=arrays.get("test_groups"),
        group_names=None if groups is None else {int(k): v for k, v in groups.items()},
    )


def require_root(root: str | os.PathLike | None, dataset: str, what: str) -> Path:
    """Return ``root`` as a Path that exists, or raise a ``DataError`` saying what it should hold."""
    if root is None:
        raise DataError(f"dataset {dataset!r} needs root=<path>: {what}")
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"{dataset}: {path} does not exist; root must be {what}")
    return path


def check_fraction(value: Any, dataset: str, option: str = "test_fraction") -> float:
    """Validate a fraction option strictly between 0 and 1."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{dataset}: {option} must be a number between 0 and 1, got {value!r}") from None
    if not 0.0 < f < 1.0:
        raise DataError(f"{dataset}: {option} must be strictly between 0 and 1, got {value!r}")
    return f


def check_int(value: Any, dataset: str, option: str = "seed") -> int:
    """Validate an integer option (bools and fractional numbers are rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{dataset}: {option} must be an integer, got {value!r}")
    return int(value)


def check_choice(value: Any, choices: Sequence[str], dataset: str, option: str) -> str:
    """Validate an option that takes one of a few string values."""
    if value not in choices:
        raise DataError(f"{dataset}: {option} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def no_root(root: Any, dataset: str, hint: str) -> None:
    if root is not None:
        raise DataError(f"dataset {dataset!r} takes no root (got {str(root)!r}): {hint}")
