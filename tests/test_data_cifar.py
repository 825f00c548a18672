"""CIFAR-100 / CIFAR-10 python-version loaders on tiny pickles written in the real layout."""

import os
import pickle

import numpy as np
import pytest

from modulemesh.data import load_dataset
from modulemesh.errors import DataError

FINE_NAMES = [f"fine{i}".encode() for i in range(100)]
COARSE_NAMES = [f"coarse{i}".encode() for i in range(20)]


def dump(path, obj, protocol=2):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def make_cifar100(root, protocol=2, n_train=6, n_test=3):
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    fine_train, fine_test = [5, 42, 99, 5, 42, 99][:n_train], [99, 5, 42][:n_test]
    for name, n, fine in (("train", n_train, fine_train), ("test", n_test, fine_test)):
        dump(
            d / name,
            {
                b"filenames": [f"img{i}.png".encode() for i in range(n)],
                b"batch_label": b"training batch 1 of 1",
                b"fine_labels": fine,
                b"coarse_labels": [f // 5 for f in fine],
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            },
            protocol,
        )
    dump(d / "meta", {b"fine_label_names": FINE_NAMES, b"coarse_label_names": COARSE_NAMES}, protocol)
    return d


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar100_fine_labels_and_pixel_layout(tmp_path, protocol):
    d = make_cifar100(tmp_path, protocol)
    ds = load_dataset("cifar100", tmp_path)
    raw = pickle.loads((d / "train").read_bytes(), encoding="bytes")[b"data"]
    assert ds.x_train.shape == (6, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32) and ds.x_train.dtype == np.uint8
    # Row layout is 1024 red, 1024 green, 1024 blue values, each row-major 32x32.
    np.testing.assert_array_equal(ds.x_train[1, 0, 0, :], raw[1, :32])
    np.testing.assert_array_equal(ds.x_train[1, 1, 0, 0], raw[1, 1024])
    np.testing.assert_array_equal(ds.x_train[1, 2, 31, 31], raw[1, 3071])
    assert ds.label_map == {"5": 0, "42": 1, "99": 2}
    assert ds.class_names == ["fine5", "fine42", "fine99"]
    np.testing.assert_array_equal(ds.y_train, [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(ds.y_test, [2, 0, 1])


def test_cifar100_coarse_labels_and_direct_root(tmp_path):
    d = make_cifar100(tmp_path)
    ds = load_dataset("cifar100", d, label="coarse")
    assert ds.label_map == {"1": 0, "8": 1, "19": 2}
    assert ds.class_names == ["coarse1", "coarse8", "coarse19"]
    np.testing.assert_array_equal(ds.y_test, [2, 0, 1])


def test_cifar100_bad_label_option(tmp_path):
    make_cifar100(tmp_path)
    with pytest.raises(DataError, match="label must be one of 'fine', 'coarse'"):
        load_dataset("cifar100", tmp_path, label="super")


def test_cifar100_missing_directory_and_meta(tmp_path):
    with pytest.raises(DataError, match="no 'train' file"):
        load_dataset("cifar100", tmp_path)
    d = make_cifar100(tmp_path / "x")
    (d / "meta").unlink()
    with pytest.raises(DataError, match=r"meta does not exist"):
        load_dataset("cifar100", d)


def test_cifar100_wrong_data_width_and_label_count(tmp_path):
    d = make_cifar100(tmp_path)
    dump(d / "test", {b"data": np.zeros((3, 100), np.uint8), b"fine_labels": [1, 2, 3]})
    with pytest.raises(DataError, match=r"test: data has shape \(3, 100\), expected \(N, 3072\)"):
        load_dataset("cifar100", tmp_path)
    dump(d / "test", {b"data": np.zeros((3, 3072), np.uint8), b"fine_labels": [5, 42]})
    with pytest.raises(DataError, match=r"test: 3 images but 2 fine_labels"):
        load_dataset("cifar100", tmp_path)
    dump(d / "test", {b"data": np.zeros((3, 3072), np.uint8)})
    with pytest.raises(DataError, match=r"test has no 'fine_labels' entry"):
        load_dataset("cifar100", tmp_path)


def test_cifar100_test_class_missing_from_train(tmp_path):
    d = make_cifar100(tmp_path)
    dump(d / "test", {b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [7], b"coarse_labels": [1]})
    with pytest.raises(DataError, match="test labels 7 never occur"):
        load_dataset("cifar100", tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_cifar100_smuggled_code_is_refused(tmp_path):
    d = make_cifar100(tmp_path)
    dump(d / "train", {b"data": _Evil(), b"fine_labels": [1]})
    with pytest.raises(DataError, match=r"refusing to unpickle GLOBAL .*system from .*cifar-100-python/train"):
        load_dataset("cifar100", tmp_path)


def test_cifar10_batches_are_concatenated(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, (2, 3072), dtype=np.uint8) for _ in range(3)]
    for i, data in enumerate(batches[:2], start=1):
        dump(d / f"data_batch_{i}", {b"data": data, b"labels": [0, i]})
    dump(d / "test_batch", {b"data": batches[2], b"labels": [2, 1]})
    dump(d / "batches.meta", {b"label_names": [b"airplane", b"automobile", b"bird"]})
    ds = load_dataset("cifar10", tmp_path)
    assert ds.x_train.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(ds.x_train.reshape(4, -1), np.concatenate(batches[:2]))
    np.testing.assert_array_equal(ds.y_train, [0, 1, 0, 2])
    assert ds.class_names == ["airplane", "automobile", "bird"]
