"""The shipped Permuted-MNIST ModuleMesh block holds what its committed validation grids chose: lr / batch
(routing_tuning_permuted_mnist.json) and the best setting within DER++'s bytes (routing_bytes_permuted_mnist.md)."""

import json
import re
from pathlib import Path

from modulemesh.sweep import plan_runs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def test_permuted_modulemesh_block_holds_its_validation_choices():
    runs = {
        s: c
        for s, _, c in plan_runs(str(ROOT / "configs" / "permuted_mnist.yaml"), [], ["modulemesh", "derpp"], 1, "cpu")
    }
    mm = runs["modulemesh"]
    tuning = json.loads((RESULTS / "routing_tuning_permuted_mnist.json").read_text())
    assert "configs/permuted_mnist.yaml " in tuning["command"] and "--tune train.lr=" in tuning["command"]
    entry = tuning["strategies"]["modulemesh"]
    scores = [g["validation_average_accuracy"] for g in entry["grid"]]
    assert len(scores) == 6 and entry["chosen_validation_average_accuracy"] == max(scores)
    assert (mm.train.lr, mm.train.batch_size) == (
        float(entry["chosen"]["train.lr"]),
        int(entry["chosen"]["train.batch_size"]),
    )

    text = (RESULTS / "routing_bytes_permuted_mnist.md").read_text()
    best = re.search(
        r"Best within the budget: router\.components (\d+), expert\.backbone\.hidden \[(\d+),(\d+)\]", text
    )
    assert best, "routing_bytes_permuted_mnist.md names no best point within DER++'s bytes"
    assert mm.router.components == int(best[1]) and mm.expert.backbone["hidden"] == [int(best[2]), int(best[3])]
    assert (mm.expert.storage, mm.router.state_dtype) == ("int8", "int8")  # the grid's fixed --set values
    assert "--set modulemesh.expert.storage=int8 --set modulemesh.router.state_dtype=int8" in text
    # DER++ keeps the config's 784-100-100 fp32 model; ModuleMesh's block changes none of its settings.
    assert runs["derpp"].expert.backbone["hidden"] == [100, 100] and runs["derpp"].expert.storage == "fp32"
    assert runs["derpp"].router.components == 2 and mm.strategy.model_extra["init_from_previous"] is True
