import math

import pytest
import torch

from modulemesh.errors import ModuleMeshError
from modulemesh.mesh import (
    EntropyRouter,
    Expert,
    ModuleMesh,
    OracleRouter,
    RandomRouter,
    TopKRouter,
    class_given_expert,
    load_balance_loss,
    routing_entropy,
    specialization_scores,
)
from modulemesh.mesh.routers import topk_mask

SHAPE = (1, 4, 4)


def test_entropy_router_matches_hand_computed_weights():
    # Expert A is certain (entropy 0 in the limit), expert B is uniform over 2 classes (entropy ln 2).
    a = torch.tensor([[50.0, 0.0]])
    b = torch.tensor([[0.0, 0.0]])
    w, gate = EntropyRouter(2, temperature=1.0)(torch.zeros(1, 16), [a, b])
    assert gate is None
    expected_b = math.exp(-math.log(2)) / (1 + math.exp(-math.log(2)))
    assert w[0, 1].item() == pytest.approx(expected_b, abs=1e-6)
    assert w[0, 0].item() == pytest.approx(1 - expected_b, abs=1e-6)
    # Lower temperature sharpens towards the confident expert.
    w_cold, _ = EntropyRouter(2, temperature=0.1)(torch.zeros(1, 16), [a, b])
    assert w_cold[0, 0] > w[0, 0]


def test_entropy_router_normalized_compares_experts_of_different_sizes():
    uniform2, uniform4 = torch.zeros(1, 2), torch.zeros(1, 4)
    w, _ = EntropyRouter(2, normalize=True)(torch.zeros(1, 16), [uniform2, uniform4])
    assert torch.allclose(w, torch.tensor([[0.5, 0.5]]))


def test_topk_mask_renormalizes_or_not():
    p = torch.tensor([[0.5, 0.3, 0.2]])
    assert torch.allclose(topk_mask(p, 2, True), torch.tensor([[0.625, 0.375, 0.0]]))
    assert torch.allclose(topk_mask(p, 2, False), torch.tensor([[0.5, 0.3, 0.0]]))


def test_topk_router_dense_in_training_sparse_in_eval_and_grows():
    torch.manual_seed(0)
    r = TopKRouter(16, num_experts=3, k=1, temperature=0.5)
    x = torch.randn(5, 16)
    r.train()
    w, logits = r(x)
    assert (w > 0).all() and torch.allclose(w.sum(1), torch.ones(5))
    assert torch.allclose(w, torch.softmax(logits / 0.5, 1))
    r.eval()
    w, logits = r(x)
    assert ((w > 0).sum(1) == 1).all()
    assert torch.equal(w.argmax(1), logits.argmax(1))
    before = r.gate_logits(x).detach()
    r.add_expert()
    after = r.gate_logits(x).detach()
    assert after.shape == (5, 4)
    assert torch.allclose(after[:, :3], before)  # existing routes are preserved


def test_random_router_picks_k_uniformly_and_is_seeded():
    w1, _ = RandomRouter(4, k=2, seed=3)(torch.zeros(1000, 16))
    w2, _ = RandomRouter(4, k=2, seed=3)(torch.zeros(1000, 16))
    assert torch.equal(w1, w2)
    assert ((w1 > 0).sum(1) == 2).all() and torch.allclose(w1.sum(1), torch.ones(1000))
    share = (w1 > 0).float().mean(0)
    assert torch.allclose(share, torch.full((4,), 0.5), atol=0.06)


def test_oracle_router_routes_by_task_and_explains_missing_ids():
    r = OracleRouter(3)
    for t in range(3):
        r.assign(t, 2 - t)
    w, _ = r(torch.zeros(3, 16), task_ids=torch.tensor([0, 1, 2]))
    assert torch.equal(w.argmax(1), torch.tensor([2, 1, 0]))
    with pytest.raises(ModuleMeshError, match="task ids"):
        r(torch.zeros(3, 16))


