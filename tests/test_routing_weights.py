"""benchmarks/routing_weights.py: bad input is one clear line and exit code 2, before any data loads; the
shipped blocks carry the weights (and the probe's L2) its validation table chose."""

import itertools
import re
import sys
from pathlib import Path

import pytest

from modulemesh.mesh.task_evidence import PROBE_L2
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
    rw = routing_weights
    s = {"mesh " + rw.key(p): 90.0 for p in itertools.product(rw.L2S, rw.BETAS, rw.PROBES, rw.ALPHAS)}
    s["mesh " + rw.key((1.0, 25.0, 30.0, 1.0))] = 90.5  # a clear winner beats the shipped point
    assert rw.choose(s, (1.0, 10.0, 30.0, 0.5)) == (1.0, 25.0, 30.0, 1.0)
    s["mesh " + rw.key((1.0, 10.0, 100.0, 0.5))] = 90.49  # within TIE of the best: the point nearest the shipped wins
    assert rw.choose(s, (1.0, 10.0, 100.0, 0.5)) == (1.0, 10.0, 100.0, 0.5)
    assert rw.choose(s, (1.0, 25.0, 30.0, 0.5)) == (1.0, 25.0, 30.0, 1.0)
    s["mesh " + rw.key((1.0, 10.0, 100.0, 0.5))] = 90.47  # further than TIE: no longer a tie
    assert rw.choose(s, (1.0, 10.0, 100.0, 0.5)) == (1.0, 25.0, 30.0, 1.0)


@pytest.mark.parametrize("config", sorted(routing_weights.CONFIGS.values()))
def test_shipped_block_holds_the_validation_tables_choice(config):
    text = (ROOT / "benchmarks" / "results" / "routing_weights.md").read_text()
    pattern = rf"^configs/{re.escape(config)} .*Chosen: \*\*l2=(\S+) b=(\S+) c=(\S+) a=(\S+)\*\*"
    ((l2, b, c, a),) = re.findall(pattern, text, re.M)
    ((_, _, cfg),) = plan_runs(str(ROOT / "configs" / config), [], ["modulemesh"], 1, "cpu")
    got = (PROBE_L2, cfg.router.expert_weight, cfg.router.probe_weight, cfg.strategy.model_extra["router_weight"])
    assert got == (float(l2), float(b), float(c), float(a))
