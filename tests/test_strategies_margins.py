"""Each method must do what it is for, by a margin that a broken version (its loss replaced by plain
cross-entropy, i.e. fine-tuning) would miss. Same seed, same data order and same initialization in
every arm, so a difference is the method's own doing. Digits: about a second per run."""

import tempfile

import pytest
import torch

from modulemesh.config import ExperimentConfig, load_config
from modulemesh.runner import build_experiment, run_experiment
from modulemesh.training.loop import Trainer

CLASS_IL = [
    "data.name=digits",
    "train.batch_size=16",
    "train.lr=0.1",
    "train.epochs=3",
    "strategy.buffer_size=100",
    "train.count_flops=false",
]
# Task-IL on digits forgets about one point under fine-tuning (seed noise is as large), so the
# regularizers are checked where forgetting is large: 4 pixel-permuted tasks of all ten digits.
PERMUTED = [
    "data.name=digits",
    "scenario.kind=domain_incremental",
    "scenario.transform=permutation",
    "scenario.n_tasks=4",
    "train.batch_size=16",
    "train.lr=0.05",
    "train.epochs=5",
    "train.count_flops=false",
]


def metrics(base, strategy, *extra, seed=0):
    cfg = load_config(
        ExperimentConfig, None, [*base, f"strategy.name={strategy}", f"seed={seed}", *extra], device="cpu"
    )
    with tempfile.TemporaryDirectory() as d:
        return run_experiment(cfg, d)


@pytest.fixture(scope="module")
def finetune_class_il():
    return metrics(CLASS_IL, "finetune")


@pytest.mark.parametrize("strategy", ["er", "der", "derpp", "icarl"])
def test_every_replay_method_beats_finetune_in_class_il(strategy, finetune_class_il):
    m = metrics(CLASS_IL, strategy)
    assert finetune_class_il["average_accuracy"] < 25  # fine-tuning keeps only the last task
    assert m["average_accuracy"] >= finetune_class_il["average_accuracy"] + 20
    assert m["forgetting"] <= finetune_class_il["forgetting"] - 20


@pytest.fixture(scope="module")
def finetune_permuted():
    return [metrics(PERMUTED, "finetune", seed=s)["forgetting"] for s in (0, 1)]


@pytest.mark.parametrize("strategy,extra", [("ewc", ["strategy.lambda=30"]), ("si", ["strategy.c=3"]), ("lwf", [])])
def test_regularizers_lower_forgetting_against_finetune(strategy, extra, finetune_permuted):
    for seed, base in zip((0, 1), finetune_permuted):
        assert base > 40  # the setting forgets: there is something to protect
        assert metrics(PERMUTED, strategy, *extra, seed=seed)["forgetting"] <= base - 5


def test_modulemesh_never_changes_an_old_expert():
    cfg = load_config(ExperimentConfig, None, [*CLASS_IL, "strategy.name=modulemesh", "train.epochs=1"], device="cpu")
    scenario, mesh, strategy = build_experiment(cfg)
    strategy.setup(mesh)
    trainer = Trainer(mesh, strategy, cfg.train, torch.device("cpu"), seed=0)
    snapshots = []
    for task in scenario.tasks:
        trainer.train_task(task, scenario)
        for expert, old in zip(mesh.experts, snapshots):
            for k, v in expert.state_dict().items():
                assert torch.equal(v, old[k]), f"{expert.name}.{k} changed at task {task.id}"
        snapshots.append({k: v.clone() for k, v in mesh.experts[-1].state_dict().items()})
    assert len(snapshots) == len(scenario.tasks) == len(mesh.experts)
