"""Pure federated algorithms against hand-computed values: partitions, aggregation, compression,
confidence-weighted logit aggregation, topologies, membership-inference AUC."""

import math

import numpy as np
import pytest
import torch

from modulemesh.errors import ConfigError, DataError
from modulemesh.federated import aggregate as agg
from modulemesh.federated import compress, partition, topology
from modulemesh.federated.logit_distill import aggregate_logits, client_weights, confidence
from modulemesh.federated.privacy import auc

# ---------------------------------------------------------------- partition

LABELS = np.repeat(np.arange(10), 200)


def _check_disjoint_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n


def test_iid_partition_disjoint_cover_balanced_and_seeded():
    parts = partition.iid(2000, 7, seed=3)
    _check_disjoint_cover(parts, 2000)
    assert {len(p) for p in parts} <= {285, 286}
    again = partition.iid(2000, 7, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition.iid(2000, 7, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_partition_properties():
    skews = {}
    for alpha in (100.0, 1.0, 0.1):
        parts = partition.dirichlet(LABELS, 10, alpha, seed=0, min_size=5)
        _check_disjoint_cover(parts, len(LABELS))
        assert min(len(p) for p in parts) >= 5
        skews[alpha] = partition.label_skew(parts, LABELS, 10)
    assert skews[100.0] < 0.15 < skews[1.0] < skews[0.1]
    assert skews[0.1] > 0.6
    a = partition.dirichlet(LABELS, 10, 0.1, seed=5)
    b = partition.dirichlet(LABELS, 10, 0.1, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_clientwise_dirichlet_gives_every_one_of_many_clients_data():
    """The per-class convention cannot give 1,000 clients data at alpha 0.1; the client-wise one does."""
    labels = np.repeat(np.arange(10), 2000)
    with pytest.raises(DataError, match="federation.min_client_size"):
        partition.dirichlet(labels, 1000, 0.1, seed=0, min_size=1, max_tries=5)
    parts = partition.dirichlet_clientwise(labels, 1000, 0.1, seed=0)
    _check_disjoint_cover(parts, len(labels))
    assert {len(p) for p in parts} == {20}  # balanced sizes
    # each client's own mix is skewed (alpha 0.1: a few classes), far more than an IID split's
    assert partition.label_skew(parts, labels, 10) > 0.6
    assert partition.label_skew(partition.dirichlet_clientwise(labels, 1000, 100.0, seed=0), labels, 10) < 0.3
    again = partition.dirichlet_clientwise(labels, 1000, 0.1, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_clientwise_lognormal_sizes_vary_and_respect_the_minimum():
    sizes = partition.client_sizes(20000, 100, "lognormal", seed=1, min_size=50)
    assert sizes.sum() == 20000 and sizes.min() >= 50
    assert sizes.std() > 0.1 * sizes.mean()  # unbalanced, unlike "balanced"
    parts = partition.partition("dirichlet_clientwise", LABELS, 10, alpha=1.0, seed=2, sizes="lognormal", min_size=50)
    _check_disjoint_cover(parts, len(LABELS))
    with pytest.raises(ConfigError, match="unknown client sizes"):
        partition.client_sizes(100, 3, "zipf")
    with pytest.raises(DataError, match="federation.min_client_size"):
        partition.client_sizes(100, 3, min_size=50)


def test_partition_bad_inputs_have_clear_errors():
    with pytest.raises(ConfigError, match="alpha must be > 0"):
        partition.dirichlet(LABELS, 3, 0.0)
    with pytest.raises(DataError, match="cannot split"):
        partition.iid(3, 5)
    with pytest.raises(ConfigError, match="unknown partition"):
        partition.partition("pathological", LABELS, 3)


def test_task_partition_gives_whole_tasks_to_clients():
    parts = partition.by_task(LABELS, 5, seed=0)
    _check_disjoint_cover(parts, len(LABELS))
    classes = [set(np.unique(LABELS[p]).tolist()) for p in parts]
    assert all(len(c) == 2 for c in classes)
    assert sorted(sorted(c) for c in classes) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert partition.label_skew(parts, LABELS, 10) == pytest.approx(0.8)


# ---------------------------------------------------------------- aggregation


def test_fedavg_weights_by_counts_over_holders_only():
    a = {"enc": torch.tensor([1.0, 1.0]), "head": torch.tensor([10.0])}
    b = {"enc": torch.tensor([4.0, 7.0])}  # b has no head
    c = {"head": torch.tensor([40.0])}
    out = agg.aggregate([a, b, c, None], [1, 2, 3, 100])
    # enc over a,b: (1*1 + 2*4)/3 = 3, (1*1 + 2*7)/3 = 5 ; head over a,c: (1*10 + 3*40)/4 = 32.5
    assert torch.allclose(out["enc"], torch.tensor([3.0, 5.0]))
    assert torch.allclose(out["head"], torch.tensor([32.5]))


def test_module_fedavg_with_per_module_counts():
    m1 = {"w": torch.tensor([2.0])}
    out = agg.aggregate_modules(
        [
            {"e0": m1, "e1": {"w": torch.tensor([0.0])}},
            {"e1": {"w": torch.tensor([6.0])}},
            {"e2": {"w": torch.tensor([5.0])}},
        ],
        [{"e0": 1, "e1": 1}, 2, 7],
    )
    assert out["e0"]["w"].item() == 2.0  # one holder: unchanged
    assert out["e1"]["w"].item() == pytest.approx(4.0)  # (1*0 + 2*6)/3
    assert out["e2"]["w"].item() == 5.0


def test_median_and_trimmed_mean_resist_a_poisoned_client():
    honest = [torch.tensor([1.0, 2.0]), torch.tensor([1.2, 2.2]), torch.tensor([0.8, 1.8]), torch.tensor([1.1, 2.1])]
    poisoned = torch.tensor([1000.0, -1000.0])
    contribs = [{"w": t} for t in honest + [poisoned]]
    w = [1] * 5
    mean = agg.aggregate(contribs, w)["w"]
    med = agg.aggregate(contribs, w, "median")["w"]
    tm = agg.aggregate(contribs, w, "trimmed_mean", trim=0.2)["w"]
    assert mean[0] > 100
    assert torch.allclose(med, torch.tensor([1.1, 2.0]))  # sorted: [.8,1,1.1,1.2,1000], [-1000,1.8,2,2.1,2.2]
    # trim 1 of each end: [1,1.1,1.2] -> 1.1 ; [1.8,2,2.1] -> 1.9667
    assert torch.allclose(tm, torch.tensor([1.1, (1.8 + 2.0 + 2.1) / 3]))
    even = agg.coordinate_median(torch.tensor([[1.0], [3.0], [10.0], [2.0]]))
    assert even.item() == 2.5


def test_fisher_weighted_average():
    s = [{"w": torch.tensor([0.0, 0.0, 3.0])}, {"w": torch.tensor([10.0, 10.0, 5.0])}]
    f = [{"w": torch.tensor([3.0, 1.0, 0.0])}, {"w": torch.tensor([1.0, 1.0, 0.0])}]
    out = agg.aggregate(s, [1, 1], "fisher", fishers=f)["w"]
    # (3*0 + 1*10)/4 = 2.5 ; (0+10)/2 = 5 ; zero Fisher -> plain mean 4
    assert torch.allclose(out, torch.tensor([2.5, 5.0, 4.0]))
    with pytest.raises(ConfigError, match="Fisher"):
        agg.aggregate(s, [1, 1], "fisher")


def test_aggregate_errors():
    with pytest.raises(ConfigError, match="different shapes"):
        agg.aggregate([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], [1, 1])
    with pytest.raises(ConfigError, match="weights"):
        agg.aggregate([{"w": torch.zeros(2)}], [1, 2])
    with pytest.raises(ConfigError, match="unknown aggregation"):
        agg.aggregate([{"w": torch.zeros(2)}], [1], "krum")
    ints = agg.aggregate([{"n": torch.tensor(3)}, {"n": torch.tensor(5)}], [1, 1])
    assert ints["n"].item() == 5 and ints["n"].dtype == torch.int64


# ---------------------------------------------------------------- compression


def test_codec_byte_counts_are_exact():
    x = torch.randn(7, 10)
    head = 3 + 4 * 2
    assert len(compress.encode(x, "fp32")) == head + 70 * 4
    assert len(compress.encode(x, "fp16")) == head + 70 * 2
    assert len(compress.encode(x, "int8")) == head + 8 + 70
    assert len(compress.encode(x, "topk:3")) == head + 2 + 7 * 3 * 2 + 7 * 3
    assert len(compress.encode(x, "lowrank:2")) == head + 2 + 7 * 2 * 2 + 2 * 10 * 2
    state = {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4)}
    blob = compress.encode_state(state, "fp32")
    assert len(blob) == 4 + (2 + 8 + 3 + 8 + 48) + (2 + 6 + 3 + 4 + 16)


def test_codec_round_trips():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 10, generator=g) * 5
    assert torch.equal(compress.roundtrip(x, "fp32")[0], x)
    assert torch.allclose(compress.roundtrip(x, "fp16")[0], x, atol=1e-2)
    q = compress.roundtrip(x, "int8")[0]
    step = (x.max() - x.min()) / 255
    assert (q - x).abs().max() <= step / 2 + 1e-5
    low = torch.randn(30, 2, generator=g) @ torch.randn(2, 20, generator=g)
    assert torch.allclose(compress.roundtrip(low, "lowrank:2")[0], low, atol=0.05)
    assert not torch.allclose(compress.roundtrip(low, "lowrank:1")[0], low, atol=0.05)
    # topk: the kept classes keep their log-probabilities; the rest share the remaining mass
    tk = compress.roundtrip(x, "topk:3")[0]
    logp = torch.log_softmax(x, 1)
    top = logp.topk(3, 1)
    assert torch.allclose(tk.gather(1, top.indices), top.values, atol=1e-2)
    assert torch.allclose(tk.exp().sum(1), torch.ones(50), atol=1e-2)
    assert torch.equal(tk.argmax(1), x.argmax(1))
    ints = {"n": torch.tensor([1, 2, 3]), "w": torch.randn(3, 3)}
    back = compress.decode_state(compress.encode_state(ints, "int8"))
    assert torch.equal(back["n"], ints["n"]) and back["w"].shape == (3, 3)


def test_codec_errors():
    with pytest.raises(ConfigError, match="unknown codec"):
        compress.encode(torch.zeros(2), "zip")
    with pytest.raises(ConfigError, match="logits"):
        compress.encode_state({"w": torch.zeros(2, 2)}, "topk:1")
    with pytest.raises(DataError, match="truncated"):
        compress.decode(compress.encode(torch.zeros(4, 4))[:-3])


# ---------------------------------------------------------------- federated distillation


def test_confidence_scores_and_weights():
    sure = torch.tensor([[10.0, 0.0, 0.0]])
    unsure = torch.tensor([[0.0, 0.0, 0.0]])
    assert confidence(unsure).item() == pytest.approx(-math.log(3))
    assert confidence(unsure, "max_prob").item() == pytest.approx(1 / 3)
    w = client_weights(torch.stack([sure, unsure]), "neg_entropy", tau=1.0)
    c_sure = confidence(sure).item()
    expected = math.exp(c_sure) / (math.exp(c_sure) + math.exp(-math.log(3)))
    assert w[0, 0].item() == pytest.approx(expected, rel=1e-5)
    sharp = client_weights(torch.stack([sure, unsure]), "neg_entropy", tau=0.01)
    assert sharp[0, 0].item() > 0.999
    flat = client_weights(torch.stack([sure, unsure]), "uniform")
    assert torch.allclose(flat, torch.full((2, 1), 0.5))


def test_aggregate_logits_matches_formula_and_mask():
    logits = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]], [[5.0, 5.0]]])  # K=3, N=1, C=2
    mask = torch.tensor([True, True, False])
    out = aggregate_logits(logits, "max_prob", tau=0.5, mask=mask, space="logits")
    p = torch.softmax(logits[:2, 0], -1)
    a = torch.softmax(p.max(-1).values / 0.5, 0)
    expected = (a[:, None] * torch.log_softmax(logits[:2, 0], -1)).sum(0)
    assert torch.allclose(out[0], expected, atol=1e-6)
    probs = aggregate_logits(logits, "max_prob", tau=0.5, mask=mask, space="probs")
    assert torch.allclose(probs[0].exp(), (a[:, None] * p).sum(0), atol=1e-6)
    # a confidently wrong client is out-voted by the median of three honest ones
    honest = torch.tensor([[[3.0, 0.0]], [[2.0, 0.0]], [[2.5, 0.0]]])
    evil = torch.tensor([[[0.0, 50.0]]])
    both = torch.cat([honest, evil])
    assert aggregate_logits(both, "neg_entropy", 1.0)[0].argmax() == 1
    assert aggregate_logits(both, robust="median")[0].argmax() == 0
    with pytest.raises(ConfigError, match="no client answered"):
        aggregate_logits(logits, mask=torch.zeros(3, dtype=torch.bool))


