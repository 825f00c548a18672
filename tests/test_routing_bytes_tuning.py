"""benchmarks/routing_bytes.py --from-tuning: a `compare --tune` grid rendered with each run's bytes, what fits
DER++'s bytes marked, and the best fitting point named (found in the directories compare --tune writes)."""

import importlib.util
import json
import sys
from pathlib import Path

from modulemesh.sweep.tune import tuning_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
spec = importlib.util.spec_from_file_location("routing_bytes_bench", ROOT / "benchmarks" / "routing_bytes.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_from_tuning_marks_the_budget_and_picks_the_best_point_that_fits(tmp_path, monkeypatch):
    out = tmp_path / "grid"
    # (hidden, val acc, bytes): the most accurate point is over budget, so the best that fits is [60,60].
    points = [("[60,60]", 90.5, 700_000), ("[70,70]", 90.2, 770_000), ("[100,100]", 91.0, 900_000)]
    grid = []
    for hidden, val, kept in points:
        point = {"expert.backbone.hidden": hidden}
        where = tuning_dir(out, "modulemesh", point, 0)  # brackets in the value: the sanitised directory name
        where.mkdir(parents=True)
        (where / "metrics.json").write_text(json.dumps({"total_bytes": kept}))
        grid.append({"point": point, "validation_average_accuracy": val})
    command = "modulemesh compare configs/permuted_mnist.yaml --strategies modulemesh --tune expert.backbone.hidden=..."
    (out / "tuning.json").write_text(
        json.dumps({"command": command, "strategies": {"modulemesh": {"grid": grid, "seed": 0}}})
    )
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    monkeypatch.setattr(bench, "ROOT", tmp_path)  # write the table here, not into the repository

    assert bench.main(["--from-tuning", str(out), "--budget", "778440"]) == 0
    text = (tmp_path / "benchmarks" / "results" / "routing_bytes_permuted_mnist.md").read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| modulemesh |")]
    assert [r.split(" | ")[3] for r in rows] == ["yes", "yes", "no"]
    assert "**778,440 bytes**" in text and "--budget 778440" in text
    assert "Best within the budget: expert.backbone.hidden [60,60]: 90.50% on validation, 700,000 bytes." in text

    # Without a budget: no fit column and no choice; a directory with no grid is one line and exit code 2.
    assert bench.main(["--from-tuning", str(out)]) == 0
    text = (tmp_path / "benchmarks" / "results" / "routing_bytes_permuted_mnist.md").read_text()
    assert "<= DER++" not in text and "Best within" not in text
    assert bench.main(["--from-tuning", str(tmp_path / "missing")]) == 2
