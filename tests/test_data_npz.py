"""The npz loader: the user's own arrays in every supported shape, and every validation error."""

import numpy as np
import pytest

from modulemesh.data import load_dataset
from modulemesh.errors import DataError


def save(tmp_path, name="mine.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def images(n, shape, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.floating):
        return rng.random((n, *shape)).astype(dtype)
    return rng.integers(0, 256, (n, *shape)).astype(dtype)


def base(**override):
    arrays = {
        "x_train": images(6, (5, 4)),
        "y_train": np.array([0, 1, 2, 0, 1, 2]),
        "x_test": images(3, (5, 4), seed=1),
        "y_test": np.array([2, 1, 0]),
    }
    arrays.update(override)
    return arrays


def test_grayscale_nhw_gains_a_channel(tmp_path):
    arrays = base()
    ds = load_dataset("npz", save(tmp_path, **arrays))
    assert ds.x_train.shape == (6, 1, 5, 4) and ds.x_train.dtype == np.uint8
    np.testing.assert_array_equal(ds.x_train[:, 0], arrays["x_train"])
    assert ds.name == "mine" and ds.class_names == ["0", "1", "2"]


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_channels_last_is_transposed(tmp_path, channels):
    x = images(6, (5, 7, channels))
    ds = load_dataset("npz", save(tmp_path, **base(x_train=x, x_test=x[:3])))
    assert ds.x_train.shape == (6, channels, 5, 7)
    np.testing.assert_array_equal(ds.x_train, x.transpose(0, 3, 1, 2))
    assert ds.x_train.flags["C_CONTIGUOUS"]


def test_channels_first_is_kept(tmp_path):
    x = images(6, (3, 8, 8))
    ds = load_dataset("npz", save(tmp_path, **base(x_train=x, x_test=x[:3])))
    np.testing.assert_array_equal(ds.x_train, x)


def test_ambiguous_layout_defaults_to_nchw_and_can_be_forced(tmp_path):
    x = images(6, (3, 3, 3))
    path = save(tmp_path, **base(x_train=x, x_test=x[:3]))
    np.testing.assert_array_equal(load_dataset("npz", path).x_train, x)
    np.testing.assert_array_equal(load_dataset("npz", path, layout="nhwc").x_train, x.transpose(0, 3, 1, 2))


def test_flat_features_become_float32(tmp_path):
    x = np.arange(12, dtype=np.int32).reshape(6, 2)
    ds = load_dataset("npz", save(tmp_path, **base(x_train=x, x_test=x[:3].astype(np.int32))))
    assert ds.x_train.dtype == np.float32 and ds.input_shape == (2,)
    np.testing.assert_array_equal(ds.x_train, x.astype(np.float32))


def test_float_images_are_kept_float32_unchanged(tmp_path):
    x = images(6, (4, 4, 3), dtype=np.float64)
    ds = load_dataset("npz", save(tmp_path, **base(x_train=x, x_test=x[:3])))
    assert ds.x_train.dtype == np.float32 and ds.x_train.shape == (6, 3, 4, 4)
    np.testing.assert_allclose(ds.x_train, x.transpose(0, 3, 1, 2).astype(np.float32))


def test_integer_images_in_byte_range_become_uint8(tmp_path):
    x = images(6, (5, 4)).astype(np.int64)
    ds = load_dataset("npz", save(tmp_path, **base(x_train=x, x_test=x[:3])))
    assert ds.x_train.dtype == np.uint8
    np.testing.assert_array_equal(ds.x_train[:, 0], x)


def test_arbitrary_integer_labels_are_remapped_with_class_names(tmp_path):
    arrays = base(
        y_train=np.array([10, -4, 7, 10, 7, -4]),
        y_test=np.array([7, 10, -4]),
        class_names=np.array(["minus four", "seven", "ten"]),
    )
    ds = load_dataset("npz", save(tmp_path, **arrays))
    assert ds.label_map == {"-4": 0, "7": 1, "10": 2}
    np.testing.assert_array_equal(ds.y_train, [2, 0, 1, 2, 1, 0])
    np.testing.assert_array_equal(ds.y_test, [1, 2, 0])
    assert ds.class_names == ["minus four", "seven", "ten"]


def test_class_names_indexed_by_label_when_longer(tmp_path):
    arrays = base(
        y_train=np.array([1, 3, 1, 3, 1, 3]), y_test=np.array([3, 1, 1]), class_names=np.array(["a", "b", "c", "d"])
    )
    ds = load_dataset("npz", save(tmp_path, **arrays))
    assert ds.class_names == ["b", "d"]


def test_integral_float_and_column_labels_are_accepted(tmp_path):
    ds = load_dataset("npz", save(tmp_path, **base(y_train=np.array([[0.0], [1.0], [2.0], [0.0], [1.0], [2.0]]))))
    np.testing.assert_array_equal(ds.y_train, [0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize(
    "override, message",
    [
        ({"y_train": np.array([0, 1, 2, 0, 1])}, "train has 6 samples but 5 labels"),
        ({"x_test": images(3, (4, 4))}, r"x_train samples have shape \(1, 5, 4\) but x_test samples have \(1, 4, 4\)"),
        ({"y_train": np.array([0.5, 1, 2, 0, 1, 2])}, "non-integer values"),
        ({"y_train": np.array(["a", "b", "c", "a", "b", "c"])}, "must hold integer class labels, got dtype <U1"),
        ({"x_train": np.full((6, 5, 4), np.nan)}, "NaN"),
        ({"x_train": np.array([[1.0, np.nan]] * 6), "x_test": np.ones((3, 2))}, "NaN"),
        ({"y_test": np.array([0, 1, 5])}, "test labels 5 never occur in the training labels"),
        ({"x_train": np.zeros((0, 5, 4), np.uint8), "y_train": np.zeros(0, np.int64)}, "x_train is empty"),
        ({"x_test": images(3, (5, 4)).astype(np.float32)}, "x_train is uint8 but x_test is float32"),
        ({"x_train": images(6, (5, 4, 6)), "x_test": images(3, (5, 4, 6))}, "cannot tell the channel axis"),
        ({"x_train": np.zeros((6, 2, 2, 2, 2)), "x_test": np.zeros((3, 2, 2, 2, 2))}, "must have 3 or 4 dims"),
        ({"x_train": np.full((6, 5, 4), 300, np.int32), "x_test": np.zeros((3, 5, 4), np.int32)}, "0..255"),
        ({"class_names": np.array(["a", "b"])}, "class_names has 2 entries"),
    ],
)
def test_invalid_arrays_raise_data_error_naming_the_file(tmp_path, override, message):
    path = save(tmp_path, "broken.npz", **base(**override))
    with pytest.raises(DataError, match=message) as err:
        load_dataset("npz", path)
    assert "broken.npz" in str(err.value)


def test_missing_keys_are_listed(tmp_path):
    arrays = base()
    del arrays["y_test"], arrays["x_test"]
    with pytest.raises(DataError, match=r"lacks the arrays x_test, y_test \(it has: x_train, y_train\)"):
        load_dataset("npz", save(tmp_path, **arrays))


def test_object_arrays_are_refused_without_unpickling(tmp_path):
    arrays = base(class_names=np.array(["a", None, 3], dtype=object))
    path = tmp_path / "obj.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=r"obj\.npz contains object \(pickled\) arrays"):
        load_dataset("npz", path)


def test_not_a_zip_and_missing_file(tmp_path):
    bad = tmp_path / "junk.npz"
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(DataError, match=r"junk\.npz"):
        load_dataset("npz", bad)
    with pytest.raises(DataError, match=r"absent\.npz does not exist"):
        load_dataset("npz", tmp_path / "absent.npz")
    with pytest.raises(DataError, match="is not a file"):
        load_dataset("npz", tmp_path)


def test_single_npy_is_rejected(tmp_path):
    path = tmp_path / "one.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(DataError, match=r"one\.npy is a single \.npy array"):
        load_dataset("npz", path)


def test_bad_layout_option(tmp_path):
    with pytest.raises(DataError, match="layout must be one of"):
        load_dataset("npz", save(tmp_path, **base()), layout="hwc")


def test_ambiguous_layout_prefers_square_images(tmp_path):
    x = images(6, (4, 4, 3))  # NHWC 4x4 RGB, or NCHW with 4 channels of 4x3: square wins
    ds = load_dataset("npz", save(tmp_path, **base(x_train=x, x_test=x[:3])))
    np.testing.assert_array_equal(ds.x_train, x.transpose(0, 3, 1, 2))
