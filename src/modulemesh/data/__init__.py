"""Dataset loaders: everything a model trains on arrives as an :class:`ArrayDataset`.

``load_dataset(name, root, **options)`` loads one of ``available_datasets()``; problems with the
files raise :class:`~modulemesh.errors.DataError` with a message that names the fix.
"""

from .datasets import ArrayDataset, available_datasets, load_dataset

__all__ = ["ArrayDataset", "available_datasets", "load_dataset"]
