"""Array-level parsing and validation shared by the loaders: IDX files, image layouts, labels.

Every function here raises ``DataError`` naming the offending file or array, never a raw
numpy/gzip/zipfile exception.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

# IDX type codes -> big-endian numpy dtypes (see the MNIST file format description).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

IMAGE_CHANNELS = (1, 3, 4)


# ---------------------------------------------------------------------------------------- IDX


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path} ({exc.strerror}); check that it exists and is readable") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"IDX file {path} is a damaged gzip stream ({exc}); it is truncated or corrupt: download it again"
        ) from None


def parse_idx(data: bytes, source: str | os.PathLike) -> np.ndarray:
    """Parse the bytes of an IDX file (header: 0, 0, type code, ndim, then ndim big-endian uint32 dims)."""
    if len(data) < 4:
        raise DataError(
            f"IDX file {source} is {len(data)} bytes, too short for a header; it is truncated: download it again"
        )
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{source} is not an IDX file (magic number starts with {data[0]:#04x} {data[1]:#04x}, expected "
            "0x00 0x00); "
            "pass the original MNIST-format files (train-images-idx3-ubyte etc.)"
        )
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise DataError(
            f"IDX file {source} has unknown data type code {code:#04x}; the file is corrupt: download it again"
        )
    if ndim == 0:
        raise DataError(f"IDX file {source} declares 0 dimensions; the file is corrupt: download it again")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"IDX file {source} is truncated inside its header; download it again")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header
    if actual < expected:
        raise DataError(
            f"IDX file {source} is truncated: header says shape {dims} ({expected} data bytes) but only {actual} "
            "bytes follow; download it again"
        )
    if actual > expected:
        raise DataError(
            f"IDX file {source} has {actual - expected} unexpected bytes after shape {dims}; the file is corrupt "
            "or not an IDX file: download it again"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    # Native byte order, owned and writable: callers may modify or cache it.
    return arr.astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not (detected by its magic bytes, not its name)."""
    path = Path(path)
    return parse_idx(_read_maybe_gzip(path), path)


# ------------------------------------------------------------------------------------- images


def to_nchw(x: np.ndarray, source: str, layout: str = "auto") -> np.ndarray:
    """Return images as (N,C,H,W): (N,H,W) gains C=1, (N,H,W,C) is transposed, (N,C,H,W) kept.

    With ``layout="auto"`` a 4-d array counts as channels-last when only its last axis is 1, 3 or 4.
    When both axis 1 and axis 3 could be channels, the reading that makes the images square wins
    ((N,4,4,3) is NHWC); if that does not decide it (e.g. (N,3,3,3)) channels-first is assumed, the
    PyTorch convention. ``layout="nhwc"`` / ``"nchw"`` force the choice.
    """
    if x.ndim == 3:
        return x[:, None, :, :]
    if x.ndim != 4:
        raise DataError(f"{source}: images must have 3 or 4 dims (N,H,W), (N,H,W,C) or (N,C,H,W), got shape {x.shape}")
    if layout == "auto":
        first, last = x.shape[1] in IMAGE_CHANNELS, x.shape[3] in IMAGE_CHANNELS
        if not first and not last:
            raise DataError(
                f"{source}: cannot tell the channel axis of shape {x.shape}: neither axis 1 nor axis 3 is 1, 3 or 4; "
                "save images as (N,C,H,W) or (N,H,W,C)"
            )
        # Both could be channels, e.g. (N,4,4,3): prefer the reading that gives square images.
        square_if_nhwc, square_if_nchw = x.shape[1] == x.shape[2], x.shape[2] == x.shape[3]
        layout = "nhwc" if (last and not first) or (last and square_if_nhwc and not square_if_nchw) else "nchw"
    if layout == "nhwc":
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if layout == "nchw":
        return x
    raise DataError(f"{source}: unknown layout {layout!r}; use 'auto', 'nchw' or 'nhwc'")


def _chunks(n: int, size: int):
    return (slice(start, start + size) for start in range(0, n, size))


def floats_to_uint8(x: np.ndarray, source: str, chunk: int = 8192) -> np.ndarray:
    """Convert float pixels in [0,1] to uint8, in chunks to bound temporary memory.

    The general rule is ``round(x * 255)``. Files made by dividing bytes by 256 (the classic
    ``mnist.pkl.gz`` does: its values are k/256, max 255/256) are detected and multiplied by 256
    instead, which restores the original bytes exactly; ``x * 255`` would map 255 to 254 and merge
    two grey levels.
    """
    on_256_grid = True
    for s in _chunks(len(x), chunk):
        part = np.asarray(x[s], dtype=np.float32)
        if not np.isfinite(part).all():
            raise DataError(f"{source}: pixel values contain NaN or infinity; the file is corrupt")
        lo, hi = float(part.min(initial=0.0)), float(part.max(initial=0.0))
        if lo < 0.0 or hi > 1.0:
            raise DataError(f"{source}: expected float pixels in [0, 1], found values in [{lo:g}, {hi:g}]")
        if on_256_grid:
            scaled = part * 256.0
            on_256_grid = hi < 1.0 and bool(np.all(scaled == np.floor(scaled)))
    scale = 256.0 if on_256_grid else 255.0
    out = np.empty(x.shape, dtype=np.uint8)
    for s in _chunks(len(x), chunk):
        out[s] = np.rint(np.asarray(x[s], dtype=np.float32) * scale)
    return out


# ------------------------------------------------------------------------------------- labels


def check_integer_labels(y: np.ndarray, source: str, key: str) -> np.ndarray:
    """Return ``y`` as a 1-d int64 array; (N,1) is squeezed, integral floats are accepted."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{source}: {key} must be a 1-d array of class labels, got shape {y.shape}")
    if y.dtype == np.bool_ or np.issubdtype(y.dtype, np.integer):
        return y.astype(np.int64)
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all():
            raise DataError(f"{source}: {key} contains NaN or infinity; labels must be integers")
        if np.all(y == np.round(y)):
            return y.astype(np.int64)
        bad = y[y != np.round(y)][:3].tolist()
        raise DataError(
            f"{source}: {key} must hold integer class labels, found non-integer values such as {bad}; "
            "store class indices, not probabilities or regression targets"
        )
    raise DataError(
        f"{source}: {key} must hold integer class labels, got dtype {y.dtype}; "
        "store class indices (e.g. y.astype('int64'))"
    )


def remap_labels(y_train: np.ndarray, y_test: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map labels to 0..K-1 in sorted order of the distinct training labels.

    Returns ``(y_train, y_test, originals)`` where ``originals[i]`` is the original label of class
    ``i``. Works for integer and string labels. Test labels absent from training are an error:
    the model could never predict them.
    """
    originals = np.unique(y_train)
    if originals.size == 0:
        raise DataError(f"{source}: the training set has no labels")
    missing = np.setdiff1d(np.unique(y_test), originals)
    if missing.size:
        shown = ", ".join(str(v) for v in missing[:5].tolist())
        raise DataError(
            f"{source}: test labels {shown}{' ...' if missing.size > 5 else ''} never occur in the training labels; "
            "every test class needs training examples: add them or drop those test samples"
        )
    return (
        np.searchsorted(originals, y_train).astype(np.int64),
        np.searchsorted(originals, y_test).astype(np.int64),
        originals,
    )
