"""Adaptive compute (router.k: auto, router.threshold: p): the threshold rule, the forward pass
that runs only the kept experts, and the per-input FLOPs count."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from modulemesh.cli import main
from modulemesh.config import ExperimentConfig, load_config
from modulemesh.errors import ConfigError, ModuleMeshError
from modulemesh.mesh import DensityRouter, EntropyRouter, Expert, ModuleMesh, TopKRouter, build_router
from modulemesh.mesh.adaptive import experts_needed, flops_per_input, inference_costs, threshold_mask


def test_threshold_rule_counts_on_hand_made_weights():
    w = torch.tensor([[0.6, 0.3, 0.1]])
    assert [int(experts_needed(w, p)) for p in (0.5, 0.6, 0.85, 0.9, 0.95, 1.0)] == [1, 1, 2, 2, 3, 3]
    # The order of the experts does not matter, only the sorted weights.
    assert int(experts_needed(torch.tensor([[0.1, 0.3, 0.6]]), 0.85)) == 2
    # Ties: four equal weights need two to reach 0.5; the lower indices are kept.
    ties = torch.full((1, 4), 0.25)
    assert int(experts_needed(ties, 0.5)) == 2 and int(experts_needed(ties, 0.51)) == 3
    assert threshold_mask(ties, 0.5).tolist() == [[0.5, 0.5, 0.0, 0.0]]
    # p = 1 keeps every expert with a non-zero weight; a zero-weight expert is never run.
    assert int(experts_needed(torch.tensor([[0.5, 0.5, 0.0]]), 1.0)) == 2
    kept = threshold_mask(torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]), 0.85)
    assert torch.allclose(kept, torch.tensor([[2 / 3, 1 / 3, 0.0], [2 / 9, 7 / 9, 0.0]]))
    for bad in (0, -0.1, 1.5, "high", True):
        with pytest.raises(ModuleMeshError, match="0 < p <= 1"):
            experts_needed(w, bad)


def _toy_mesh(threshold=None):
    """Two experts on 4x4 inputs (D = 16): mlp [5] over 3 classes and mlp [7] over 2 classes; a top-k
    gate with 6 hidden units. Forward FLOPs (2 per multiply-add): expert a 2*(16*5 + 5*3) = 190,
    expert b 2*(16*7 + 7*2) = 252, gate 2*(16*6 + 6*2) = 216."""
    torch.manual_seed(0)
    router = build_router("topk", (1, 4, 4), k="auto" if threshold else 1, hidden=6, threshold=threshold)
    mesh = ModuleMesh(5, (1, 4, 4), router)
    mesh.add_expert(Expert("a", [0, 1, 2], {"type": "mlp", "hidden": [5]}, (1, 4, 4)))
    mesh.add_expert(Expert("b", [3, 4], {"type": "mlp", "hidden": [7]}, (1, 4, 4)))
    with torch.no_grad():  # a gate whose confidence depends on the input: some rows need both experts
        router.head.weight.normal_(0, 3.0)
    return mesh.eval()


def test_per_input_flops_equal_the_hand_count_and_what_the_mesh_ran(tmp_path):
    mesh = _toy_mesh(threshold=0.9)
    x = torch.rand(64, 1, 4, 4)
    with torch.no_grad():
        out = mesh(x)
    ran = out.weights > 0
    assert 0 < int((ran.sum(1) == 1).sum()) < 64, "the toy gate should route some inputs to one expert, some to two"
    hand = 216 + 190 * ran[:, 0].double() + 252 * ran[:, 1].double()
    assert torch.equal(flops_per_input(mesh, out.weights), hand)
    # The mesh really skipped the experts the rule dropped: its counted FLOPs are the per-input sum.
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        mesh(x)
    assert fc.get_total_flops() == int(hand.sum())
    costs = inference_costs(mesh, out.weights)
    assert costs["router_flops_per_sample"] == 216 and costs["all_experts_flops_per_sample"] == 442
    assert costs["expert_flops_per_sample"] == pytest.approx(float((hand - 216).mean()))
    assert 1 < costs["experts_run_per_sample"] < 2
    # k: auto and p are saved with the mesh: the loaded mesh skips the same experts.
    mesh.save(tmp_path / "m")
    loaded = ModuleMesh.load(tmp_path / "m").eval()
    assert loaded.router.k == "auto" and loaded.router.threshold == 0.9
    with torch.no_grad():
        again = loaded(x)
    assert torch.equal(again.weights, out.weights) and torch.allclose(again.log_probs, out.log_probs)


def test_adaptive_forward_equals_the_full_forward_at_p_1_and_skips_experts_below():
    full, adaptive = _toy_mesh(), _toy_mesh(threshold=1.0)
    full.router.k = 2  # every expert, full softmax weights
    x = torch.rand(32, 1, 4, 4)
    with torch.no_grad():
        a, b = full(x), adaptive(x)
    assert torch.allclose(a.log_probs, b.log_probs, atol=1e-6) and torch.allclose(a.weights, b.weights)
    adaptive.router.threshold = 0.6
    with torch.no_grad():
        c = adaptive(x)
    n = experts_needed(a.weights, 0.6)
    assert torch.equal((c.weights > 0).sum(1), n) and bool((n == 1).any())
    assert torch.allclose(c.weights.sum(1), torch.ones(32))
    # Training uses the full weights (the gate and every expert keep their gradients).
    adaptive.train()
    assert bool((adaptive(x).weights > 0).all())


def test_every_router_that_produces_weights_gets_the_rule(tmp_path):
    torch.manual_seed(0)
    x, y = torch.rand(80, 1, 4, 4), torch.randint(0, 4, (80,))
    density = ModuleMesh(4, (1, 4, 4), DensityRouter(components=2))
    for i, classes in enumerate(([0, 1], [2, 3])):
        density.add_expert(Expert(f"e{i}", classes, {"type": "mlp", "hidden": [4]}, (1, 4, 4)))
        keep = (y == classes[0]) | (y == classes[1])
        density.router.fit_expert(i, x[keep], y[keep])
    entropy = ModuleMesh(4, (1, 4, 4), EntropyRouter(temperature=0.05))
    for e in density.experts:
        entropy.add_expert(e.clone(e.name))
    for mesh in (density.eval(), entropy.eval()):
        with torch.no_grad():
            full = mesh(x).weights
            mesh.router.threshold = 0.7
            kept = mesh(x).weights
        assert torch.equal((kept > 0).sum(1), experts_needed(full, 0.7))
    # Entropy routing needs every expert's output to compute its weights: it saves no expert FLOPs.
    per = flops_per_input(entropy, kept)
    assert torch.equal(per, torch.full((80,), per[0].item(), dtype=torch.float64))
    # The threshold is saved with the mesh and comes back with it.
    density.save(tmp_path / "mesh")
    assert ModuleMesh.load(tmp_path / "mesh").router.threshold == 0.7


def test_config_validation_of_k_auto_and_threshold():
    ok = load_config(ExperimentConfig, None, ["router.type=density", "router.k=auto", "router.threshold=0.9"])
    assert ok.router.k == "auto" and ok.router.threshold == 0.9
    for overrides, words in (
        (["router.k=auto"], "router.threshold"),
        (["router.threshold=0.9"], "router.k: auto"),
        (["router.k=auto", "router.threshold=0"], "greater than 0"),
        (["router.k=auto", "router.threshold=1.01"], "less than or equal to 1"),
        (["router.k=auto", "router.threshold=0.5", "router.type=random"], "topk, entropy or density"),
    ):
        with pytest.raises(ConfigError, match=words):
            load_config(ExperimentConfig, None, overrides)
    with pytest.raises(ModuleMeshError, match="k must be a positive integer or 'auto'"):
        TopKRouter(16, k=0)


def test_run_with_k_auto_reports_expert_flops_per_sample(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--set", "data.name=digits", "--set", "router.type=density", "--set", "router.k=auto"]
    args += ["--set", "router.threshold=0.9", "--set", "train.batch_size=16", "--quiet", "--out", str(out)]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["experts_run_per_sample"] < 2.0, "a confident density router should run about one expert of five"
    assert m["expert_flops_per_sample"] < 0.4 * m["all_experts_flops_per_sample"]
    assert "expert FLOPs / sample" in capsys.readouterr().out
    assert ModuleMesh.load(out / "mesh").router.threshold == 0.9
