"""Task prediction with the experts: each new expert learns to reject earlier tasks' inputs (replay buffer,
optionally draws from the fitted densities), and that evidence reaches every prediction path."""

import torch
import torch.nn.functional as F

from modulemesh import runner
from modulemesh.config import ExperimentConfig, load_config
from modulemesh.data.scenarios import as_float
from modulemesh.mesh import DensityRouter
from modulemesh.mesh.density import fit_ppca, ppca_log_density

CLASS_IL = [
    "data.name=digits",
    "scenario.kind=class_incremental",
    "scenario.n_tasks=2",
    "strategy.name=modulemesh",
    "router.type=density",
    "router.components=4",
    "train.batch_size=16",
    "train.epochs=10",
    "expert.backbone={type: mlp, hidden: [32]}",
    "strategy.buffer_size=100",
]


def _mine(expert, x):
    """sigma(logsumexp of the expert's logits): its own P(x is my task | x is one of the tasks I saw)."""
    with torch.no_grad():
        return torch.sigmoid(torch.logsumexp(expert(x), 1))


def _second_expert_scores(tmp_path, name, *extra):
    cfg = load_config(ExperimentConfig, None, [*CLASS_IL, *extra])
    runner.run_experiment(cfg, tmp_path / name)
    scenario, _, _ = runner.build_experiment(cfg)
    from modulemesh.mesh import ModuleMesh

    mesh = ModuleMesh.load(tmp_path / name / "mesh").eval()
    own, other = as_float(scenario.tasks[1].x_val), as_float(scenario.tasks[0].x_val)
    return float(_mine(mesh.experts[1], own).mean()), float(_mine(mesh.experts[1], other).mean())


def test_rejection_training_lowers_the_new_experts_score_on_earlier_tasks(tmp_path):
    plain_own, plain_other = _second_expert_scores(tmp_path, "plain", "strategy.reject_weight=0")
    own, other = _second_expert_scores(tmp_path, "reject", "strategy.reject_weight=1")
    # Without rejection training the expert claims task 0's digits about as much as its own.
    assert plain_other > 0.8
    # Trained on 100 replayed examples, it tells them apart on held-out data by a wide margin.
    assert own > 0.7 and other < 0.35 and plain_other - other > 0.5
    # Draws from the earlier task's density (no stored example needed) also teach it to reject.
    drawn_own, drawn_other = _second_expert_scores(
        tmp_path, "drawn", "strategy.reject_weight=1", "strategy.buffer_size=1", "strategy.reject_samples=16"
    )
    assert drawn_own > 0.7 and drawn_other < 0.35 and plain_other - drawn_other > 0.5


def test_density_draws_follow_the_fitted_component():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g) * torch.tensor([3.0, 1.0, 0.3, 0.3, 0.3, 0.3]) + 5
    b = torch.randn(400, 6, generator=g) * 0.5 - 5
    router = DensityRouter(2, components=2)
    router.fit_expert(0, a, torch.zeros(400, dtype=torch.long))
    router.fit_expert(1, b, torch.ones(400, dtype=torch.long))
    draws = router.sample([0], 2000, torch.Generator().manual_seed(1))
    assert torch.allclose(draws.mean(0), a.mean(0), atol=0.25)
    assert torch.allclose(draws.std(0), a.std(0), rtol=0.15)
    # Every draw is far more likely under expert 0's density than under expert 1's.
    assert bool((router.expert_log_density(draws).argmax(1) == 0).all())
    # noise=0 keeps the draws in the principal subspace: no residual off it.
    flat = router.sample([0], 200, torch.Generator().manual_seed(2), noise=0.0)
    p = fit_ppca(a, 2)
    centred = flat - p["mean"]
    resid = centred - (centred @ router.densities[0][0]["components"].t()) @ router.densities[0][0]["components"]
    assert float(resid.abs().max()) < 1e-4 and float(ppca_log_density(flat, p).mean()) > -20


def test_expert_evidence_reaches_predictions_combined_with_the_router_posterior(tmp_path):
    cfg = load_config(ExperimentConfig, None, [*CLASS_IL, "strategy.reject_weight=1", "strategy.router_weight=0.5"])
    runner.run_experiment(cfg, tmp_path / "m")
    scenario, _, strategy = runner.build_experiment(cfg)
    from modulemesh.mesh import ModuleMesh

    mesh = ModuleMesh.load(tmp_path / "m" / "mesh").eval()
    x = torch.cat([as_float(t.x_val) for t in scenario])
    mesh.router.expert_weight = 0.0
    without = strategy.predict_log_probs(mesh, x, None)
    mesh.router.expert_weight = 50.0
    with_ = strategy.predict_log_probs(mesh, x, None)
    # A large weight on the experts' task evidence moves the predicted class distribution (it was ignored before).
    assert float((F.softmax(with_, 1) - F.softmax(without, 1)).abs().sum(1).mean()) > 0.01


def test_density_draws_need_a_pixel_space_density_router():
    from modulemesh.errors import ConfigError
    from modulemesh.strategies import ModuleMeshStrategy

    cfg = load_config(ExperimentConfig, None, [*CLASS_IL, "router.type=topk", "strategy.reject_samples=8"])
    try:
        ModuleMeshStrategy(cfg, None, cfg.strategy.model_extra)
    except ConfigError as e:
        assert "reject_samples" in str(e)
    else:
        raise AssertionError("reject_samples under a learned gate was accepted")
