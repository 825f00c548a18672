"""The modules mode on the library's mesh: peers run ``ModuleMesh``es of ``Expert``s under the
``EntropyRouter``; ``federate --mode modules`` writes a mesh that ``ModuleMesh.load`` reads; bytes
are counted once per transfer, the proxy set and joining downloads included."""

import json
from pathlib import Path

import pytest
import torch
from sklearn.datasets import load_digits

from modulemesh.cli import main as cli_main
from modulemesh.federated import mesh_modules as mm
from modulemesh.federated import sim
from modulemesh.federated.config import FederationConfig
from modulemesh.mesh import EntropyRouter, Expert, ModuleMesh

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def cfg(**kw):
    base = dict(
        clients=4,
        rounds=2,
        lr=0.2,
        local_epochs=3,
        backbone={"type": "mlp", "hidden": [32]},
        distill={"proxy_size": 300, "student_epochs": 4, "student_lr": 0.2},
        modules={"expert": {"type": "mlp", "hidden": [16]}},
    )
    base.update(kw)
    return FederationConfig(**base)


def data(digits, k=4, device="cpu"):
    x, y = digits
    return sim.make_fed_data(
        x[:1400], y[:1400], x[1400:], y[1400:], k, "dirichlet", 1.0, 300, seed=0, min_size=10, device=device
    )


def test_peer_models_are_the_librarys_mesh(digits):
    """The vmapped peers compute exactly what ModuleMesh + EntropyRouter compute on the same experts."""
    c, d = cfg(mode="modules"), data(digits)
    runner = sim.make_runner(c, d, 0)
    sim.simulate(c, d, 0, runner=runner)
    assert isinstance(runner.template.router, EntropyRouter)
    vmapped = runner.peer_log_probs(d.x_test)
    for p in range(4):
        mesh = mm.mesh_of(c, runner.peer_modules(p), d.input_shape, d.num_classes)
        assert all(isinstance(e, Expert) for e in mesh.experts) and len(mesh.experts) == 2
        with torch.no_grad():
            torch.testing.assert_close(mesh(d.x_test).log_probs, vmapped[p], rtol=1e-5, atol=1e-5)
    # the experts differ after training, so the router's weights are not all equal
    with torch.no_grad():
        w = mm.mesh_of(c, runner.peer_modules(0), d.input_shape, d.num_classes)(d.x_test).weights
    assert (w.max(1).values - w.min(1).values).mean() > 0.01


def test_federate_modules_writes_a_mesh_that_loads_and_scores(tmp_path):
    out = tmp_path / "mods"
    args = [
        "federate",
        "--mode",
        "modules",
        "--dataset",
        "digits",
        "--clients",
        "4",
        "--rounds",
        "3",
        "--seed",
        "0",
        "--out",
        str(out),
        "--quiet",
        "--set",
        "federation.min_client_size=5",
        "--set",
        "federation.lr=0.2",
        "--set",
        "federation.local_epochs=3",
        "--set",
        "federation.modules.expert.hidden=[16]",
        "--set",
        "federation.distill.proxy_size=200",
    ]
    assert cli_main(args) == 0
    res = json.loads((out / "results.json").read_text())
    mesh = ModuleMesh.load(out / "mesh")
    assert mesh.pool.names == ["m0", "m1", "m2", "m3"] and isinstance(mesh.router, EntropyRouter)
    meta = mesh.pool["m1"].metadata
    assert meta["engine"] == "sim" and meta["holders"] == [0, 1] and meta["rounds"] == 3
    from modulemesh.data.datasets import load_dataset

    ds = load_dataset("digits")
    with torch.no_grad():
        x = torch.as_tensor(ds.x_test).float() / 255  # uint8 images, scaled as every command scales them
        acc = (mesh.predict(x) == torch.as_tensor(ds.y_test)).float().mean().item()
    assert acc == pytest.approx(res["summary"]["mesh_accuracy"], abs=1e-6)
    assert acc > 0.8  # chance is 0.1; 4 experts averaged over 2 holders each
    # a rerun of the finished run keeps the summary fields it computed
    assert cli_main(args) == 0
    assert json.loads((out / "results.json").read_text())["summary"]["mesh_accuracy"] == res["summary"]["mesh_accuracy"]


