"""benchmarks/routing_weights.py: bad input is one clear line and exit code 2, before any data loads; the
shipped blocks carry the b and a its validation table chose."""

import re
import sys
from pathlib import Path

import pytest

from modulemesh.sweep import plan_runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import routing_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_section_and_missing_run_are_one_clear_line(tmp_path, capsys):
    assert routing_weights.main(["--sections", "mnist,nope", "--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown section 'nope'" in err[0] and "fashion" in err[0]
    # No finished run of the shipped block there: names the run directory and the command that makes it.
    assert routing_weights.main(["--sections", "fashion", "--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "fashion" / "modulemesh" / "seed0") in err[0]
    assert "benchmarks/routing.py --sections fashion" in err[0]
    assert not (tmp_path / "fashion").exists()  # nothing written


def test_choice_is_the_best_point_and_a_tie_keeps_the_shipped_neighbourhood():
    grid = routing_weights.GRID
    s = {f"mesh b={b:g} a={a:g}": 90.0 for b in grid for a in routing_weights.ALPHAS}
    s["mesh b=25 a=1"] = 90.5  # a clear winner beats the shipped pair
    assert routing_weights.choose(s, (20.0, 0.5)) == (25.0, 1.0)
    s["mesh b=30 a=0.5"] = 90.49  # within TIE of the best: the pair nearest the shipped one wins
    assert routing_weights.choose(s, (40.0, 0.5)) == (30.0, 0.5)
    assert routing_weights.choose(s, (20.0, 1.0)) == (25.0, 1.0)
    s["mesh b=30 a=0.5"] = 90.47  # further than TIE: no longer a tie
    assert routing_weights.choose(s, (40.0, 0.5)) == (25.0, 1.0)


@pytest.mark.parametrize("config", sorted(routing_weights.CONFIGS.values()))
def test_shipped_block_holds_the_validation_tables_choice(config):
    text = (ROOT / "benchmarks" / "results" / "routing_weights.md").read_text()
    ((b, a),) = re.findall(rf"^configs/{re.escape(config)} .*Chosen: \*\*b=(\S+) a=(\S+)\*\*", text, re.M)
    ((_, _, cfg),) = plan_runs(str(ROOT / "configs" / config), [], ["modulemesh"], 1, "cpu")
    assert (cfg.router.expert_weight, cfg.strategy.model_extra["router_weight"]) == (float(b), float(a))
