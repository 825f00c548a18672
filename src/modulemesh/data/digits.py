"""scikit-learn's bundled 8x8 digits (1,797 images): the data set of fast tests and smoke runs."""

from __future__ import annotations

import numpy as np

from .array_dataset import ArrayDataset, check_fraction, check_int, finalize, no_root


def load_digits(root: None = None, test_fraction: float = 0.25, seed: int = 0) -> ArrayDataset:
    """scikit-learn's 8x8 digits (1,797 images, bundled with sklearn) as uint8 (N,1,8,8).

    The split is stratified and deterministic for a given ``seed``.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    no_root(root, "digits", "it is bundled with scikit-learn")
    fraction = check_fraction(test_fraction, "digits")
    seed = check_int(seed, "digits")
    bunch = sk_load_digits()
    # Pixel values are 0..16; spread them over the uint8 range like every other image set.
    x = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=fraction, stratify=y, random_state=seed)
    idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
    return finalize("digits", "sklearn digits", x[idx_train], y[idx_train], x[idx_test], y[idx_test])