def test_regularizers_hand_computed():
    w = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    y = torch.tensor([0, 1, 2, 2])
    p = class_given_expert(w, y, 3)
    assert torch.allclose(p, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))
    s = specialization_scores(w, y, 3)
    assert s[0].item() == pytest.approx(math.log(2), abs=1e-6) and s[1].item() == pytest.approx(0.0, abs=1e-6)
    assert load_balance_loss(w).item() == pytest.approx(1.0)  # perfectly balanced
    assert load_balance_loss(torch.tensor([[1.0, 0.0]] * 4)).item() == pytest.approx(2.0)
    assert routing_entropy(w).item() == pytest.approx(0.0, abs=1e-6)
    assert routing_entropy(torch.full((2, 2), 0.5)).item() == pytest.approx(math.log(2))


def test_routing_entropy_acts_where_l1_of_softmax_cannot():
    logits = torch.randn(8, 4, requires_grad=True)
    w = torch.softmax(logits, 1)
    (l1_grad,) = torch.autograd.grad(w.abs().sum(), logits, retain_graph=True)
    (ent_grad,) = torch.autograd.grad(routing_entropy(w), logits)
    assert torch.allclose(l1_grad, torch.zeros_like(l1_grad), atol=1e-6)  # the seed's L1 does nothing
    assert ent_grad.abs().sum() > 1e-3


def _two_expert_mesh(router):
    torch.manual_seed(0)
    mesh = ModuleMesh(6, SHAPE, router)
    mesh.add_expert(Expert("low", [0, 1, 2], {"type": "mlp", "hidden": [8]}, SHAPE))
    mesh.add_expert(Expert("high", [5, 3], {"type": "mlp", "hidden": [8]}, SHAPE))
    return mesh


def test_mesh_mixture_combines_experts_over_disjoint_class_subsets():
    mesh = _two_expert_mesh(EntropyRouter())
    x = torch.rand(4, *SHAPE)
    out = mesh(x)
    p = out.log_probs.exp()
    assert torch.allclose(p.sum(1), torch.ones(4), atol=1e-5)
    assert (p[:, 4] < 1e-6).all()  # class 4 is covered by nobody
    low = torch.softmax(mesh.pool["low"](x), 1)
    high = torch.softmax(mesh.pool["high"](x), 1)
    w = out.weights
    assert torch.allclose(p[:, [0, 1, 2]], w[:, :1] * low, atol=1e-6)
    assert torch.allclose(p[:, 5], w[:, 1] * high[:, 0], atol=1e-6)  # expert order of classes is respected
    assert torch.allclose(p[:, 3], w[:, 1] * high[:, 1], atol=1e-6)
    assert out.entropies.shape == (4, 2)


def test_sparse_top1_runs_only_selected_expert_and_matches_that_expert():
    mesh = _two_expert_mesh(TopKRouter(16, k=1))
    mesh.eval()
    x = torch.rand(10, *SHAPE)
    calls = {"low": 0, "high": 0}
    for e in mesh.experts:
        e.register_forward_hook(lambda m, i, o, name=e.name: calls.__setitem__(name, calls[name] + i[0].shape[0]))
    out = mesh(x)
    chosen = out.weights.argmax(1)
    assert calls["low"] + calls["high"] == 10  # each input ran through exactly one expert
    low_rows = chosen == 0
    if low_rows.any():
        ref = torch.log_softmax(mesh.pool["low"](x[low_rows]), 1)
        assert torch.allclose(out.log_probs[low_rows][:, [0, 1, 2]], ref, atol=1e-5)


def test_mesh_rejects_bad_inputs_with_clear_errors():
    mesh = ModuleMesh(6, SHAPE, EntropyRouter())
    with pytest.raises(ModuleMeshError, match="no experts"):
        mesh(torch.rand(2, *SHAPE))
    with pytest.raises(ModuleMeshError, match="outside"):
        mesh.add_expert(Expert("e", [0, 9], {"type": "mlp", "hidden": [4]}, SHAPE))
    mesh.add_expert(Expert("e", [0, 1], {"type": "mlp", "hidden": [4]}, SHAPE))
    with pytest.raises(ModuleMeshError, match="expects"):
        mesh(torch.rand(2, 3, 5, 5))
