"""The stacked upload path (one pass over the ``(K, ...)`` client stack) against the per-client loop it
replaced: the server receives the same tensors bit for bit and every message counts the same bytes."""

from functools import partial

import pytest
import torch
from sklearn.datasets import load_digits

from helpers import digits_fed_data
from modulemesh.federated import sim
from modulemesh.federated.aggregate import aggregate, aggregate_stacked
from modulemesh.federated.config import FederationConfig
from modulemesh.federated.sim import weight_runners
from modulemesh.federated.sim.upload import Poison, upload, upload_loop


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


fed_data = partial(digits_fed_data, k=8, alpha=0.5)


def cfg(**kw):
    base = dict(clients=8, rounds=2, lr=0.2, local_epochs=2, backbone={"type": "mlp", "hidden": [32]})
    base["distill"] = {"proxy_size": 300, "student_epochs": 2, "student_lr": 0.2, **kw.pop("distill", {})}
    base.update(kw)
    return FederationConfig(**base)


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8", "lowrank:2"])
def test_stacked_upload_equals_the_per_client_loop(digits, codec):
    runner = sim.make_runner(cfg(mode="fedavg"), fed_data(digits), 0)
    runner.train_clients(runner.stack, 0)  # clients that differ from each other
    start = {"model": {n: v[0] + 0.5 for n, v in runner.stack.params.items()}}
    mods = {"model": runner.stack.params, "fisher": {n: v.abs() for n, v in runner.stack.params.items()}}
    before = {n: v.clone() for n, v in runner.stack.params.items()}
    w = next(iter(before))
    for senders in ([0, 2, 3, 5, 7], list(range(8))):
        poison = Poison([3, 6], start, 4.0)  # client 6 does not send; 3 sends a poisoned update
        fast, fast_sizes = upload(mods, senders, codec, "cpu", poison)
        slow, slow_sizes = upload_loop(mods, senders, codec, "cpu", poison)
        assert fast_sizes == slow_sizes and len(set(fast_sizes)) == 1 and fast_sizes[0] > 1000
        for m in mods:
            for n in mods[m]:
                assert fast[m][n].shape[0] == len(senders)
                assert torch.equal(fast[m][n], slow[m][n]), (codec, m, n)
        j = senders.index(3)
        assert not torch.equal(fast["model"][w][j], runner.stack.params[w][3])
    # the clients' own weights are untouched by poisoning what is sent
    assert all(torch.equal(before[n], runner.stack.params[n]) for n in before)
    if codec == "fp16":  # lossy: the server does not get the fp32 weights back
        assert not torch.equal(fast["model"][w][0], runner.stack.params[w][0])


@pytest.mark.parametrize("method", ["mean", "median", "trimmed_mean", "fisher"])
def test_aggregate_stacked_equals_aggregate_of_rows(method):
    g = torch.Generator().manual_seed(0)
    st = {"w": torch.randn(7, 5, 3, generator=g), "b": torch.randn(7, 3, generator=g)}
    fi = {n: torch.rand(v.shape, generator=g) for n, v in st.items()}
    counts = [5, 1, 9, 3, 3, 8, 2]
    rows = [{n: v[i] for n, v in st.items()} for i in range(7)]
    frows = [{n: v[i] for n, v in fi.items()} for i in range(7)]
    want = aggregate(rows, counts, method, 0.2, frows if method == "fisher" else None)
    got = aggregate_stacked(st, counts, method, 0.2, fi if method == "fisher" else None)
    assert all(torch.equal(want[n], got[n]) for n in st)


@pytest.mark.parametrize(
    "c",
    [
        cfg(mode="distill", distill={"feddf": True}, failure_rate=0.25, poisoned=1),
        cfg(mode="distill", distill={"feddf": True}, codec="fp16"),
        cfg(mode="fedavg", failure_rate=0.25, poisoned=2, aggregator="median"),
        cfg(mode="fedavg", aggregator="fisher", codec="fp16"),
    ],
)
def test_runs_equal_the_loop_version(digits, c, monkeypatch):
    """Whole runs (accuracy, client accuracy, every byte column) equal those with the per-client upload loop."""
    d = fed_data(digits)
    fast = sim.simulate(c, d, 0)
    monkeypatch.setattr(weight_runners, "upload", upload_loop)  # FedDF uploads through WeightExchange too
    slow = sim.simulate(c, d, 0)
    strip = [[{k: v for k, v in r.items() if k != "seconds"} for r in h] for h in (fast, slow)]
    assert strip[0] == strip[1]
    assert fast[-1]["bytes_cumulative"] > 0
    assert all(h["failed"] for h in fast) if c.failure_rate else not any(h["failed"] for h in fast)


def test_chunked_ensemble_logits_match_one_chunk(digits):
    runner = sim.make_runner(cfg(mode="fedavg"), fed_data(digits), 0)
    runner.train_clients(runner.stack, 0)
    x = runner.data.x_proxy
    whole = runner.stack.logits(x, clients=8, batch=len(x))
    chunked = runner.stack.logits(x, clients=3, batch=50)
    assert chunked.shape == whole.shape == (8, len(x), 10)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
