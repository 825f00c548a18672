"""The shared training loop's minibatching."""

import torch

from modulemesh.config import ExperimentConfig, load_config
from modulemesh.runner import build_experiment
from modulemesh.training.loop import Trainer, batch_bounds


def test_batch_bounds_cover_every_row_once_and_fold_a_tiny_tail():
    assert batch_bounds(30, 10) == [(0, 10), (10, 20), (20, 30)]
    assert batch_bounds(21, 10) == [(0, 10), (10, 21)]  # a 1-row step would follow: folded
    assert batch_bounds(25, 10) == [(0, 10), (10, 20), (20, 25)]  # half a batch stays a step
    assert batch_bounds(3, 10) == [(0, 3)]  # a task smaller than one batch is one step
    for n in range(1, 60):
        rows = [r for b, e in batch_bounds(n, 8) for r in range(b, e)]
        assert rows == list(range(n))


def test_trainer_sees_every_example_once_per_epoch_without_a_tiny_last_step():
    cfg = load_config(
        ExperimentConfig,
        None,
        [
            "data.name=digits",
            "strategy.name=finetune",
            "train.epochs=2",
            "train.batch_size=32",
            "train.count_flops=false",
        ],
        device="cpu",
    )
    scenario, mesh, strategy = build_experiment(cfg)
    strategy.setup(mesh)
    seen = []
    strategy.after_batch = lambda ctx: seen.append(ctx.n_current)
    trainer = Trainer(mesh, strategy, cfg.train, torch.device("cpu"), seed=0)
    task = scenario.tasks[4]
    n = len(task.y_train)
    assert 0 < n % 32 < 16  # this task ends with a short tail to fold
    stats = trainer.train_task(task, scenario)
    assert stats.samples == sum(seen) == 2 * n
    assert stats.steps == len(seen) == trainer.steps_per_task(n)
    assert min(seen) >= 16


def test_a_batch_routed_only_to_frozen_experts_is_skipped_not_an_error(tmp_path):
    from modulemesh.runner import run_experiment

    # batch 2 with a random top-1 router over up to 5 experts: many batches reach frozen experts only
    cfg = load_config(
        ExperimentConfig,
        None,
        [
            "data.name=digits",
            "router.type=random",
            "train.batch_size=2",
            "scenario.n_tasks=3",
            "train.count_flops=false",
        ],
        device="cpu",
    )
    m = run_experiment(cfg, tmp_path / "run")
    assert len(m["accuracy_matrix"]) == 3 and all(p > 0 for p in m["params_trained_per_task"])
