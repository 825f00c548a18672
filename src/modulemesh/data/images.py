"""Listing, decoding and resizing image files with Pillow, for the folder-based loaders."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError
from .cache import cached

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow ships with matplotlib, a core dependency
        raise DataError("image datasets need Pillow; install it with: pip install pillow") from None
    return Image


def check_image_size(value: Any, dataset: str) -> int:
    """Validate the ``image_size`` option: a positive int (side of the square output)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= int(value) <= 4096:
        raise DataError(f"{dataset}: image_size must be an integer between 1 and 4096, got {value!r}")
    return int(value)


def is_image(path: Path) -> bool:
    """True for a visible file with a known image extension (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(directory: Path) -> list[Path]:
    """All image files under ``directory`` (recursively), sorted for a deterministic order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if is_image(Path(f)))
    return sorted(found)


def subdirs(directory: Path) -> list[Path]:
    """Visible subdirectories of ``directory``, sorted by name."""
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def decode_image(path: Path, size: int) -> np.ndarray:
    """Decode one image file to an RGB uint8 array of shape (size, size, 3) (stretched, not cropped)."""
    Image = _pil()
    try:
        with Image.open(path) as im:
            # Lets the JPEG decoder downscale by 1/2..1/8 during decoding: large photos load far faster.
            im.draft("RGB", (size, size))
            if im.mode in ("P", "PA", "LA", "I;16"):
                # Palette/16-bit images convert to RGB cleanly (and without warnings) via RGBA / L.
                im = im.convert("RGBA" if im.mode != "I;16" else "L")
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:  # UnidentifiedImageError, truncated files, decompression bombs
        raise DataError(
            f"cannot decode image {path} ({type(exc).__name__}: {exc}); replace or delete the file"
        ) from None


def decode_images(paths: Sequence[Path], size: int) -> np.ndarray:
    """Decode ``paths`` into one preallocated (N, 3, size, size) uint8 array."""
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    with warnings.catch_warnings():
        # Pillow warns about e.g. odd EXIF data; one bad header in 100k files is not worth a warning each.
        warnings.simplefilter("ignore", UserWarning)
        for i, path in enumerate(paths):
            out[i] = decode_image(path, size).transpose(2, 0, 1)
    return out


def file_list_key(root: Path, paths: Sequence[Path]) -> dict[str, Any]:
    """Cache-key fields for a folder dataset: the root, the file count and a hash of the file names."""
    digest = hashlib.sha256()
    for p in paths:
        digest.update(str(p.relative_to(root) if p.is_relative_to(root) else p).encode("utf-8", "surrogateescape"))
        digest.update(b"\0")
    return {"root": str(root.resolve()), "count": len(paths), "files": digest.hexdigest()[:20]}


def decode_images_cached(kind: str, root: Path, paths: Sequence[Path], size: int) -> np.ndarray:
    """:func:`decode_images` through the on-disk cache, keyed by root, file list and size."""
    key = {**file_list_key(root, paths), "image_size": size}
    arrays, _ = cached(kind, key, lambda: ({"x": decode_images(paths, size)}, {}))
    return arrays["x"]


def resize_batch(x_nhwc: np.ndarray, size: int) -> np.ndarray:
    """Resize (N, H, W, 3) uint8 images to (N, 3, size, size) with the same filter as :func:`decode_image`."""
    Image = _pil()
    out = np.empty((len(x_nhwc), 3, size, size), dtype=np.uint8)
    for i, img in enumerate(x_nhwc):
        if img.shape[:2] != (size, size):
            img = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
        out[i] = img.transpose(2, 0, 1)
    return out
