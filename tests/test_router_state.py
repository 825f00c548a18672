"""Per-expert router state: export from one mesh, import into another holding the same experts."""

import pytest
import torch

from modulemesh.errors import ModuleMeshError
from modulemesh.mesh import DensityRouter, EntropyRouter, Expert, ModuleMesh, OracleRouter, TopKRouter

SHAPE = (1, 4, 4)


def _experts():
    torch.manual_seed(0)
    return [Expert(f"e{i}", [2 * i, 2 * i + 1], {"type": "mlp", "hidden": [8]}, SHAPE) for i in range(3)]


def _fitted_density_mesh(experts):
    mesh = ModuleMesh(6, SHAPE, DensityRouter(components=2))
    for i, e in enumerate(experts):
        mesh.add_expert(e)
        x = torch.randn(60, *SHAPE) * (0.5 + i) + 2.0 * i
        mesh.router.fit_expert(i, x, torch.randint(2 * i, 2 * i + 2, (60,)))
    return mesh.eval()


def test_density_state_round_trip_gives_identical_routing_in_another_order():
    experts = _experts()
    a = _fitted_density_mesh(experts)
    # Mesh B gets the same experts in reverse order: each expert's state follows it, not its slot.
    b = ModuleMesh(6, SHAPE, DensityRouter(components=2))
    for e in reversed(experts):
        b.add_expert(e)
        b.router.import_expert_state(b.pool.index(e.name), a.router.export_expert_state(a.pool.index(e.name)))
    b.eval()
    q = torch.randn(40, *SHAPE) * 2 + 2
    wa, wb = a(q).weights, b(q).weights
    assert torch.allclose(wa, wb.flip(1), atol=1e-6)
    assert torch.allclose(a(q).log_probs, b(q).log_probs, atol=1e-5)
    # Not vacuous: the routing differs between experts and the class priors came along.
    assert (wa.argmax(1) != wa.argmax(1)[0]).any()
    assert torch.equal(b.router.counts[2], a.router.counts[0])


def test_density_state_of_an_unfit_expert_is_empty_and_bad_state_is_refused():
    r = DensityRouter(components=2)
    r.add_expert()
    assert r.export_expert_state(0) == {}
    with pytest.raises(ModuleMeshError, match="counts"):
        r.import_expert_state(0, {"class0.mean": torch.zeros(3)})
    with pytest.raises(ModuleMeshError, match="out of range"):
        r.export_expert_state(1)


def test_topk_and_oracle_state_round_trip():
    experts = _experts()
    gate = TopKRouter(16, k=1)
    a = ModuleMesh(6, SHAPE, gate)
    for e in experts:
        a.add_expert(e)
    with torch.no_grad():
        gate.head.weight.normal_()
    b_gate = TopKRouter(16, k=1)
    b_gate.body.load_state_dict(gate.body.state_dict())  # the shared layer travels separately
    b = ModuleMesh(6, SHAPE, b_gate)
    for i, e in enumerate(experts):
        b.add_expert(e)
        b.router.import_expert_state(i, a.router.export_expert_state(i))
    q = torch.randn(20, *SHAPE)
    assert torch.equal(a.eval()(q).weights, b.eval()(q).weights)

    o = OracleRouter()
    for _ in range(2):
        o.add_expert()
    o.assign(0, 1)
    o.assign(3, 1)
    o2 = OracleRouter()
    for _ in range(2):
        o2.add_expert()
    o2.import_expert_state(1, o.export_expert_state(1))
    assert o2.task_to_expert == {0: 1, 3: 1}


def test_stateless_router_exports_nothing():
    r = EntropyRouter()
    r.add_expert()
    assert r.export_expert_state(0) == {}
    with pytest.raises(ModuleMeshError, match="no per-expert state"):
        r.import_expert_state(0, {"x": torch.zeros(1)})


def test_expert_task_evidence_is_stick_breaking_from_the_newest_expert():
    from modulemesh.mesh.density import expert_task_log_prob

    # "mine" logits m = logsumexp(logits): expert1 says yes (m=+inf-ish), expert2 says no.
    big = 30.0
    logits = [torch.zeros(1, 2), torch.full((1, 2), big), torch.full((1, 2), -big)]
    p = expert_task_log_prob(logits).exp()[0]
    assert torch.allclose(p, torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    # A general case against the formula P(j) = s_j prod_{k>j} (1 - s_k), s_0 = 1; the three sum to 1.
    m = torch.tensor([0.3, -0.2, 0.7])
    logits = [torch.stack([v - torch.log(torch.tensor(2.0))] * 2).reshape(1, 2) for v in m]
    s = torch.sigmoid(m)
    want = torch.stack([(1 - s[1]) * (1 - s[2]), s[1] * (1 - s[2]), s[2]])
    got = expert_task_log_prob(logits).exp()[0]
    assert torch.allclose(got, want, atol=1e-6) and abs(float(got.sum()) - 1) < 1e-6
