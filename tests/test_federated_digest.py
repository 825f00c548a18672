"""FedMD's digest (``federation.distill.digest_epochs``): before local training, clients fit last round's global
soft labels on the proxy set. It moves the client models toward the consensus, costs no extra bytes, is seeded,
survives a bad value with one clear line, and runs on the Flower client path too."""

from functools import partial

import pytest
import torch
from pydantic import ValidationError

from helpers import digits_fed_data, digits_tensors, fd_config
from modulemesh.cli import main as cli_main
from modulemesh.federated import sim
from modulemesh.federated.config import DistillConfig
from modulemesh.federated.sim.data import as_float
from modulemesh.federated.sim.weight_runners import ClientTraining
from modulemesh.training.losses import soft_target_loss


@pytest.fixture(scope="module")
def digits():
    return digits_tensors()


fed_data = partial(digits_fed_data, alpha=0.1)


def kd_loss(runner, d) -> torch.Tensor:
    """Each client's KD loss toward the global soft labels on the whole proxy set."""
    st = runner.stack
    return torch.stack(
        [soft_target_loss(st.fwd(st.member(i), as_float(d.x_proxy)), runner.soft, 2.0) for i in range(runner.k)]
    )


def test_digest_fits_every_client_to_the_consensus(digits):
    d = fed_data(digits)
    runner = sim.make_runner(fd_config(digest_epochs=3.0, client_weight=0.0), d, 0)
    runner.run_round(0)
    before = kd_loss(runner, d)
    runner.digest(runner.stack, 1, (d.x_proxy, runner.soft, 0.0, 2.0), runner.k)
    after = kd_loss(runner, d)
    # under alpha 0.1 each client disagrees with the ensemble on the classes it never saw; the digest fixes most
    assert (after < 0.5 * before).all(), (before, after)


def test_digest_changes_the_run_costs_no_bytes_and_is_seeded(digits):
    d = fed_data(digits)

    def run(**distill):
        c = fd_config(client_weight=0.0, student_optimizer="adam", student_lr=0.003, **distill)
        runner = sim.make_runner(c, d, 0)
        return runner, [runner.run_round(r) for r in range(2)]

    (plain, p), (dig, g), (_, again) = run(), run(digest_epochs=2.0), run(digest_epochs=2.0)
    assert [h["bytes_sent"] for h in g] == [h["bytes_sent"] for h in p]  # the soft labels travel anyway
    assert p[0]["accuracy"] == g[0]["accuracy"]  # round 1 has no soft labels yet: nothing to digest
    # from round 2 the clients learned the consensus first: their logits, the ensemble and the student change
    assert not torch.allclose(plain.soft, dig.soft, atol=1e-2)
    assert g[1]["accuracy"] != p[1]["accuracy"]
    assert [h["accuracy"] for h in again] == [h["accuracy"] for h in g]


def test_digest_bad_value_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(ValidationError, match="digest_epochs"):
        DistillConfig(digest_epochs=-1)
    args = ["federate", "--dataset", "digits", "--rounds", "1", "--out", str(tmp_path / "a")]
    assert cli_main([*args, "--set", "federation.distill.digest_epochs=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "digest_epochs" in err and len(err.splitlines()) == 1


def test_flower_client_digests_the_soft_labels_it_receives(digits, monkeypatch):
    """The Flower ClientApp's train handler (called in-process): round 2's soft labels are digested before the
    node's local epochs, with the proxy images it kept from round 1; without the switch nothing is digested."""
    flwr_app = pytest.importorskip("flwr.app")
    from modulemesh.federated import compress
    from modulemesh.federated.flower import client as fl_client
    from modulemesh.federated.flower.records import blob_record, tensor_record

    monkeypatch.setattr(fl_client, "Message", lambda content, reply_to: content)  # no Flower run to reply into
    calls = []
    real = ClientTraining.digest

    def spy(self, stack, r, kd, k):
        calls.append((r, kd[0].shape, kd[1].clone()))
        return real(self, stack, r, kd, k)

    monkeypatch.setattr(ClientTraining, "digest", spy)

    class Msg:
        def __init__(self, r, **arrays):
            self.content = flwr_app.RecordDict({"config": flwr_app.ConfigRecord({"server-round": r}), **arrays})

    for digest in (0.0, 2.0):
        exp = {
            "seed": 0,
            "data": {"name": "digits"},
            "federation": {
                "mode": "distill",
                "clients": 2,
                "alpha": 1.0,
                "min_client_size": 5,
                "backbone": {"type": "mlp", "hidden": [16]},
                "distill": {"proxy_size": 200, "client_weight": 0.0, "digest_epochs": digest},
            },
        }
        data = fl_client.run_data(exp)
        ctx = flwr_app.Context(
            run_id=1, node_id=1, node_config={"partition-id": 0}, state=flwr_app.RecordDict(), run_config={}
        )
        fl_client.client_train(Msg(1, proxy=tensor_record(data.x_proxy)), ctx, exp)
        soft = torch.randn(len(data.x_proxy), data.num_classes)
        fl_client.client_train(Msg(2, soft=blob_record(compress.encode(soft, "fp32"))), ctx, exp)
        if digest == 0:
            assert calls == []
    assert len(calls) == 1 and calls[0][0] == 1 and calls[0][1] == data.x_proxy.shape
    assert torch.equal(calls[0][2], soft)
