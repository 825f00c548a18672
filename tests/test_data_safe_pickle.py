"""The restricted unpickler: loads plain dataset pickles, refuses anything that could run code."""

import gzip
import os
import pickle

import numpy as np
import pytest

from modulemesh.data import safe_pickle
from modulemesh.errors import DataError


class _RunsCommand:
    """Pickles as a call to os.system, the classic pickle exploit."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_plain_containers_and_numpy_arrays_round_trip(tmp_path, protocol):
    obj = {
        b"data": np.arange(12, dtype=np.uint8).reshape(3, 4),
        "floats": np.linspace(0, 1, 5, dtype=np.float32),
        "labels": [1, 2, 3],
        "strided": np.arange(6, dtype=np.int64).reshape(2, 3).T,
        "scalar": np.float64(2.5),
        "names": (b"apple", "pear"),
        "set": {1, 2},
        "raw": bytearray(b"xy"),
    }
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    out = safe_pickle.load(path, encoding="bytes")
    np.testing.assert_array_equal(out[b"data"], obj[b"data"])
    assert out[b"data"].dtype == np.uint8
    np.testing.assert_array_equal(out["floats"], obj["floats"])
    np.testing.assert_array_equal(out["strided"], [[0, 3], [1, 4], [2, 5]])
    assert out["scalar"] == 2.5 and out["labels"] == [1, 2, 3]
    assert out["names"] == (b"apple", "pear") and out["set"] == {1, 2} and out["raw"] == bytearray(b"xy")


def test_gzip_pickle_is_detected_by_magic_bytes(tmp_path):
    path = tmp_path / "data.pkl"  # no .gz suffix on purpose
    path.write_bytes(gzip.compress(pickle.dumps(([np.ones(3)], "x"), protocol=2)))
    arrays, tag = safe_pickle.load(path)
    np.testing.assert_array_equal(arrays[0], np.ones(3))
    assert tag == "x"


def test_os_system_smuggled_by_reduce_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"data": _RunsCommand(f"touch {marker}")}))
    with pytest.raises(DataError) as err:
        safe_pickle.load(path)
    msg = str(err.value)
    assert "refusing to unpickle GLOBAL" in msg and "system" in msg and "evil.pkl" in msg
    assert not marker.exists()


def test_handwritten_global_os_system_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_v0.pkl"
    # Protocol-0 opcodes: GLOBAL os.system, MARK, STRING, TUPLE, REDUCE, STOP.
    path.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(DataError, match=r"refusing to unpickle GLOBAL os\.system from .*evil_v0\.pkl"):
        safe_pickle.load(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(eval),  # builtins.eval: not a container
        pickle.dumps(np.load),  # a numpy function that is not needed for arrays
        pickle.dumps(np.random.default_rng(0)),  # arbitrary numpy class
    ],
)
def test_other_globals_are_refused(payload):
    with pytest.raises(DataError, match="refusing to unpickle GLOBAL"):
        safe_pickle.loads(payload, "payload.pkl")


def test_truncated_pickle_is_a_data_error_naming_the_file(tmp_path):
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps({"data": np.zeros(100)}, protocol=2)[:50])
    with pytest.raises(DataError, match=r"cut\.pkl.*truncated or corrupt"):
        safe_pickle.load(path)


def test_damaged_gzip_is_a_data_error(tmp_path):
    path = tmp_path / "cut.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps(list(range(1000))))[:30])
    with pytest.raises(DataError, match=r"cut\.pkl\.gz"):
        safe_pickle.load(path)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"nope\.pkl does not exist"):
        safe_pickle.load(tmp_path / "nope.pkl")