def test_federate_fedavg_writes_a_one_expert_mesh(tmp_path):
    out = tmp_path / "fa"
    assert (
        cli_main(
            [
                "federate",
                "--mode",
                "fedavg",
                "--dataset",
                "digits",
                "--clients",
                "3",
                "--rounds",
                "2",
                "--quiet",
                "--out",
                str(out),
                "--set",
                "federation.min_client_size=5",
                "--set",
                "federation.lr=0.2",
                "--set",
                "federation.distill.proxy_size=200",
                "--set",
                "federation.backbone.hidden=[32]",
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    mesh = ModuleMesh.load(out / "mesh")
    assert mesh.pool.names == ["model"]
    assert res["summary"]["mesh_accuracy"] == pytest.approx(res["summary"]["final_accuracy"], abs=1e-6)


def test_distillation_counts_the_proxy_set_and_each_transfer_once(digits):
    d = data(digits)
    hist = sim.simulate(cfg(mode="distill", rounds=2), d, 0)
    proxy = 300 * 64 * 4  # 300 float32 digits shipped to each client when it joins
    assert hist[0]["server_bytes_sent"] == 4 * proxy and hist[0]["peer_bytes_received"] == [proxy] * 4
    assert 0 < hist[1]["server_bytes_sent"] < proxy  # then only soft labels go down
    for h in hist:
        assert h["bytes_sent"] == sum(h["peer_bytes_sent"]) + h["server_bytes_sent"] == h["bytes_received"]
    assert hist[-1]["bytes_cumulative"] == sum(h["bytes_sent"] for h in hist)


def _run_all_modes(digits, device):
    d = data(digits, device=device)
    out = {}
    for mode in ("fedavg", "distill", "modules", "local", "central"):
        c = cfg(mode=mode, rounds=1, aggregator="fisher" if mode == "fedavg" else "mean", momentum=0.5)
        runner = sim.make_runner(c, d, 0)
        hist = sim.simulate(c, d, 0, runner=runner)
        out[mode] = hist[-1]["accuracy"]
        if hasattr(runner, "predict"):
            from modulemesh.federated.privacy import loss_threshold_auc

            members = torch.cat(d.parts)
            loss_threshold_auc(runner.predict, (d.x[members], d.y[members]), (d.x_test, d.y_test), max_examples=200)
        if mode == "modules":
            out["mesh"] = runner.mesh_accuracy()
    return out


def test_every_mode_runs_on_the_data_device_cpu(digits):
    accs = _run_all_modes(digits, "cpu")
    assert min(accs.values()) > 0.15 and min(accs["fedavg"], accs["central"]) > 0.7  # one round each; chance is 0.1


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA-specific: needs a GPU (the CPU twin above runs the same path)"
)
def test_every_mode_runs_on_the_data_device_cuda(digits):
    """Issue 17: '--device cuda --mode distill' crashed (student on CPU); every tensor follows the data."""
    cuda = _run_all_modes(digits, "cuda")
    cpu = _run_all_modes(digits, "cpu")
    for mode in cuda:
        assert abs(cuda[mode] - cpu[mode]) < 0.05, (mode, cuda[mode], cpu[mode])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-specific: needs a GPU")
@pytest.mark.parametrize("mode", ["distill", "modules"])
def test_federate_command_on_cuda(tmp_path, mode):
    """The exact command of issue 17 ('mat2 is on cpu'), and the modules mode writing its mesh from the GPU."""
    out = tmp_path / mode
    assert (
        cli_main(
            [
                "federate",
                str(CONFIGS / "federate_digits.yaml"),
                "--device",
                "cuda",
                "--mode",
                mode,
                "--rounds",
                "2",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert res["summary"]["final_accuracy"] > 0.3
    assert ModuleMesh.load(out / "mesh").pool.names
