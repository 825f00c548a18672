"""The published federated-distillation switches on sklearn digits: DS-FL's sharpening, FedDF's server
step, the EMA of the global model (``federation.distill.{sharpen,feddf,ema}``)."""

import pytest
import torch

from helpers import digits_fed_data, digits_tensors, fd_config
from modulemesh.errors import ConfigError
from modulemesh.federated import sim
from modulemesh.federated import weights as wmod
from modulemesh.federated.aggregate import aggregate
from modulemesh.federated.logit_distill import aggregate_logits, sharpen
from modulemesh.federated.sim.stacked import model_accuracy


@pytest.fixture(scope="module")
def digits():
    return digits_tensors()


fed_data = digits_fed_data


cfg = fd_config


def entropy(logits):
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def test_sharpening_lowers_entropy_of_aggregated_soft_labels(digits):
    d = fed_data(digits, alpha=0.3)
    runner = sim.make_runner(cfg(), d, 0)
    runner.train_clients(runner.stack, 0)
    soft = aggregate_logits(runner.stack.logits(d.x_proxy), "neg_entropy", 1.0)
    sharp = sharpen(soft, 0.1)
    # DS-FL's ERA at T=0.1 keeps every predicted class and lowers the mean entropy (1.91 -> 1.53 nats here)
    assert torch.equal(sharp.argmax(-1), soft.argmax(-1))
    assert entropy(sharp).mean() < 0.85 * entropy(soft).mean()
    assert torch.equal(sharpen(soft, 1.0), soft)  # 1 = off
    # wired into the runner: round 1's global soft labels are the sharpened aggregate
    off, on = (sim.make_runner(cfg(sharpen=t), d, 0) for t in (1.0, 0.1))
    off.run_round(0), on.run_round(0)
    assert torch.allclose(on.soft, sharpen(off.soft, 0.1), atol=1e-5)


def test_feddf_server_step_starts_from_the_fedavg_weights_and_distills(digits, monkeypatch):
    d = fed_data(digits, alpha=0.3)
    runner = sim.make_runner(cfg(feddf=True), d, 0)
    seen = {}
    learn = runner.student.learn

    def spy(r):
        seen["start"] = runner.student.stack.member(0)
        learn(r)

    monkeypatch.setattr(runner.student, "learn", spy)
    rec = runner.run_round(0)
    clients = [runner.stack.member(i) for i in range(5)]  # what each client trained and sent
    fedavg = aggregate(clients, d.counts, "mean")
    assert all(torch.allclose(seen["start"][n], fedavg[n], atol=1e-6) for n in fedavg)
    moved = max(float((runner.student.stack.member(0)[n] - fedavg[n]).abs().max()) for n in fedavg)
    assert moved > 1e-2  # the ensemble distillation changed the average
    # weights both ways, no logits and no proxy images: 5 model downloads + 5 uploads
    size = wmod.nbytes(wmod.encode({"model": fedavg}, "fp32"))
    assert rec["server_bytes_sent"] == 5 * size and rec["peer_bytes_sent"] == [size] * 5


def test_feddf_beats_fedavg_under_label_skew(digits):
    # same split, seed and local training; FedDF adds the server's ensemble distillation (0.77 vs 0.70 here)
    d = fed_data(digits, alpha=0.3)
    feddf = sim.simulate(cfg(feddf=True, student_epochs=20, temperature=1.0), d, 0)
    fedavg = sim.simulate(cfg().model_copy(update={"mode": "fedavg"}), d, 0)
    assert feddf[-1]["accuracy"] > fedavg[-1]["accuracy"] + 0.03


def test_ema_equals_the_hand_formula(digits):
    d = fed_data(digits)
    runner = sim.make_runner(cfg(ema=0.7), d, 0)
    raw = []
    for r in range(3):
        rec = runner.run_round(r)
        raw.append(runner.student.stack.member(0))
    hand = {n: 0.7 * (0.7 * raw[0][n] + 0.3 * raw[1][n]) + 0.3 * raw[2][n] for n in raw[0]}
    assert all(torch.allclose(runner.student.ema[n], hand[n], atol=1e-6) for n in hand)
    assert not torch.allclose(hand["net.1.weight"], raw[2]["net.1.weight"], atol=1e-3)
    # the EMA is what is evaluated and published
    acc = model_accuracy(runner.student.stack, hand, d.x_test, d.y_test)
    assert rec["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert all(torch.allclose(runner.modules()["student"][n], hand[n], atol=1e-6) for n in hand)


def test_ema_survives_resume(digits):
    d = fed_data(digits)
    a = sim.make_runner(cfg(ema=0.5), d, 0)
    full = [a.run_round(r)["accuracy"] for r in range(3)]
    b = sim.make_runner(cfg(ema=0.5), d, 0)
    b.run_round(0), b.run_round(1)
    c = sim.make_runner(cfg(ema=0.5), d, 0)
    c.load_state(b.state())
    assert c.run_round(2)["accuracy"] == pytest.approx(full[2], abs=1e-9)


def test_feddf_needs_the_client_architecture(digits):
    with pytest.raises(ConfigError, match="student_backbone"):
        sim.make_runner(cfg(feddf=True, student_backbone={"type": "mlp", "hidden": [8]}), fed_data(digits), 0)


def test_feddf_with_int8_weights_sends_a_quarter_both_ways_and_keeps_accuracy(digits, monkeypatch):
    # benchmarks/federated.py's feddf_int8 rows: every weight message is int8, the broadcast included, so the
    # clients start from the decoded (quantized) global model while the server keeps its full-precision student
    d = fed_data(digits, alpha=0.3)
    c8 = cfg(feddf=True).model_copy(update={"codec": "int8"})
    runner = sim.make_runner(c8, d, 0)
    runner.run_round(0)
    sent = wmod.decode(wmod.encode({"model": runner.student.stack.member(0)}, "int8"))["model"]
    seen = {}
    train = runner.train_clients

    def spy(stack, r, *a, **kw):
        seen["start"] = [stack.member(i) for i in range(5)]
        return train(stack, r, *a, **kw)

    monkeypatch.setattr(runner, "train_clients", spy)
    rec = runner.run_round(1)
    assert all(torch.equal(s[n], sent[n]) for s in seen["start"] for n in sent)
    assert not torch.equal(sent["net.1.weight"], runner.student.stack.member(0)["net.1.weight"])
    size8 = wmod.nbytes(wmod.encode({"model": sent}, "int8"))
    size32 = wmod.nbytes(wmod.encode({"model": sent}, "fp32"))
    assert size8 < 0.27 * size32  # a quarter plus each tensor's header (2,534 of 9,732 bytes here)
    assert rec["server_bytes_sent"] == 5 * size8 and rec["peer_bytes_sent"] == [size8] * 5
    # quantizing the messages costs little accuracy on this split (0.809 both after 4 rounds; 0.43 after 1)
    c4 = {c: cfg(feddf=True).model_copy(update={"codec": c, "rounds": 4}) for c in ("fp32", "int8")}
    acc = {c: sim.simulate(c4[c], d, 0)[-1]["accuracy"] for c in c4}
    assert acc["int8"] > 0.75 and abs(acc["int8"] - acc["fp32"]) < 0.02
