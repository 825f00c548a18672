"""The shipped configs' strategy blocks hold what their committed validation grid chose.

Each table in benchmarks/results/continual_tuning_*.json was written by ``modulemesh compare --tune``;
a config edited by hand (or a grid rerun without copying its choice) fails here.
"""

import json
from pathlib import Path

import pytest

from modulemesh.sweep import plan_runs

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ("finetune", "joint", "ewc", "si", "lwf", "icarl", "er", "der", "derpp")
TUNED = {
    "split_mnist_class_il.yaml": "continual_tuning_class_il.json",
    "split_fashion_mnist.yaml": "continual_tuning_fashion.json",
    "split_mnist_task_il.yaml": "continual_tuning_task_il.json",
    "permuted_mnist.yaml": "continual_tuning_permuted.json",  # no iCaRL (a class-IL method) in domain-IL
}


@pytest.mark.parametrize("config,table", sorted(TUNED.items()))
def test_config_blocks_hold_the_validation_grids_choice(config, table):
    tuning = json.loads((ROOT / "benchmarks" / "results" / table).read_text())
    assert f"configs/{config} " in tuning["command"] and "--tune train.lr=" in tuning["command"]
    baselines = [s for s in BASELINES if s != "icarl" or config != "permuted_mnist.yaml"]
    assert set(baselines) <= set(tuning["strategies"])
    runs = {s: cfg for s, _, cfg in plan_runs(str(ROOT / "configs" / config), [], baselines, 1, "cpu")}
    for s in baselines:
        entry = tuning["strategies"][s]
        scores = [g["validation_average_accuracy"] for g in entry["grid"]]
        ok = [v for v in scores if v is not None]  # None: the point diverged (recorded as failed)
        assert len(scores) == 4 and ok and entry["chosen_validation_average_accuracy"] == max(ok), s
        chosen = entry["chosen"]
        assert runs[s].train.lr == float(chosen["train.lr"]), s
        assert runs[s].train.batch_size == int(chosen["train.batch_size"]), s


# ModuleMesh's own grid ran later, on ModuleMesh alone (benchmarks/results/routing_tuning_*.json).
MESH_TUNED = {
    "split_mnist_class_il.yaml": "routing_tuning_split_mnist_class_il.json",
    "split_fashion_mnist.yaml": "routing_tuning_split_fashion_mnist.json",
}


@pytest.mark.parametrize("config,table", sorted(MESH_TUNED.items()))
def test_modulemesh_block_holds_its_validation_grids_choice(config, table):
    tuning = json.loads((ROOT / "benchmarks" / "results" / table).read_text())
    assert f"configs/{config} " in tuning["command"] and "--strategies modulemesh " in tuning["command"]
    entry = tuning["strategies"]["modulemesh"]
    scores = [g["validation_average_accuracy"] for g in entry["grid"]]
    assert len(scores) == 4 and entry["chosen_validation_average_accuracy"] == max(scores)
    ((_, _, cfg),) = plan_runs(str(ROOT / "configs" / config), [], ["modulemesh"], 1, "cpu")
    assert cfg.train.lr == float(entry["chosen"]["train.lr"])
    assert cfg.train.batch_size == int(entry["chosen"]["train.batch_size"])
