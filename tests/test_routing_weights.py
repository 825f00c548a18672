"""benchmarks/routing_weights.py: bad input is one clear line and exit code 2, before any data loads."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import routing_weights  # noqa: E402


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
