"""NumPy ``.npz`` archives with ``x_train``/``y_train``/``x_test``/``y_test`` (and optional class names)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import DataError
from .array_dataset import ArrayDataset, check_choice, finalize, require_root
from .formats import check_integer_labels, to_nchw

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise DataError(
                f"{path} is a single .npy array, not an .npz archive; save it with "
                "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
            )
        with z:
            missing = [k for k in _NPZ_KEYS if k not in z.files]
            if missing:
                raise DataError(
                    f"{path} lacks the arrays {', '.join(missing)} (it has: "
                    f"{', '.join(z.files) or 'none'}); "
                    "save it with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
                )
            return {k: z[k] for k in (*_NPZ_KEYS, "class_names") if k in z.files}
    except DataError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataError(
                f"{path} contains object (pickled) arrays, which are not loaded for safety; save plain "
                "numeric arrays (and class_names as a string array, e.g. np.array(names, dtype=str))"
            ) from None
        raise DataError(f"{path} is not a valid .npz file ({exc}); re-save it with np.savez") from None
    except Exception as exc:  # BadZipFile, EOFError, OSError on damaged archives
        raise DataError(
            f"{path} is not a readable .npz file ({type(exc).__name__}: {exc}); re-save it with np.savez"
        ) from None


def _npz_images(x: np.ndarray, source: str, key: str, layout: str) -> np.ndarray:
    if x.ndim == 2:
        # Flat feature vectors: float32, whatever they were saved as.
        if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise DataError(f"{source}: {key} has dtype {x.dtype}; features must be numeric")
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise DataError(f"{source}: {key} contains NaN or infinite values; clean or impute them before saving")
        return x
    x = to_nchw(x, f"{source} ({key})", layout)
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DataError(f"{source}: integer images in {key} must lie in 0..255, found {x.min()}..{x.max()}")
        return x.astype(np.uint8)
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise DataError(f"{source}: {key} contains NaN or infinite values; clean the images before saving")
        return x
    raise DataError(f"{source}: {key} has dtype {x.dtype}; images must be uint8, integer or float")


def _npz_class_namer(names: np.ndarray | None, originals: np.ndarray, source: str) -> Callable[[Any], str]:
    if names is None:
        return str
    names_list = [str(n) for n in np.asarray(names).reshape(-1).tolist()]
    if len(names_list) == len(originals):
        by_label = dict(zip(originals.tolist(), names_list))
        return lambda label: by_label[label]
    if originals.min() >= 0 and originals.max() < len(names_list):
        return lambda label: names_list[label]
    raise DataError(
        f"{source}: class_names has {len(names_list)} entries but the labels are "
        f"{originals.tolist()[:10]}; "
        "give one name per distinct label (in sorted label order) or one per index 0..max label"
    )


def load_npz(root: str | os.PathLike | None = None, layout: str = "auto") -> ArrayDataset:
    """The user's arrays from one .npz file ``root`` with ``x_train, y_train, x_test, y_test`` [, ``class_names``].

    Images (N,H,W) become (N,1,H,W); (N,H,W,C) with C in {1,3,4} becomes (N,C,H,W); (N,C,H,W) is
    kept (``layout`` = ``nchw``/``nhwc`` overrides the guess for ambiguous shapes). Flat (N,D)
    features become float32. uint8 images stay uint8, other integer images in 0..255 become
    uint8, and float images stay float32 *unchanged* (the trainer only rescales uint8, so float
    images should already be in the range the model expects, e.g. [0,1]). Labels may be any
    integers and are remapped to 0..K-1.
    """
    path = require_root(root, "npz", "the path of an .npz file with x_train, y_train, x_test, y_test")
    if not path.is_file():
        raise DataError(f"npz: {path} is not a file; root must be the path of the .npz file itself")
    check_choice(layout, ("auto", "nchw", "nhwc"), "npz", "layout")
    src = str(path)
    raw = _read_npz(path)
    for key in _NPZ_KEYS:
        if raw[key].size == 0 or raw[key].ndim == 0:
            raise DataError(f"{src}: {key} is empty (shape {raw[key].shape}); it needs at least one sample")
    x_train = _npz_images(raw["x_train"], src, "x_train", layout)
    x_test = _npz_images(raw["x_test"], src, "x_test", layout)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{src}: x_train samples have shape {x_train.shape[1:]} but x_test samples have "
            f"{x_test.shape[1:]}; both splits must have the same sample shape"
        )
    if x_train.dtype != x_test.dtype:
        raise DataError(
            f"{src}: x_train is {raw['x_train'].dtype} but x_test is {raw['x_test'].dtype}; "
            "save both splits with the same dtype and scale"
        )
    y_train = check_integer_labels(raw["y_train"], src, "y_train")
    y_test = check_integer_labels(raw["y_test"], src, "y_test")
    namer = _npz_class_namer(raw.get("class_names"), np.unique(y_train), src)
    name = path.stem
    return finalize(name, src, x_train, y_train, x_test, y_test, class_name=namer)
