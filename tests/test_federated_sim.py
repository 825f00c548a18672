"""In-process federated simulation on sklearn digits: determinism, failures, selective update,
poisoning with robust aggregation, membership inference, and the ``modulemesh federate`` command."""

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from helpers import digits_fed_data, small_federation
from modulemesh.cli import main as cli_main
from modulemesh.federated import sim
from modulemesh.federated.compress import encode_state
from modulemesh.federated.privacy import loss_threshold_auc


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


fed_data = digits_fed_data


def cfg(**kw):
    return small_federation(**{"modules": {"expert": {"type": "mlp", "hidden": [16]}}, **kw})


@pytest.mark.parametrize("mode", ["fedavg", "distill", "modules"])
def test_same_seed_same_numbers(digits, mode):
    runs = [sim.simulate(cfg(mode=mode), fed_data(digits, seed=s), seed=s) for s in (0, 0, 1)]
    strip = [[{k: v for k, v in r.items() if k != "seconds"} for r in h] for h in runs]
    assert strip[0] == strip[1]
    assert strip[0] != strip[2]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in runs[0])


def test_training_beats_chance_and_fedavg_bytes_are_model_sized(digits):
    d = fed_data(digits)
    c = cfg(mode="fedavg", rounds=3)
    runner = sim.make_runner(c, d, 0)
    hist = sim.simulate(c, d, 0, runner=runner)
    assert hist[-1]["accuracy"] > 0.7
    size = len(encode_state(runner.global_params, "fp32"))
    assert hist[0]["peer_bytes_sent"] == [size] * 5
    assert hist[0]["peer_bytes_received"] == [size] * 5  # round 1: every client downloads the model when it joins
    assert hist[1]["server_bytes_sent"] == 5 * size and hist[1]["server_bytes_received"] == 5 * size
    # each transfer counted once: 5 uploads + 5 downloads per round
    assert all(h["bytes_sent"] == h["bytes_received"] == 10 * size for h in hist)
    assert hist[-1]["bytes_cumulative"] == 3 * 10 * size


def test_peer_failure_round_completes_with_the_rest(digits):
    d = fed_data(digits, k=10, proxy=300)
    for mode in ("fedavg", "distill", "modules"):
        hist = sim.simulate(cfg(mode=mode, clients=10, failure_rate=0.3, rounds=2), d, seed=0)
        for rec in hist:
            assert len(rec["failed"]) == 3
            assert all(rec["peer_bytes_sent"][i] == 0 for i in rec["failed"])
            live = [i for i in range(10) if i not in rec["failed"]]
            assert sum(rec["peer_bytes_sent"][i] > 0 for i in live) >= (7 if mode != "modules" else 1)
            assert np.isfinite(rec["accuracy"])
        assert hist[0]["failed"] != hist[1]["failed"]  # transient: other peers fail next round
    perm = sim.simulate(cfg(mode="fedavg", clients=10, failure_rate=0.3, failure_mode="permanent", rounds=2), d, seed=0)
    assert perm[0]["failed"] == perm[1]["failed"]
    assert all(perm[1]["peer_bytes_received"][i] == 0 for i in perm[0]["failed"])


