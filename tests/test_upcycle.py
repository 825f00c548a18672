"""Sparse upcycling: a dense model copied into a mesh computes the dense function at step 0, its copies
need the symmetry-breaking noise to diverge, and ``modulemesh upcycle`` writes a mesh the other
commands read."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from modulemesh.cli import main
from modulemesh.data.datasets import load_dataset
from modulemesh.errors import ModuleMeshError
from modulemesh.mesh import EntropyRouter, Expert, ModuleMesh
from modulemesh.preserve.train import save_model
from modulemesh.sharing.upcycle import (
    UpcycleConfig,
    break_symmetry,
    continue_training,
    load_dense,
    mesh_loss,
    training_log_probs,
    upcycle,
)
from modulemesh.training.fit import fit
from modulemesh.training.optim import OptimizerSpec


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits")
    return torch.as_tensor(ds.x_train), torch.as_tensor(ds.y_train).long()


def trained_dense(x, y, classes=tuple(range(10)), steps=60, seed=0):
    torch.manual_seed(seed)
    keep = torch.isin(y, torch.tensor(classes))
    e = Expert("dense", list(classes), {"type": "mlp", "hidden": [16]}, (1, 8, 8))
    target = {c: i for i, c in enumerate(classes)}
    yy = torch.tensor([target[int(c)] for c in y[keep]])
    opt = OptimizerSpec("sgd", 0.1, 0.9)
    fit(e, lambda xb, yb, idx: F.cross_entropy(e(xb), yb), (x[keep], yy), steps=steps, optimizer=opt, modules=[e])
    return e.eval()


@pytest.mark.parametrize("classes", [tuple(range(10)), (2, 5, 7)])
def test_upcycled_mesh_is_the_dense_function_at_step_0(digits, classes):
    x, y = digits
    dense = trained_dense(x, y, classes)
    mesh = upcycle(dense, UpcycleConfig(experts=3))
    xb = x[:200].float() / 255
    want = F.log_softmax(dense(xb), 1)
    for k in (1, 3):  # the gate's top-1 expert, or all of them: both are the dense model
        mesh.router.k = k
        for mode in ("train", "eval"):
            getattr(mesh, mode)()
            with torch.no_grad():
                out = mesh(xb)
            assert torch.allclose(out.log_probs[:, list(classes)], want, atol=1e-5)
    assert torch.allclose(mesh.train()(xb).weights, torch.full((200, 3), 1 / 3))  # neutral gate
    for train_k in (1, 2):  # sparse training's forward (one or two experts per input) is the dense model too
        with torch.no_grad():
            log_probs, probs = training_log_probs(mesh, xb, train_k)
        assert torch.allclose(log_probs[:, list(classes)], want, atol=1e-5), train_k
    assert mesh.num_classes == max(classes) + 1 and all(e.classes == list(classes) for e in mesh.experts)


def test_copies_stay_identical_without_noise_and_diverge_with_it(digits):
    x, y = digits
    dense = trained_dense(x, y)
    # Without the load-balance term (whose argmax breaks ties towards expert 0) nothing tells the copies apart.
    cfg = UpcycleConfig(experts=2, train={"steps": 40, "lr": 0.1}, router={"load_balance_weight": 0})
    same = upcycle(dense, cfg)
    continue_training(same, x, y, cfg, seed=0)
    a, b = (torch.cat([p.flatten() for p in e.parameters()]) for e in same.experts)
    assert torch.equal(a, b), "identical copies get identical gradients"
    assert torch.count_nonzero(same.router.head.weight) == 0, "and the gate gets none"
    noisy = upcycle(dense, cfg)
    break_symmetry(noisy, cfg.noise, seed=0)
    continue_training(noisy, x, y, cfg, seed=0)
    a, b = (torch.cat([p.flatten() for p in e.parameters()]) for e in noisy.experts)
    assert (a - b).abs().max() > 1e-3 and torch.count_nonzero(noisy.router.head.weight) > 0


def test_top1_training_costs_one_expert_and_teaches_the_gate(digits):
    x, y = digits
    dense = trained_dense(x, y)
    xb, yb = x[:128].float() / 255, y[:128]
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(dense(xb), yb).backward()
    dense_step = fc.get_total_flops()
    per_step = {}
    for train_k, hidden in ((None, 16), (1, 0), (1, 16)):
        cfg = UpcycleConfig(experts=4, router={"train_k": train_k, "hidden": hidden}, train={"steps": 1})
        per_step[train_k, hidden] = continue_training(upcycle(dense, cfg), x, y, cfg).flops_per_step / dense_step
    # Every expert + gate costs over 4 dense steps; one expert + a linear gate about 1.2 (the gate: 64 x 4).
    assert per_step[None, 16] > 4 and 1 < per_step[1, 0] < 1.3 < per_step[1, 16] < 2, per_step
    # The gate gets gradient from the NLL alone (no load-balance term) though top-1's weight is 1 ...
    cfg = UpcycleConfig(experts=2, router={"train_k": 1, "load_balance_weight": 0})
    mesh = upcycle(dense, cfg)
    break_symmetry(mesh, 0.05, seed=0)
    mesh_loss(mesh, 0, 1)(xb, yb, None).backward()
    assert mesh.router.head.weight.grad.abs().sum() > 1e-3
    # ... and it is the right gradient: with expert 0 good on digits 0-4 and expert 1 on 5-9 (frozen), training
    # the gate alone routes each half to its expert.
    low = y < 5
    for expert, rows in zip(mesh.experts, (low, ~low)):
        fit(
            expert,
            lambda a, b, i, e=expert: F.cross_entropy(e(a), b),
            (x[rows], y[rows]),
            steps=100,
            optimizer=OptimizerSpec("sgd", 0.1, 0.9),
        )
        expert.freeze()
    fit(
        mesh.router, mesh_loss(mesh, 0, 1), (x, y), steps=200, optimizer=OptimizerSpec("sgd", 0.05, 0.9), modules=[mesh]
    )
    with torch.no_grad():
        routed = mesh.eval()(x.float() / 255).weights.argmax(1)
    assert (routed == (~low).long()).float().mean() > 0.85


def test_train_k_is_validated():
    with pytest.raises(ValueError, match="train_k=5 exceeds the 4 experts"):
        UpcycleConfig(experts=4, router={"train_k": 5})
    with pytest.raises(ValueError, match="train_k"):
        UpcycleConfig(router={"train_k": 0})
    assert UpcycleConfig(experts=4).train_k == 4 and UpcycleConfig(experts=4, router={"train_k": 1}).train_k == 1
    assert UpcycleConfig(experts=4, router={"k": 2, "dense_training": False}).train_k == 2


def test_dense_model_sources(digits, tmp_path):
    x, y = digits
    dense = trained_dense(x, y)
    xb = x[:50].float() / 255
    dense.save(tmp_path / "rec")
    save_model(tmp_path / "model", dense.net, dense.backbone_spec, dense.input_shape, dense.classes)
    mesh = ModuleMesh(10, (1, 8, 8), EntropyRouter())
    mesh.add_expert(dense.clone("solo"))
    mesh.save(tmp_path / "one")
    mesh.add_expert(dense.clone("other"))
    mesh.save(tmp_path / "two")
    for src in ("rec", "rec.json", "model", "one", "two:other"):
        got = load_dense(tmp_path / src)
        assert torch.allclose(got(xb), dense(xb), atol=1e-6), src
    with pytest.raises(ModuleMeshError, match="holds 2 experts; name the one"):
        load_dense(tmp_path / "two")
    with pytest.raises(ModuleMeshError, match="unknown expert 'nope'"):
        load_dense(f"{tmp_path / 'two'}:nope")
    with pytest.raises(ModuleMeshError, match="no dense model at"):
        load_dense(tmp_path / "missing")


def one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_upcycle_end_to_end_and_bad_inputs(digits, tmp_path, capsys):
    x, y = digits
    trained_dense(x, y, classes=(0, 1), steps=40).save(tmp_path / "dense01")
    out = tmp_path / "up"
    config = str(Path(__file__).resolve().parents[1] / "configs" / "upcycle.yaml")
    argv = [
        "upcycle",
        str(tmp_path / "dense01"),
        "--experts",
        "3",
        "--data",
        "digits",
        "--steps",
        "30",
        "--config",
        config,
    ]
    assert main([*argv, "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "upcycle.json").read_text())
    assert report["step0_accuracy"] == report["dense_accuracy"] > 90
    assert report["train"]["steps"] == 30 and report["train"]["flops_per_step"] > 0
    mesh = ModuleMesh.load(out)
    assert len(mesh.experts) == 3 and mesh.covered_classes() == {0, 1}
    # Sparse upcycling: each input trains one expert behind a linear gate, a third of the dense-routing step.
    sparse = tmp_path / "sparse"
    assert main([*argv, "--set", "router.train_k=1", "--set", "router.hidden=0", "--quiet", "--out", str(sparse)]) == 0
    got = json.loads((sparse / "upcycle.json").read_text())
    assert got["step0_accuracy"] == got["dense_accuracy"] and got["config"]["router"]["train_k"] == 1
    assert got["train"]["flops_per_step"] < report["train"]["flops_per_step"] / 2
    assert ModuleMesh.load(sparse).router.hidden == 0
    prov = mesh.experts[0].metadata["provenance"]
    assert prov["parent"]["name"] == "dense" and prov["tasks"][0]["name"] == "upcycle"
    # Other commands read it: hub publish / pull / verify, and run --from grows it with the other tasks.
    hub = tmp_path / "hub"
    assert main(["hub", "publish", str(out), str(hub), "--name", "up"]) == 0
    assert main(["hub", "pull", "up", str(hub), "--out", str(tmp_path / "pulled")]) == 0
    assert main(["hub", "verify", str(tmp_path / "pulled")]) == 0
    run = ["run", "--set", "data.name=digits", "--set", "router.type=topk", "--set", "train.batch_size=16"]
    assert main([*run, "--from", str(out), "--quiet", "--out", str(tmp_path / "grown")]) == 0
    grown = ModuleMesh.load(tmp_path / "grown" / "mesh")
    assert len(grown.experts) == 3 + 4 and grown.covered_classes() == set(range(10))
    # Its experts are copies of one module: merge takes them back into one expert.
    copies = [str(out / "experts" / f"{e.name}.json") for e in mesh.experts]
    assert main(["merge", *copies, "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    # Bad inputs: one line, exit 2, nothing written.
    bad = tmp_path / "bad"
    cases = [
        (["upcycle", str(tmp_path / "nothing"), "--data", "digits"], "no dense model at"),
        ([*argv[:2], "--experts", "1", "--data", "digits"], "experts"),
        ([*argv[:2], "--data", "mnist"], "inputs (1, 28, 28), the dense model takes (1, 8, 8)"),
        ([*argv[:2], "--data", "digits", "--set", "router.k=auto"], "router.threshold"),
        ([*argv[:2], "--data", "digits", "--steps", "-1"], "train.steps"),
        ([*argv[:4], "--data", "digits", "--set", "router.train_k=4"], "train_k=4 exceeds the 3 experts"),
        ([*argv, "--out", str(out)], "already exists and is not empty"),
    ]
    for args, words in cases:
        line = one_line_error(capsys, [*args, "--out", str(bad)] if "--out" not in args else args)
        assert words in line, line
    assert not bad.exists()
