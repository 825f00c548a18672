"""IDX parsing and the idx / fashion_mnist loaders, on tiny files written in the real format."""

import gzip
import struct

import numpy as np
import pytest

from modulemesh.data import load_dataset, mnist_family
from modulemesh.data.formats import parse_idx, read_idx
from modulemesh.errors import DataError

_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def idx_bytes(arr):
    arr = np.asarray(arr)
    header = bytes([0, 0, _CODES[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path, arr, gz=False):
    data = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def make_idx_dir(root, n_train=6, n_test=4, gz=False, labels=None):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (n_train, 5, 4), dtype=np.uint8)
    x_test = rng.integers(0, 256, (n_test, 5, 4), dtype=np.uint8)
    y_train = np.array(labels if labels is not None else [i % 3 for i in range(n_train)], dtype=np.uint8)
    y_test = np.array([i % 3 for i in range(n_test)], dtype=np.uint8)
    root.mkdir(exist_ok=True)
    write_idx(root / "train-images-idx3-ubyte", x_train, gz)
    write_idx(root / "train-labels-idx1-ubyte", y_train, gz)
    write_idx(root / "t10k-images-idx3-ubyte", x_test, gz)
    write_idx(root / "t10k-labels-idx1-ubyte", y_test, gz)
    return x_train, y_train, x_test, y_test


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_parse_idx_all_type_codes(dtype):
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    if dtype == np.uint8:
        arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    out = parse_idx(idx_bytes(arr), "x.idx")
    assert out.dtype == np.dtype(dtype) and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)
    out[0, 0, 0] = 1  # callers get a writable array


@pytest.mark.parametrize("gz", [False, True])
def test_idx_loader_reads_plain_and_gzip_files(tmp_path, gz):
    x_train, y_train, x_test, y_test = make_idx_dir(tmp_path / "d", gz=gz)
    ds = load_dataset("idx", tmp_path / "d")
    assert ds.x_train.shape == (6, 1, 5, 4) and ds.x_test.shape == (4, 1, 5, 4)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    np.testing.assert_array_equal(ds.x_train[:, 0], x_train)
    np.testing.assert_array_equal(ds.x_test[:, 0], x_test)
    np.testing.assert_array_equal(ds.y_train, y_train)
    assert ds.class_names == ["0", "1", "2"] and ds.num_classes == 3 and ds.input_shape == (1, 5, 4)


def test_idx_labels_are_remapped_in_sorted_order(tmp_path):
    make_idx_dir(tmp_path / "d", n_train=4, n_test=2, labels=[7, 3, 9, 3])
    # test labels 0,1 are not among 3,7,9: rewrite them to valid ones.
    write_idx(tmp_path / "d" / "t10k-labels-idx1-ubyte", np.array([9, 7], dtype=np.uint8))
    ds = load_dataset("idx", tmp_path / "d")
    assert ds.label_map == {"3": 0, "7": 1, "9": 2}
    np.testing.assert_array_equal(ds.y_train, [1, 0, 2, 0])
    np.testing.assert_array_equal(ds.y_test, [2, 1])


def test_idx_accepts_dotted_file_names(tmp_path):
    make_idx_dir(tmp_path / "d")
    (tmp_path / "d" / "train-images-idx3-ubyte").rename(tmp_path / "d" / "train-images.idx3-ubyte")
    assert load_dataset("idx", tmp_path / "d").x_train.shape == (6, 1, 5, 4)


def test_truncated_idx_file_names_the_file(tmp_path):
    make_idx_dir(tmp_path / "d")
    path = tmp_path / "d" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte is truncated.*download it again"):
        load_dataset("idx", tmp_path / "d")


def test_truncated_gzip_idx_file_names_the_file(tmp_path):
    make_idx_dir(tmp_path / "d", gz=True)
    path = tmp_path / "d" / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz"):
        load_dataset("idx", tmp_path / "d")


def test_image_and_label_counts_must_match(tmp_path):
    make_idx_dir(tmp_path / "d")
    write_idx(tmp_path / "d" / "train-labels-idx1-ubyte", np.zeros(5, dtype=np.uint8))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte holds 6 images but train-labels-idx1-ubyte holds 5"):
        load_dataset("idx", tmp_path / "d")


def test_missing_idx_file_lists_the_expected_name(tmp_path):
    make_idx_dir(tmp_path / "d")
    (tmp_path / "d" / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match=r"no t10k-images-idx3-ubyte or t10k-images-idx3-ubyte\.gz"):
        load_dataset("idx", tmp_path / "d")


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x00\x00", "too short"),
        (b"\x1f\x00\x08\x01" + b"\x00" * 8, "not an IDX file"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "unknown data type code 0x07"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x01", "truncated inside its header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x02\x01\x02\x03", "1 unexpected bytes"),
    ],
)
def test_bad_idx_headers(tmp_path, data, message):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(data)
    with pytest.raises(DataError, match=message) as err:
        read_idx(path)
    assert "bad-idx1-ubyte" in str(err.value)


def test_labels_file_with_wrong_rank_is_rejected(tmp_path):
    make_idx_dir(tmp_path / "d")
    write_idx(tmp_path / "d" / "train-labels-idx1-ubyte", np.zeros((6, 2), dtype=np.uint8))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte has shape \(6, 2\); a label file must be 1-d"):
        load_dataset("idx", tmp_path / "d")


def test_idx_root_must_be_given_and_exist(tmp_path):
    with pytest.raises(DataError, match="needs root="):
        load_dataset("idx")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("idx", tmp_path / "missing")


def test_fashion_mnist_from_root_gets_fashion_class_names(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "fm"
    d.mkdir()
    write_idx(d / "train-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), gz=True)
    write_idx(d / "train-labels-idx1-ubyte", np.arange(20, dtype=np.uint8) % 10, gz=True)
    write_idx(d / "t10k-images-idx3-ubyte", rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), gz=True)
    write_idx(d / "t10k-labels-idx1-ubyte", np.arange(10, dtype=np.uint8), gz=True)
    ds = load_dataset("fashion_mnist", d)
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    assert ds.name == "fashion_mnist" and ds.x_train.shape == (20, 1, 28, 28)


def test_fashion_mnist_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_family, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    with pytest.raises(DataError, match=r"apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion_mnist")


def test_real_fashion_mnist():
    # CI installs Debian's dataset-fashion-mnist (README's test command): missing data fails, it is not skipped.
    ds = load_dataset("fashion-mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.dtype == np.uint8 and ds.x_train.max() == 255
    np.testing.assert_array_equal(np.bincount(ds.y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.y_test), [1000] * 10)
    assert ds.class_names == mnist_family.FASHION_MNIST_CLASSES
    assert ds.label_map == {str(i): i for i in range(10)}
