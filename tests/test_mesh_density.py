import torch

from modulemesh.mesh import DensityRouter, Expert, ModuleMesh, fit_ppca, ppca_log_density


def test_ppca_log_density_matches_the_full_gaussian_it_defines():
    torch.manual_seed(0)
    d, k = 6, 2
    x = torch.randn(500, d) @ torch.diag(torch.tensor([3.0, 2.0, 0.5, 0.5, 0.5, 0.5])) + 1.0
    p = fit_ppca(x, k)
    # PPCA covariance: W^T diag(lam) W + s2 (I - W^T W) along the residual directions.
    W, lam, s2 = p["components"].double(), p["variances"].double(), p["noise"].double()[0]
    cov = W.t() @ torch.diag(lam) @ W + s2 * (torch.eye(d, dtype=torch.float64) - W.t() @ W)
    ref = torch.distributions.MultivariateNormal(p["mean"].double(), covariance_matrix=cov)
    q = torch.randn(7, d)
    assert torch.allclose(ppca_log_density(q, p).double(), ref.log_prob(q.double()), atol=1e-3)


def test_density_router_routes_each_cluster_to_its_expert_and_trains_the_target_alone():
    torch.manual_seed(0)
    a = torch.randn(300, 1, 4, 4) * 0.1
    b = torch.randn(300, 1, 4, 4) * 0.1 + 1.0
    r = DensityRouter(components=3)
    for _ in range(2):
        r.add_expert()
    w, _ = r(a[:5])
    assert torch.allclose(w, torch.full((5, 2), 0.5))  # nothing fit yet: uniform
    r.fit_expert(0, a, torch.zeros(300, dtype=torch.long))
    r.eval()
    w, _ = r(a[:5])
    assert torch.equal(w, torch.tensor([[1.0, 0.0]] * 5))  # at evaluation an unfit expert gets no weight
    r.train()
    r.train_target = 1
    w, _ = r(a[:5])
    assert torch.equal(w, torch.tensor([[0.0, 1.0]] * 5))  # while expert 1 trains, every input is its own
    r.train_target = None
    r.fit_expert(1, b, torch.ones(300, dtype=torch.long))
    wa, _ = r(a[:50])
    wb, _ = r(b[:50])
    assert (wa[:, 0] > 0.99).all() and (wb[:, 1] > 0.99).all()


def test_density_mesh_saves_and_loads_with_its_densities(tmp_path):
    torch.manual_seed(0)
    shape = (1, 4, 4)
    mesh = ModuleMesh(4, shape, DensityRouter(components=2))
    mesh.add_expert(Expert("a", [0, 1], {"type": "mlp", "hidden": [8]}, shape))
    mesh.add_expert(Expert("b", [2, 3], {"type": "mlp", "hidden": [8]}, shape))
    x = torch.randn(200, *shape)
    mesh.router.fit_expert(0, x[:100], torch.randint(0, 2, (100,)))
    mesh.router.fit_expert(1, x[100:] + 2, torch.randint(2, 4, (100,)))
    mesh.eval()
    mesh.save(tmp_path / "m")
    back = ModuleMesh.load(tmp_path / "m")
    back.eval()
    q = torch.randn(9, *shape) + 1
    assert torch.allclose(back(q).log_probs, mesh(q).log_probs, atol=1e-5)
    assert torch.equal(back.router.counts[1], mesh.router.counts[1]) and float(back.router.counts[1].sum()) == 100


def test_density_router_end_to_end_on_digits_beats_the_learned_gate(tmp_path):
    import json

    from modulemesh.cli import main

    common = [
        "run",
        "--quiet",
        "--set",
        "data.name=digits",
        "--set",
        "train.batch_size=16",
        "--set",
        "train.epochs=5",
        "--set",
        "router.components=5",
    ]
    assert main([*common, "--set", "router.type=density", "--out", str(tmp_path / "d")]) == 0
    assert main([*common, "--set", "router.type=topk", "--out", str(tmp_path / "g")]) == 0
    d = json.loads((tmp_path / "d" / "metrics.json").read_text())
    g = json.loads((tmp_path / "g" / "metrics.json").read_text())
    assert d["average_accuracy"] > 90 and d["forgetting"] < 5
    assert d["average_accuracy"] > g["average_accuracy"] + 2  # 97.5 vs 93.3 when written