# ---------------------------------------------------------------- topology and privacy


def test_topologies():
    assert topology.ring(5)[0] == [1, 4]
    assert topology.star(4) == [[1, 2, 3], [0], [0], [0]]
    assert topology.num_edges(topology.full(6)) == 15
    g = topology.random_regular(20, 4, seed=1)
    assert all(len(n) == 4 and i not in n for i, n in enumerate(g))
    assert all(i in g[j] for i, n in enumerate(g) for j in n)
    assert g == topology.random_regular(20, 4, seed=1)
    with pytest.raises(ConfigError, match="even"):
        topology.random_regular(5, 3)


def test_auc_hand_computed():
    assert auc([3, 4], [1, 2]) == 1.0
    assert auc([1, 2], [3, 4]) == 0.0
    assert auc([1, 3], [2, 2]) == 0.5
    assert auc([2], [2]) == 0.5
    assert auc([1, 3, 5], [2, 4]) == pytest.approx(3 / 6)


def test_shipped_federate_configs_validate():
    from pathlib import Path

    from modulemesh.config import load_config
    from modulemesh.federated.config import FederateExperiment

    paths = sorted((Path(__file__).resolve().parents[1] / "configs").glob("federate_*.yaml"))
    assert len(paths) >= 2
    for p in paths:
        exp = load_config(FederateExperiment, p)
        assert exp.federation.clients >= 2 and exp.federation.distill.tau > 0
    with pytest.raises(ConfigError, match="valid keys"):
        load_config(FederateExperiment, paths[0], ["federation.distill.tua=1"])