def test_selective_update_sends_only_changed_modules(digits):
    d = fed_data(digits, k=6)
    c = cfg(
        mode="modules",
        clients=6,
        rounds=2,
        modules={
            "expert": {"type": "mlp", "hidden": [16]},
            "modules_per_peer": 2,
            "update_fraction": 0.5,
            "topology": "ring",
        },
    )
    runner = sim.make_runner(c, d, 0)
    module_bytes = len(encode_state(runner.peer_modules(0)["m0"], "fp32"))
    hist = sim.simulate(c, d, 0, runner=runner)
    # ring + contiguous hosting: each module has exactly one other holder, a ring neighbour.
    # Each peer trains one of its two modules per round, so it sends exactly one module once.
    assert hist[1]["peer_bytes_sent"] == [module_bytes] * 6
    assert hist[1]["peer_bytes_received"] == [module_bytes] * 6
    # round 1 adds the join: every peer downloads its 2 modules from the neighbour hosting each
    assert hist[0]["peer_bytes_received"] == [3 * module_bytes] * 6 and hist[0]["bytes_sent"] == 18 * module_bytes
    assert all(h["bytes_sent"] == sum(h["peer_bytes_sent"]) for h in hist)  # peer to peer: no server, counted once
    full = sim.simulate(
        cfg(mode="modules", clients=6, rounds=2, modules={"expert": {"type": "mlp", "hidden": [16]}}), d, 0
    )
    assert full[1]["peer_bytes_sent"] == [2 * module_bytes] * 6
    frozen = sim.simulate(
        cfg(
            mode="modules",
            clients=6,
            rounds=1,
            modules={"expert": {"type": "mlp", "hidden": [16]}, "send_threshold": 1e9},
        ),
        d,
        0,
    )
    assert frozen[0]["modules_sent"] == 0 and frozen[0]["bytes_sent"] == 12 * module_bytes  # only the join downloads


def test_module_consensus_equalises_duplicates_on_full_topology(digits):
    d = fed_data(digits, k=4)
    c = cfg(
        mode="modules",
        clients=4,
        rounds=1,
        modules={
            "expert": {"type": "mlp", "hidden": [16]},
            "topology": "full",
            "num_modules": 2,
            "modules_per_peer": 2,
        },
    )
    runner = sim.make_runner(c, d, 0)
    sim.simulate(c, d, 0, runner=runner)
    assert runner.hosted == [["m0", "m1"], ["m1", "m0"], ["m0", "m1"], ["m1", "m0"]]
    peers = [runner.peer_modules(p) for p in range(4)]
    for n in peers[0]["m0"]:
        for m in ("m0", "m1"):
            assert all(torch.allclose(peers[0][m][n], peers[p][m][n], atol=1e-6) for p in range(1, 4))
        assert not torch.allclose(peers[0]["m0"][n], peers[0]["m1"][n])  # two different modules stay different


def test_poisoned_peer_hurts_mean_but_not_median(digits):
    d = fed_data(digits, k=7, alpha=100.0)
    accs = {}
    for agg in ("mean", "median"):
        for poisoned in (0, 1):
            h = sim.simulate(cfg(mode="fedavg", clients=7, rounds=3, aggregator=agg, poisoned=poisoned), d, 0)
            accs[agg, poisoned] = h[-1]["accuracy"]
    assert accs["mean", 1] < accs["mean", 0] - 0.3
    assert accs["median", 1] > accs["median", 0] - 0.05
    assert accs["median", 0] > 0.7


def test_distillation_with_int8_logits_costs_a_quarter(digits):
    d = fed_data(digits)
    fp32 = sim.simulate(cfg(mode="distill"), d, 0)
    int8 = sim.simulate(cfg(mode="distill", codec="int8"), d, 0)
    assert sum(int8[0]["peer_bytes_sent"]) < 0.26 * sum(fp32[0]["peer_bytes_sent"])
    assert abs(int8[-1]["accuracy"] - fp32[-1]["accuracy"]) < 0.05
    assert fp32[-1]["teacher_proxy_accuracy"] > 0.6


def test_membership_auc_overfit_vs_random(digits):
    x, y = digits
    torch.manual_seed(0)
    members, non = (x[:20], y[:20]), (x[1000:1400], y[1000:1400])
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    rand_auc = loss_threshold_auc(net, (x[:400], y[:400]), non)  # an untrained model: no member signal
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(500):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(members[0]), members[1]).backward()
        opt.step()
    fit_auc = loss_threshold_auc(net, members, non)
    assert fit_auc > 0.85
    assert abs(rand_auc - 0.5) < 0.1


