"""The shipped Permuted-MNIST ModuleMesh block holds what its committed validation grids chose: lr / batch
(routing_tuning_permuted_mnist.json), one direction per class density (routing_bytes_permuted_mnist.md) and the
best stored precision x width within DER++'s bytes (routing_bytes_int4_permuted_mnist.md); routing.py's second
row (784-100-100 int8 experts) runs its own grid's lr / batch (..._100x100.json)."""

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
    best = re.search(r"Best within the budget: router\.components (\d+), expert\.backbone\.hidden", text)
    assert best, "routing_bytes_permuted_mnist.md names no best point within DER++'s bytes"
    assert mm.router.components == int(best[1]) and mm.router.state_dtype == "int8"
    assert "--set modulemesh.router.state_dtype=int8" in text
    # With the refit LDA head and skip-head experts, the precision x width grid (validation) picked int4 experts
    # as wide as fit DER++'s bytes.
    assert mm.strategy.model_extra["head_refit"] == "lda"
    ridge_grid = json.loads((RESULTS / "routing_head_ridge_permuted_mnist.json").read_text())
    assert "configs/permuted_mnist.yaml " in ridge_grid["command"]
    ridge = ridge_grid["strategies"]["modulemesh"]
    assert float(ridge["chosen"]["strategy.head_ridge"]) == mm.strategy.model_extra["head_ridge"] == 0.01
    assert ridge["chosen_validation_average_accuracy"] == max(g["validation_average_accuracy"] for g in ridge["grid"])
    grid = (RESULTS / "routing_bytes_int4_permuted_mnist.md").read_text()
    best = re.search(r"Best within the budget: expert\.storage (\w+), expert\.backbone\.hidden \[(\d+),(\d+)\]", grid)
    assert best, "routing_bytes_int4_permuted_mnist.md names no best point within DER++'s bytes"
    width = int(best[2])
    assert mm.expert.storage == best[1] == "int4"
    assert mm.expert.backbone == {"type": "mlp", "hidden": [width, width], "skip_head": True}
    rows = re.findall(r"^\| modulemesh \| (int\d) \| \[(\d+),\d+\] \| ([\d,]+) \| (yes|no) \| ([\d.]+)", grid, re.M)
    val = {(st, int(w)): (int(b.replace(",", "")), float(v)) for st, w, b, _, v in rows}
    budget = 778_440
    fits = {k: v for k, (b, v) in val.items() if b <= budget}
    assert max(fits, key=fits.get) == ("int4", width) and val[("int4", width)][1] > val[("int8", 69)][1]

    def stored(hidden, storage):  # bytes one finished expert keeps
        spec = {"type": "mlp", "hidden": [hidden, hidden], "skip_head": True}
        e = Expert("e", list(range(10)), spec, (784,)).compress(storage)
        return sum(v.numel() * v.element_size() for v in e.stored_state().values())

    # The grid's bytes are ten experts plus the same densities; one unit wider would not fit.
    kept = val[("int4", width)][0]
    assert kept - val[("int8", 69)][0] == 10 * (stored(width, "int4") - stored(69, "int8"))
    assert kept + 10 * (stored(width + 1, "int4") - stored(width, "int4")) > budget
    # DER++ keeps the config's 784-100-100 fp32 model; ModuleMesh's block changes none of its settings.
    assert runs["derpp"].expert.backbone["hidden"] == [100, 100] and runs["derpp"].expert.storage == "fp32"
    assert runs["derpp"].router.components == 2 and mm.strategy.model_extra["init_from_previous"] is True


def test_permuted_second_row_runs_its_own_grids_choice():
    title, config, arms, overrides = routing.SECTIONS["permuted"]
    (row,) = [a for a in arms if isinstance(a, tuple)]
    ((_, _, c),) = plan_runs(str(ROOT / "configs" / config), [*overrides, *row[2]], [row[1]], 1, "cpu")
    assert c.expert.backbone["hidden"] == [100, 100]
    assert "modulemesh.expert.storage=int8" in row[2]
    assert (c.train.lr, c.train.batch_size) == chosen("routing_tuning_permuted_mnist_100x100.json")
