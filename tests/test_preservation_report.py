"""benchmarks/preservation.py's seed aggregation: mean ± sd per cell, the goal judged on the mean and per seed."""

import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
spec = importlib.util.spec_from_file_location("preservation_bench", ROOT / "benchmarks" / "preservation.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def case(seed, kd, tkd):
    return {
        "data": "mnist",
        "student": "narrower+shallower",
        "teacher_accuracy": 0.9 + seed / 100,
        "init_accuracy_transfer": 0.1,
        "steps_95_kd": kd,
        "steps_95_transfer_kd": tkd,
        "steps_99_kd": None,
        "steps_99_transfer_kd": 50,
        "ratio_95": tkd / kd,
        "final_accuracy_kd": 0.9,
        "final_accuracy_transfer_kd": 0.95,
        "goal_met": tkd <= 0.3 * kd,
    }


def test_goal_is_judged_on_the_mean_and_counted_per_seed():
    # Per seed 20/100 and 20/100 meet the goal, 60/100 does not; the mean (100/300 = 0.33) does not.
    group = [case(0, 100, 20), case(1, 100, 20), case(2, 100, 60)]
    assert bench.goal_cell(group) == "no (met in 2/3 seeds)"
    assert bench.goal_cell(group[:2]) == "yes (met in 2/2 seeds)"


def test_steps_cell_averages_the_seeds_that_reached_and_counts_the_others():
    assert bench.steps_cell([10, 20, 30], 100) == "20 ± 10"
    assert bench.steps_cell([10, None, 30], 100) == "20 ± 14 (> 100 in 1/3)"
    assert bench.steps_cell([None, None], 100) == "> 100 (all seeds)"


def test_render_gives_one_row_per_case_over_the_seeds():
    per_seed = [{"seed": s, "cases": [case(s, 100, 20 + 20 * s)], "ablation": []} for s in range(3)]
    table, abl = bench.render(per_seed, Namespace(steps=1000, ablation_steps=0))
    rows = [line for line in table.splitlines() if line.startswith("| mnist")]
    assert len(rows) == 1 and abl == ""
    assert "91.00 ± 1.00%" in rows[0]  # teacher accuracy over the seeds
    assert "100 ± 0 / 40 ± 20" in rows[0] and "0.40 ± 0.20" in rows[0]
    assert "> 1000 (all seeds) / 50 ± 0" in rows[0]
    assert rows[0].endswith("no (met in 1/3 seeds) |")