# ---------------------------------------------------------------- command

ARGS = [
    "--dataset",
    "digits",
    "--clients",
    "4",
    "--alpha",
    "1.0",
    "--seed",
    "0",
    "--set",
    "federation.distill.proxy_size=200",
    "--set",
    "federation.min_client_size=5",
    "--set",
    "federation.local_epochs=5",
    "--set",
    "federation.lr=0.2",
    "--set",
    "federation.backbone.hidden=[32]",
    "--set",
    "federation.distill.student_epochs=10",
    "--set",
    "federation.distill.student_lr=0.2",
    "--quiet",
]


def test_cli_federate_end_to_end_and_resume(tmp_path, monkeypatch):
    out = tmp_path / "fd"
    assert cli_main(["federate", "--mode", "distill", "--rounds", "3", "--out", str(out), *ARGS]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] and len(res["history"]) == 3
    assert res["summary"]["final_accuracy"] > 0.5
    # The calibrated attack ran (its power is tested in test_privacy_attacks); a 3-round FD student
    # barely overfits, so it is near chance.
    assert res["summary"]["membership_attack"].startswith("offline LiRA, 4 reference models on ")
    assert abs(res["summary"]["membership_auc"] - 0.5) < 0.15
    for f in ("rounds.csv", "config.yaml", "accuracy_vs_rounds.png", "accuracy_vs_bytes.png", "client_accuracy.png"):
        assert (out / f).stat().st_size > 0
    rows = (out / "rounds.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("round,accuracy")
    # interrupted after round 2, then resumed: same numbers as the uninterrupted run
    out2 = tmp_path / "fd2"
    orig = sim.DistillRunner.run_round

    def boom(self, r):
        if r == 2:
            raise KeyboardInterrupt
        return orig(self, r)

    monkeypatch.setattr(sim.DistillRunner, "run_round", boom)
    assert cli_main(["federate", "--mode", "distill", "--rounds", "3", "--out", str(out2), *ARGS]) == 130
    assert len(json.loads((out2 / "results.json").read_text())["history"]) == 2
    monkeypatch.setattr(sim.DistillRunner, "run_round", orig)
    assert cli_main(["federate", "--mode", "distill", "--rounds", "3", "--out", str(out2), *ARGS]) == 0
    res2 = json.loads((out2 / "results.json").read_text())
    assert [h["accuracy"] for h in res2["history"]] == [h["accuracy"] for h in res["history"]]
    assert res2["history"][-1]["bytes_cumulative"] == res["history"][-1]["bytes_cumulative"]
    # a different config in the same --out is refused with a clear message
    assert cli_main(["federate", "--mode", "fedavg", "--rounds", "3", "--out", str(out2), *ARGS]) == 2


def test_cli_federate_bad_inputs(tmp_path, capsys):
    assert cli_main(["federate", "--codec", "zip", "--out", str(tmp_path / "a"), *ARGS]) == 2
    assert "unknown codec" in capsys.readouterr().err
    assert cli_main(["federate", "--engine", "hivemind", "--out", str(tmp_path / "b"), *ARGS]) == 2
    assert "hivemind" in capsys.readouterr().err
    assert cli_main(["federate", "--set", "federation.rouns=3", "--out", str(tmp_path / "c"), *ARGS]) == 2
    assert "valid keys" in capsys.readouterr().err


def test_fisher_weighted_fedavg_sends_fisher_and_learns(digits):
    d = fed_data(digits)
    plain = sim.simulate(cfg(mode="fedavg", rounds=2), d, 0)
    fisher = sim.simulate(cfg(mode="fedavg", rounds=2, aggregator="fisher"), d, 0)
    assert sum(fisher[0]["peer_bytes_sent"]) == 2 * sum(
        plain[0]["peer_bytes_sent"]
    )  # weights + diagonal Fisher, same size
    assert fisher[-1]["accuracy"] > 0.6
