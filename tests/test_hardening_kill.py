"""Bounded kill -9 test: run, compare and federate are SIGKILLed at a random moment and rerun.

The rerun must exit 0 with the same results as an uninterrupted run (timings excluded), leave no
``.*.tmp`` file, miss no documented output, and no process of the killed command may survive it.
The full campaign (>= 30 kills, compare with worker processes) is ``benchmarks/hardening.py``.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from modulemesh.cli import main

spec = importlib.util.spec_from_file_location(
    "hardening", Path(__file__).resolve().parents[1] / "benchmarks" / "hardening.py"
)
hardening = importlib.util.module_from_spec(spec)
sys.modules["hardening"] = hardening  # dataclasses look their module up there
spec.loader.exec_module(hardening)


def in_process(argv: list[str], out: Path) -> int:
    return main([*argv, "--out", str(out)])


@pytest.mark.parametrize("name", ["run", "compare", "federate"])
def test_kill_9_at_a_random_moment_then_rerun_loses_nothing(tmp_path, name):
    cmd = hardening.COMMANDS[name]
    if name == "compare":  # one strategy, one seed, in process: the campaign covers --jobs 2 and more runs
        cmd = replace(cmd, argv=[*cmd.argv[: cmd.argv.index("--strategies")], "--strategies", "er", "--seeds", "1"])
    if name == "run":
        cmd = replace(cmd, argv=[*cmd.argv, "--set", "scenario.n_tasks=3"])
    assert in_process(cmd.argv, tmp_path / "reference") == 0
    reference = cmd.result(tmp_path / "reference")
    rng = random.Random(f"kill-{name}")
    cycle = hardening.kill_cycle(
        cmd, tmp_path / "killed", reference, rng, rerun=in_process, delay_s=rng.uniform(0.1, 0.8)
    )
    assert cycle.killed, "the command finished before the kill; the test would check nothing"
    assert cycle.orphans == 0 and cycle.rerun_rc == 0 and cycle.temp_files_after_rerun == 0, cycle
    assert not cycle.missing_outputs, cycle.missing_outputs
    # Floats within 1e-6 relative: a resumed run reloads float32 tensors (see hardening.close); accuracies are exact.
    assert cycle.close, "results after kill + rerun differ from an uninterrupted run"
    accuracies = {
        "run": lambda r: r["accuracy_matrix"],
        "compare": lambda r: [m["accuracy_matrix"] for m in r["runs"].values()],
        "federate": lambda r: [h["accuracy"] for h in r["history"]],
    }[name]
    assert accuracies(cmd.result(tmp_path / "killed")) == accuracies(reference)  # bitwise
