"""On-disk cache of decoded datasets as uncompressed .npz files.

Decoding MNIST's pickle or tens of thousands of JPEGs takes seconds to minutes; reading the same
arrays back from an .npz takes a fraction of a second. Entries are keyed by everything that
changes the result (source path, its size/mtime or file count, loader options, cache format
version), so a stale entry is never read, only left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..io import atomic_save

# Bump when a loader's conversion changes, so old cache entries are ignored.
CACHE_VERSION = 1
_META_KEY = "__meta__"


def cache_dir() -> Path:
    """The cache root: ``$MODULEMESH_CACHE`` or ``~/.cache/modulemesh``."""
    return Path(os.environ.get("MODULEMESH_CACHE") or "~/.cache/modulemesh").expanduser()


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Resolved path, size and mtime: cheap and changes whenever the file is replaced."""
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_path(kind: str, key: dict[str, Any]) -> Path:
    """Where the entry for ``kind`` (e.g. ``"mnist"``) and ``key`` lives."""
    blob = json.dumps({"version": CACHE_VERSION, "kind": kind, **key}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]
    return cache_dir() / f"{kind}-{digest}.npz"


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop(_META_KEY)))
        return arrays, meta
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError):
        # A damaged entry is just a cache miss; it is rebuilt and replaced.
        return None


def _write(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    payload = dict(arrays)
    payload[_META_KEY] = np.array(json.dumps(meta))

    def save(tmp: str) -> None:
        # Pass a file object: np.savez would append ".npz" to the temporary name.
        with open(tmp, "wb") as f:
            np.savez(f, **payload)

    try:
        atomic_save(path, save)
    except OSError as exc:
        warnings.warn(
            f"could not write dataset cache {path} ({exc}); set MODULEMESH_CACHE to a writable "
            "directory to make later loads fast",
            stacklevel=3,
        )


def cached(
    kind: str,
    key: dict[str, Any],
    build: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Return ``(arrays, meta)`` from the cache, or call ``build()`` and store its result.

    ``meta`` must be JSON-serialisable; arrays must not be object arrays.
    """
    path = cache_path(kind, key)
    if path.is_file():
        hit = _read(path)
        if hit is not None:
            return hit
    arrays, meta = build()
    _write(path, arrays, meta)
    return arrays, meta
