"""The shipped Permuted-MNIST ModuleMesh block holds what its committed validation grids chose: lr / batch
(routing_tuning_permuted_mnist.json) and the best setting within DER++'s bytes (routing_bytes_permuted_mnist.md);
routing.py's second row (784-100-100 experts) runs its own grid's lr / batch (..._100x100.json)."""

import importlib.util
import json
import re
import sys
from pathlib import Path

from modulemesh.mesh import Expert
from modulemesh.sweep import plan_runs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
spec = importlib.util.spec_from_file_location("routing_bench", ROOT / "benchmarks" / "routing.py")
routing = importlib.util.module_from_spec(spec)
spec.loader.exec_module(routing)


def chosen(name):
    tuning = json.loads((RESULTS / name).read_text())
    assert "configs/permuted_mnist.yaml " in tuning["command"] and "--tune train.lr=" in tuning["command"]
    entry = tuning["strategies"]["modulemesh"]
    scores = [g["validation_average_accuracy"] for g in entry["grid"]]
    assert len(scores) == 6 and entry["chosen_validation_average_accuracy"] == max(scores)
    return float(entry["chosen"]["train.lr"]), int(entry["chosen"]["train.batch_size"])


def test_permuted_modulemesh_block_holds_its_validation_choices():
    runs = {
        s: c
        for s, _, c in plan_runs(str(ROOT / "configs" / "permuted_mnist.yaml"), [], ["modulemesh", "derpp"], 1, "cpu")
    }
    mm = runs["modulemesh"]
    assert (mm.train.lr, mm.train.batch_size) == chosen("routing_tuning_permuted_mnist.json")

    text = (RESULTS / "routing_bytes_permuted_mnist.md").read_text()
    best = re.search(
        r"Best within the budget: router\.components (\d+), expert\.backbone\.hidden \[(\d+),(\d+)\]", text
    )
    assert best, "routing_bytes_permuted_mnist.md names no best point within DER++'s bytes"
    assert mm.router.components == int(best[1]) and (best[2], best[3]) == ("70", "70")
    # With the refit LDA head, the skip-head grid (validation) picked the widest skip-head expert that fits.
    assert mm.strategy.model_extra["head_refit"] == "lda"
    assert mm.expert.backbone == {"type": "mlp", "hidden": [69, 69], "skip_head": True}
    grid = re.findall(
        r"^\| modulemesh \| (true|false) \| \[(\d+),(\d+)\] \| \*{0,2}([\d.]+)",
        (RESULTS / "routing_skip_head_permuted_mnist.md").read_text(),
        re.M,
    )
    val = {(skip == "true", int(w)): float(v) for skip, w, _, v in grid}
    fits = {k: v for k, v in val.items() if k != (True, 70)}  # 70-70 with the skip head is over DER++'s bytes
    assert max(fits, key=fits.get) == (True, 69)

    def stored(spec):  # bytes one finished int8 expert keeps
        e = Expert("e", list(range(10)), spec, (784,)).compress("int8")
        return sum(v.numel() * v.element_size() for v in e.stored_state().values())

    plain = stored({"type": "mlp", "hidden": [70, 70]})
    total_70 = int(re.search(r"^\| modulemesh \| 1 \| \[70,70\] \| ([\d,]+) \|", text, re.M)[1].replace(",", ""))
    budget = 778_440
    assert total_70 + 10 * (stored({**mm.expert.backbone}) - plain) <= budget
    assert total_70 + 10 * (stored({"type": "mlp", "hidden": [70, 70], "skip_head": True}) - plain) > budget
    assert (mm.expert.storage, mm.router.state_dtype) == ("int8", "int8")  # the grid's fixed --set values
    assert "--set modulemesh.expert.storage=int8 --set modulemesh.router.state_dtype=int8" in text
    # DER++ keeps the config's 784-100-100 fp32 model; ModuleMesh's block changes none of its settings.
    assert runs["derpp"].expert.backbone["hidden"] == [100, 100] and runs["derpp"].expert.storage == "fp32"
    assert runs["derpp"].router.components == 2 and mm.strategy.model_extra["init_from_previous"] is True


def test_permuted_second_row_runs_its_own_grids_choice():
    title, config, arms, overrides = routing.SECTIONS["permuted"]
    (row,) = [a for a in arms if isinstance(a, tuple)]
    ((_, _, c),) = plan_runs(str(ROOT / "configs" / config), [*overrides, *row[2]], [row[1]], 1, "cpu")
    assert c.expert.backbone["hidden"] == [100, 100] and c.expert.storage == "int8"
    assert (c.train.lr, c.train.batch_size) == chosen("routing_tuning_permuted_mnist_100x100.json")
