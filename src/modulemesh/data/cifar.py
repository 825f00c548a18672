"""CIFAR-10 and CIFAR-100 in their python-pickle batch format (read with the safe unpickler)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from . import safe_pickle
from .array_dataset import ArrayDataset, check_choice, finalize, require_root
from .formats import check_integer_labels


def _str_key_dict(obj: Any, source: Path) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(
            f"{source} holds a {type(obj).__name__}, expected the CIFAR python-version dict; "
            "extract the 'python version' archive again"
        )
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _decode_names(names: Any, source: Path, key: str) -> list[str]:
    if not isinstance(names, (list, tuple, np.ndarray)):
        raise DataError(f"{source}: {key} must be a list of names, got {type(names).__name__}")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _str_key_dict(safe_pickle.load(path, encoding="bytes"), path)
    for key in ("data", label_key):
        if key not in d:
            raise DataError(
                f"{path} has no '{key}' entry (keys: {', '.join(sorted(d))}); it is not a CIFAR "
                "python-version batch: extract the 'python version' archive again"
            )
    data = np.asarray(d["data"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: data has shape {data.shape}, expected (N, 3072) rows of 32x32 RGB pixels")
    if data.dtype != np.uint8:
        if not np.issubdtype(data.dtype, np.integer) or (data.size and (data.min() < 0 or data.max() > 255)):
            raise DataError(f"{path}: data has dtype {data.dtype}; CIFAR pixels must be uint8 0..255")
        data = data.astype(np.uint8)
    labels = check_integer_labels(np.asarray(d[label_key]), str(path), label_key)
    if len(labels) != len(data):
        raise DataError(
            f"{path}: {len(data)} images but {len(labels)} {label_key}; the file is corrupt: extract it again"
        )
    # Rows are stored R plane, G plane, B plane: exactly (3, 32, 32) channels-first.
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_dir(root: str | os.PathLike | None, dataset: str, subdir: str, marker: str) -> Path:
    path = require_root(root, dataset, f"the directory containing {subdir}/ (or {subdir}/ itself)")
    if (path / subdir).is_dir():
        path = path / subdir
    if not (path / marker).is_file():
        raise DataError(
            f"{dataset}: {path} has no '{marker}' file; root must contain {subdir}/ from the CIFAR "
            "'python version' archive (or be that directory)"
        )
    return path


def _cifar_names(meta_path: Path, key: str, originals_max: int) -> list[str]:
    meta = _str_key_dict(safe_pickle.load(meta_path, encoding="bytes"), meta_path)
    if key not in meta:
        raise DataError(
            f"{meta_path} has no '{key}' entry (keys: {', '.join(sorted(meta))}); extract the archive again"
        )
    names = _decode_names(meta[key], meta_path, key)
    if originals_max >= len(names):
        raise DataError(
            f"{meta_path}: {key} lists {len(names)} names but a label is {originals_max}; "
            "the batches and meta file come from different archives"
        )
    return names


def load_cifar100(root: str | os.PathLike | None = None, label: str = "fine") -> ArrayDataset:
    """CIFAR-100 python version (``cifar-100-python/{train,test,meta}``); ``label``: fine (100) or coarse (20)."""
    check_choice(label, ("fine", "coarse"), "cifar100", "label")
    path = _cifar_dir(root, "cifar100", "cifar-100-python", "train")
    key = f"{label}_labels"
    x_train, y_train = _read_cifar_batch(path / "train", key)
    x_test, y_test = _read_cifar_batch(path / "test", key)
    names = _cifar_names(path / "meta", f"{label}_label_names", int(max(y_train.max(), y_test.max())))
    if min(y_train.min(), y_test.min()) < 0:
        raise DataError(f"{path}: negative {key}; the files are corrupt: extract the archive again")
    return finalize("cifar100", str(path), x_train, y_train, x_test, y_test, class_name=lambda i: names[i])


def load_cifar10(root: str | os.PathLike | None = None) -> ArrayDataset:
    """CIFAR-10 python version (``cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta``)."""
    path = _cifar_dir(root, "cifar10", "cifar-10-batches-py", "test_batch")
    batches = sorted(path.glob("data_batch_*"))
    if not batches:
        raise DataError(f"cifar10: {path} has no data_batch_* files; extract the CIFAR-10 python archive again")
    parts = [_read_cifar_batch(b, "labels") for b in batches]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = _read_cifar_batch(path / "test_batch", "labels")
    names = _cifar_names(path / "batches.meta", "label_names", int(max(y_train.max(), y_test.max())))
    return finalize("cifar10", str(path), x_train, y_train, x_test, y_test, class_name=lambda i: names[i])
