"""Shipped configs carry each strategy's settings; run and compare apply them, --set still wins."""

from pathlib import Path

import pytest

from modulemesh.config import ExperimentConfig, load_config
from modulemesh.errors import ConfigError
from modulemesh.sweep import plan_runs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_compare_gives_every_arm_its_own_settings_from_the_file():
    runs = {
        s: c
        for s, _, c in plan_runs(
            str(CONFIGS / "split_mnist_class_il.yaml"), [], ["modulemesh", "derpp", "er", "router-only"], 1, "cpu"
        )
    }
    mm = runs["modulemesh"]
    assert mm.router.type == "density" and mm.expert.backbone == {"type": "cnn", "channels": [8, 16], "hidden": 64}
    # lr / batch from ModuleMesh's own validation grid (benchmarks/results/routing_tuning_*.md).
    assert (mm.train.batch_size, mm.train.lr, mm.strategy.buffer_size) == (10, 0.03, 300)
    # The experts' task evidence: rejection-trained experts, read by the task probe (routing_weights.md).
    assert mm.strategy.model_extra["reject_weight"] == 1.0 and mm.router.probe_weight == 100.0
    # Within DER++'s bytes: finished experts and densities kept in int8 (routing_bytes.py's choice).
    assert (mm.expert.storage, mm.router.state_dtype) == ("int8", "int8")
    assert (runs["derpp"].train.batch_size, runs["derpp"].train.lr, runs["derpp"].strategy.buffer_size) == (
        32,
        0.1,
        500,
    )
    assert runs["derpp"].expert.backbone["hidden"] == [100, 100] and runs["er"].train.lr == 0.1
    assert runs["router-only"].router.type == "density" and runs["router-only"].router.state_dtype == "float16"
    assert runs["derpp"].expert.storage == "fp32"  # a model that trains on every task stays fp32
    # A per-strategy --set still wins over the file's block.
    ((_, _, c),) = plan_runs(
        str(CONFIGS / "split_mnist_class_il.yaml"), ["modulemesh.train.lr=0.02"], ["modulemesh"], 1, "cpu"
    )
    assert c.train.lr == 0.02 and c.train.batch_size == 10
    # A backbone of another type replaces the block's CNN whole (no CNN option leaks into the MLP).
    ((_, _, c),) = plan_runs(
        str(CONFIGS / "split_mnist_class_il.yaml"),
        ["expert.backbone={type: mlp, hidden: [20, 20]}"],
        ["modulemesh"],
        1,
        "cpu",
    )
    assert c.expert.backbone == {"type": "mlp", "hidden": [20, 20]}


def test_run_applies_the_block_of_the_strategy_it_runs(tmp_path):
    c = load_config(
        ExperimentConfig, CONFIGS / "split_mnist_class_il.yaml", ["strategy.name=modulemesh", "train.lr=0.05"]
    )
    assert c.train.lr == 0.05 and c.strategy.buffer_size == 300 and c.expert.backbone["type"] == "cnn"
    c = load_config(ExperimentConfig, CONFIGS / "split_mnist_class_il.yaml")  # the file's own strategy (der)
    assert c.strategy.name == "der" and c.train.lr == 0.1 and c.strategy.buffer_size == 500  # der's block
    bad = tmp_path / "bad.yaml"
    bad.write_text("per_strategy: [er]\n")
    with pytest.raises(ConfigError, match="per_strategy"):
        load_config(ExperimentConfig, bad)
