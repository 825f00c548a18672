"""Costs cover all the work a method does: the loop, and the strategy's fits before and after it."""

import time

import torch

from modulemesh.config import ExperimentConfig, load_config
from modulemesh.costs import eigh_flops, measure, svd_flops
from modulemesh.runner import build_experiment
from modulemesh.training.loop import Trainer


def test_decompositions_are_counted_with_their_textbook_formulas():
    a = torch.randn(300, 40, dtype=torch.double)
    with measure() as c:
        torch.linalg.svd(a, full_matrices=False)
    assert c.flops == 6 * 300 * 40**2 + 20 * 40**3 == svd_flops((300, 40))
    s = a.T @ a
    with measure() as c:
        torch.linalg.eigh(s)
    assert c.flops == 9 * 40**3 == eigh_flops((40, 40))
    with measure() as c:
        torch.linalg.solve(s, a.T)
    assert c.flops == 2 * 40**3 // 3 + 2 * 40 * 40 * 300
    # A batch of matrices costs the batch size times one.
    with measure() as c:
        torch.linalg.svd(torch.randn(3, 20, 10), full_matrices=False)
    assert c.flops == 3 * svd_flops((20, 10))


def test_the_strategy_work_after_a_task_is_in_the_task_cost():
    cfg = load_config(
        ExperimentConfig,
        None,
        ["data.name=digits", "strategy.name=finetune", "train.epochs=1", "scenario.n_tasks=2"],
        device="cpu",
    )
    scenario, mesh, strategy = build_experiment(cfg)
    strategy.setup(mesh)
    plain = Trainer(mesh, strategy, cfg.train, torch.device("cpu"), seed=0).train_task(scenario.tasks[0], scenario)
    assert plain.strategy_flops < 0.01 * plain.train_flops  # finetune does next to nothing outside the loop

    def fit_after_task(ctx):  # what a density fit or a Fisher pass looks like to the loop
        torch.linalg.svd(torch.randn(500, 64, dtype=torch.double), full_matrices=False)
        time.sleep(0.2)

    strategy.after_task = fit_after_task
    stats = Trainer(mesh, strategy, cfg.train, torch.device("cpu"), seed=0).train_task(scenario.tasks[1], scenario)
    assert stats.strategy_flops >= svd_flops((500, 64))
    assert stats.flops == stats.train_flops + stats.strategy_flops
    assert stats.strategy_time_s >= 0.2 and stats.wall_time_s == stats.train_time_s + stats.strategy_time_s


def test_a_learned_gate_is_counted_once_and_a_density_fit_counts_as_trained():
    import tempfile

    from modulemesh.runner import run_experiment

    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(
            ExperimentConfig,
            None,
            ["data.name=digits", "router.type=topk", "scenario.n_tasks=2", "train.count_flops=false"],
            device="cpu",
        )
        m = run_experiment(cfg, d)
    # The gate's weights are parameters (in total_parameters); they are not router *state* as well.
    assert m["router_state_elements"] == 0
    assert m["total_parameters"] > sum(m["expert_parameters"])
    assert m["router_state_fit_per_task"] == [0, 0]
