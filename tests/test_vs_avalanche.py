"""The Avalanche comparison's markdown is the render of its committed JSON; its script refuses bad input."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

from avalanche_report import render  # noqa: E402


def test_markdown_is_the_render_of_the_committed_json():
    data = json.loads((RESULTS / "vs_avalanche.json").read_text())
    assert len(data["seeds"]) == len(data["ours"]) >= 3 and not data["blocker"]
    assert (RESULTS / "vs_avalanche.md").read_text() == render(data)


def test_one_seed_says_so_and_prints_no_spread():
    data = json.loads((RESULTS / "vs_avalanche.json").read_text())
    one = {**data, "seeds": [0], "ours": data["ours"][:1], "avalanche": data["avalanche"][:1]}
    md = render(one)
    rows = [line for line in md.splitlines() if line.startswith("| DER") or line.startswith("| Replay")]
    assert rows and all("±" not in r for r in rows)
    assert "one seed" in md and "no seed-to-seed spread was measured" in md
    # the numbers are this seed's own, not the 3-seed means
    der = data["ours"][0]["strategies"]["der"]["average_accuracy"]
    assert f"| {der:.2f} |" in next(r for r in rows if r.startswith("| DER"))


def test_script_refuses_a_bad_seed_count_in_one_line():
    for bad in (["--seeds", "0"], ["--seeds", "x"], ["--nope"]):
        r = subprocess.run(
            ["bash", str(ROOT / "benchmarks" / "vs_avalanche.sh"), *bad], capture_output=True, text=True, timeout=30
        )
        assert r.returncode == 2, bad
        assert len(r.stderr.strip().splitlines()) == 1 and "--seeds" in r.stderr, r.stderr
