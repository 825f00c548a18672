"""benchmarks/routing.py checks its sections before anything trains: a wrong name or seed count is one line,
exit code 2, and no run directory is made."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import routing  # noqa: E402


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--sections", "mnist,nope"], "unknown section 'nope'"),
        (["--section-seeds", "bogus=1"], "unknown section 'bogus'"),
        (["--section-seeds", "fashion=x"], "--section-seeds 'fashion=x'"),
        (["--section-seeds", "fashion=0"], "--section-seeds 'fashion=0'"),
    ],
)
def test_bad_sections_stop_before_any_run(argv, says, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(routing, "run_arms", lambda *a, **k: pytest.fail("trained on bad input"))
    assert routing.main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]
    assert not (tmp_path / "out").exists()
