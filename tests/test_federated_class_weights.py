"""Class-count weighted ensembles (``federation.distill.class_weights="counts"``, FedGen / FedFTG's
class-level weights): a client has no say on a class it never saw, the soft labels change, the
counts are sent once and counted in bytes, on the FD and FedDF paths and across a resume."""

from functools import partial

import pytest
import torch
from pydantic import ValidationError

from helpers import digits_fed_data, digits_tensors, fd_config
from modulemesh.errors import ConfigError
from modulemesh.federated import sim
from modulemesh.federated.config import DistillConfig
from modulemesh.federated.logit_distill import aggregate_logits, per_class_weights


@pytest.fixture(scope="module")
def digits():
    return digits_tensors()


fed_data = partial(digits_fed_data, alpha=0.1)


cfg = fd_config


def skewed_votes():
    """Client 0 holds classes 0 and 1; clients 1 and 2 hold only 1 and 2 and call every image a 1."""
    counts = torch.tensor([[50.0, 50, 0], [0, 40, 60], [0, 30, 70]])
    logits = torch.tensor([[[4.0, 0, -4]], [[-4, 3, 0]], [[-4, 3, 0]]])  # one proxy image, a 0
    return logits, counts


def test_a_client_has_no_say_on_a_class_it_never_saw():
    logits, counts = skewed_votes()
    alpha = torch.full((3, 1, 1), 1 / 3)
    w = per_class_weights(alpha, counts)
    assert torch.equal(w[1:, 0, 0], torch.zeros(2))  # clients 1, 2 never saw class 0
    assert torch.allclose(w[:, 0, 1], torch.tensor([50.0, 40, 30]) / 120)  # share of class 1's examples
    assert torch.allclose(w.sum(0), torch.ones(1, 3))
    # plain averaging: two confidently wrong clients outvote the one that holds class 0
    plain = aggregate_logits(logits, "uniform", 1.0)
    assert int(plain.argmax(-1)) == 1
    for space in ("logits", "probs"):
        soft = aggregate_logits(logits, "uniform", 1.0, space=space, class_counts=counts)
        assert int(soft.argmax(-1)) == 0
        # class 0's log-probability is client 0's alone
        assert float(soft[0, 0]) == pytest.approx(float(torch.log_softmax(logits[0, 0], -1)[0]), abs=1e-5)


def test_confidence_weights_still_apply_within_a_class_and_absent_clients_drop_out():
    logits, counts = skewed_votes()
    conf = aggregate_logits(logits, "neg_entropy", 0.5, class_counts=counts)
    flat = aggregate_logits(logits, "uniform", 1.0, class_counts=counts)
    assert not torch.allclose(conf, flat)
    # client 0 absent: nobody answering holds class 0, which falls back to the confidence weights
    mask = torch.tensor([False, True, True])
    soft = aggregate_logits(logits, "uniform", 1.0, mask, class_counts=counts)
    assert torch.isfinite(soft).all() and int(soft.argmax(-1)) == 1
    with pytest.raises(ConfigError, match="shape"):
        aggregate_logits(logits, class_counts=counts[:2])
    with pytest.raises(ConfigError, match="robust"):
        aggregate_logits(logits, robust="median", class_counts=counts)


def test_config_rejects_counts_with_a_robust_rule():
    with pytest.raises(ValidationError, match="class_weights"):
        DistillConfig(class_weights="counts", robust="median")
    assert DistillConfig(class_weights="counts").class_weights == "counts"


def test_fd_switch_changes_the_ensemble_and_counts_the_bytes_once(digits):
    d = fed_data(digits)
    off, on = (
        sim.make_runner(cfg(score="uniform"), d, 0),
        sim.make_runner(cfg(score="uniform", class_weights="counts"), d, 0),
    )
    a0, b0 = off.run_round(0), on.run_round(0)
    # every client sends its 10 class counts (int32) once, beside its round-1 logits
    assert [b - a for a, b in zip(a0["peer_bytes_sent"], b0["peer_bytes_sent"])] == [40] * 5
    counts = torch.stack([torch.bincount(d.y[p], minlength=10) for p in d.parts]).float()
    assert torch.equal(on.counts_rx.table, counts)
    a1, b1 = off.run_round(1), on.run_round(1)
    assert b1["peer_bytes_sent"] == a1["peer_bytes_sent"]
    # the ensemble differs, and under this skew (alpha 0.1) the class-weighted one is the better teacher
    assert not torch.allclose(off.soft, on.soft, atol=1e-3)
    assert b1["teacher_proxy_accuracy"] > a1["teacher_proxy_accuracy"] + 0.03


def test_feddf_sends_counts_with_a_clients_first_upload_and_resume_keeps_them(digits):
    d = fed_data(digits)
    c = cfg(feddf=True, score="uniform", class_weights="counts").model_copy(update={"failure_rate": 0.4})
    plain = sim.make_runner(
        c.model_copy(update={"distill": c.distill.model_copy(update={"class_weights": "none"})}), d, 0
    )
    full = sim.make_runner(c, d, 0)
    sent_before, extra = set(), []
    for r in range(3):
        a, b = plain.run_round(r), full.run_round(r)
        assert a["failed"] == b["failed"]
        first = [i for i in range(5) if i not in b["failed"] and i not in sent_before]
        sent_before |= set(first)
        extra.append([y - x for x, y in zip(a["peer_bytes_sent"], b["peer_bytes_sent"])])
        assert extra[-1] == [40 if i in first else 0 for i in range(5)]
        assert b["accuracy"] != a["accuracy"]  # the per-class weights changed the distillation
    assert sum(map(sum, extra)) == 40 * len(sent_before)
    assert torch.equal(full.counts_rx.known, torch.tensor([i in sent_before for i in range(5)]))
    # a resumed run neither re-sends the counts nor changes the numbers
    first_two = sim.make_runner(c, d, 0)
    first_two.run_round(0), first_two.run_round(1)
    resumed = sim.make_runner(c, d, 0)
    resumed.load_state(first_two.state())
    again = resumed.run_round(2)
    assert again["accuracy"] == pytest.approx(b["accuracy"], abs=1e-9)
    assert again["peer_bytes_sent"] == b["peer_bytes_sent"]


def test_adam_student_fits_the_soft_labels_and_is_deterministic(digits):
    from modulemesh.federated.sim.data import as_float
    from modulemesh.training.losses import soft_target_loss

    d = fed_data(digits, alpha=1.0)
    c = cfg(feddf=True, student_optimizer="adam", student_lr=0.003)
    runner = sim.make_runner(c, d, 0)
    learn, seen = runner.student.learn, {}

    def kd_loss():
        st = runner.student
        return float(soft_target_loss(st.stack.fwd(st.stack.member(0), as_float(d.x_proxy)), st.soft, 2.0))

    def spy(r):
        seen["before"] = kd_loss()
        learn(r)
        seen["after"] = kd_loss()

    runner.student.learn = spy
    rec = runner.run_round(0)
    assert seen["after"] < 0.5 * seen["before"]  # the Adam steps fit the ensemble's soft labels
    again = sim.make_runner(c, d, 0).run_round(0)
    assert again["accuracy"] == rec["accuracy"]
    sgd = sim.make_runner(cfg(feddf=True), d, 0).run_round(0)
    assert sgd["accuracy"] != rec["accuracy"]
    with pytest.raises(ValidationError, match="student_optimizer"):
        DistillConfig(student_optimizer="lbfgs")
