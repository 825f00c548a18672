"""Stored precision (expert.storage, router.state_dtype): real bytes on disk, exact round trips, bounded error."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from helpers import digits_mesh_full_and_resumed, run_digits_mesh
from modulemesh.errors import ModuleMeshError
from modulemesh.mesh import Expert
from modulemesh.mesh.storage import nbytes, pack_state, unpack_state


def test_int8_rows_stay_within_half_a_step_and_repacking_changes_nothing():
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(64, 100, generator=g) * torch.rand(64, 1, generator=g), "b": torch.randn(5, generator=g)}
    packed = pack_state(state, "int8")
    assert packed["w"].dtype == torch.int8 and packed["w.scale"].shape == (64,)
    assert packed["b"].dtype == torch.float32  # a small 1-d tensor (a bias) stays fp32
    back = unpack_state(packed)
    # Per output row the error is at most half that row's step (max|row| / 127 / 2).
    step = state["w"].abs().amax(1, keepdim=True) / 127
    assert bool(((back["w"] - state["w"]).abs() <= step / 2 + 1e-7).all())
    assert torch.equal(back["b"], state["b"])
    again = pack_state(back, "int8")
    assert all(torch.equal(again[k], packed[k]) for k in packed)
    assert nbytes(packed.values()) == 64 * 100 + 64 * 4 + 5 * 4


def test_int4_packs_two_values_a_byte_within_half_a_step_and_keeps_the_fine_keys_in_int8():
    g = torch.Generator().manual_seed(1)
    # Odd sizes on purpose: the last byte of an odd tensor holds one value.
    state = {
        "w": torch.randn(33, 7, generator=g) * torch.rand(33, 1, generator=g),
        "k": torch.randn(3, 2, 3, 3, generator=g),  # a conv kernel: one scale per output channel
        "head": torch.randn(4, 9, generator=g),
        "long": torch.randn(300, generator=g),  # a long 1-d tensor: int8
        "b": torch.randn(5, generator=g),
    }
    packed = pack_state(state, "int4", fine={"head"})
    assert packed["w"].dtype == torch.uint8 and packed["w"].numel() == (33 * 7 + 1) // 2
    assert packed["w.nibbles"].tolist() == [33, 7] and packed["k.scale"].shape == (3,)
    assert packed["head"].dtype == torch.int8 and packed["long"].dtype == torch.int8 and "head.nibbles" not in packed
    assert packed["b"].dtype == torch.float32
    back = unpack_state(packed)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in state.items()}
    for key in ("w", "k"):
        rows = state[key].reshape(state[key].shape[0], -1)
        step = rows.abs().amax(1, keepdim=True) / 7
        err = (back[key] - state[key]).reshape(rows.shape).abs()
        assert bool((err <= step / 2 + 1e-6).all()) and float(err.max()) > step.min() / 10  # really rounded
    again = pack_state(back, "int4", fine={"head"})
    assert all(torch.equal(again[k], packed[k]) for k in packed)
    assert nbytes([packed["w"]]) * 2 - 1 == nbytes([pack_state({"w": state["w"]}, "int8")["w"]])


def test_an_int4_tensor_whose_shape_does_not_match_its_bytes_is_refused():
    packed = pack_state({"w": torch.randn(6, 10)}, "int4")
    wrong = {"w.nibbles": torch.tensor([6, 12]), "w.scale": torch.ones(5), "w": torch.zeros(31, dtype=torch.uint8)}
    for key, bad in wrong.items():
        with pytest.raises(ModuleMeshError, match="int4"):
            unpack_state({**packed, key: bad})
    with pytest.raises(ModuleMeshError, match="no tensor"):
        unpack_state({"v.nibbles": packed["w.nibbles"]})


def _digits_expert():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(0)
    e = Expert("e", list(range(10)), {"type": "mlp", "hidden": [32]}, (64,))
    opt = torch.optim.SGD(e.parameters(), lr=0.1)
    for _ in range(30):
        for b in range(0, 1400, 50):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(e(x[b : b + 50]), y[b : b + 50]).backward()
            opt.step()
    return e, x[1400:], y[1400:]


def test_a_compressed_expert_keeps_its_accuracy_and_loads_bit_for_bit(tmp_path):
    e, x, y = _digits_expert()
    acc32 = float((e(x).argmax(1) == y).float().mean())
    assert acc32 > 0.85
    full = nbytes(e.state_dict().values())
    for storage, most, lost in (("fp16", 0.5, 0.01), ("int8", 0.3, 0.01), ("int4", 0.2, 0.03)):
        q = e.clone("q").freeze().compress(storage)
        acc = float((q(x).argmax(1) == y).float().mean())
        assert abs(acc - acc32) <= lost, (storage, acc, acc32)
        out = q(x)
        q.save(tmp_path / storage)
        back = Expert.load(tmp_path / storage)
        assert torch.equal(back(x), out)  # computes in fp32 from the stored form: identical outputs
        on_disk = load_file(str(tmp_path / f"{storage}.safetensors"))
        # The bytes a run reports for the expert are the bytes its file holds.
        assert nbytes(on_disk.values()) == nbytes(q.stored_state().values()) == nbytes(back.stored_state().values())
        assert nbytes(on_disk.values()) <= most * full
        assert json.loads((tmp_path / f"{storage}.json").read_text())["storage"] == storage
    # int4: the hidden layer two values a byte, the output layer (the last Linear) in int8.
    assert on_disk["net.1.weight"].dtype == torch.uint8 and on_disk["net.3.weight"].dtype == torch.int8
    q.unfreeze()  # trains again: no longer on the rounded grid, saved in fp32
    assert q.packed is None and nbytes(q.stored_state().values()) == full


_run = run_digits_mesh


def test_a_run_with_int8_experts_and_densities_reports_the_bytes_its_mesh_stores(tmp_path):
    full = _run(tmp_path, "fp32")
    small = _run(tmp_path, "int8", "--set", "expert.storage=int8", "--set", "router.state_dtype=int8")
    assert small["average_accuracy"] > 80
    assert abs(small["average_accuracy"] - full["average_accuracy"]) <= 2.0
    mesh = tmp_path / "int8" / "mesh"
    experts = [load_file(str(p)) for p in sorted((mesh / "experts").glob("*.safetensors"))]
    assert len(experts) == 5 and all(t["net.1.weight"].dtype == torch.int8 for t in experts)
    weights = sum(nbytes(v for k, v in t.items() if not k.startswith("router_state.")) for t in experts)
    assert small["parameter_bytes"] == weights
    assert small["router_state_bytes"] == nbytes(load_file(str(mesh / "router.safetensors")).values())
    assert small["parameter_bytes"] < 0.3 * full["parameter_bytes"]
    assert small["router_state_bytes"] < 0.5 * full["router_state_bytes"]
    tiny = _run(tmp_path, "int4", "--set", "expert.storage=int4", "--set", "router.state_dtype=int8")
    assert abs(tiny["average_accuracy"] - full["average_accuracy"]) <= 3.0
    experts = [load_file(str(p)) for p in sorted((tmp_path / "int4" / "mesh" / "experts").glob("*.safetensors"))]
    assert all(t["net.1.weight"].dtype == torch.uint8 for t in experts)
    assert tiny["parameter_bytes"] == sum(
        nbytes(v for k, v in t.items() if not k.startswith("router_state.")) for t in experts
    )
    assert tiny["parameter_bytes"] < 0.6 * small["parameter_bytes"]


def test_an_interrupted_int8_run_resumes_to_identical_numbers(tmp_path):
    full, resumed = digits_mesh_full_and_resumed(
        tmp_path, "--set", "expert.storage=int8", "--set", "router.state_dtype=int8"
    )
    # The finished experts come back from the checkpoint in their stored form: the same numbers, bit for bit.
    # ... and they are still kept as int8: the resumed run reports the same bytes.
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"] and resumed["total_bytes"] == full["total_bytes"]


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=2, max_size=4),
    scale=st.floats(1e-6, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
def test_int4_round_trips_any_shape_within_half_a_step(shape, scale, seed):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    packed = pack_state({"w": t}, "int4")
    back = unpack_state(packed)["w"]
    assert back.shape == t.shape and packed["w"].numel() == (t.numel() + 1) // 2
    rows = t.reshape(shape[0], -1)
    step = rows.abs().amax(1, keepdim=True) / 7
    assert bool(((back.reshape(rows.shape) - rows).abs() <= step / 2 + step * 1e-5).all())
    assert all(torch.equal(v, packed[k]) for k, v in pack_state({"w": back}, "int4").items())
