"""benchmarks/federated_select.py: each of its three forms answers wrong arguments with one line and exit
code 2, before any data loads or any file is written; a good log still renders."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import federated_select  # noqa: E402


@pytest.mark.parametrize(
    "argv, says",
    [
        ([], "missing arguments"),
        (["0.1"], "missing arguments"),
        (["-1", "5"], "ALPHA must be > 0"),
        (["0.1", "five"], "invalid literal"),
        (["--ceiling"], "missing arguments"),
        (["--ceiling", "10"], "at least one PROXY_SIZE"),
        (["--ceiling", "10", "x"], "invalid literal"),
        (["--render"], "--render needs LOG files"),
        (["--render", "no_such.jsonl"], "no log file 'no_such.jsonl'"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(argv, says, capsys, monkeypatch):
    monkeypatch.setattr(federated_select, "validation_split", lambda: pytest.fail("loaded data on bad input"))
    monkeypatch.setattr(federated_select, "publish", lambda *a, **k: pytest.fail("wrote a table on bad input"))
    assert federated_select.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and "usage:" in err[0]


def test_a_log_with_probes_and_ceilings_renders(tmp_path, monkeypatch):
    log = tmp_path / "probes.jsonl"
    log.write_text(
        '{"alpha": 0.1, "sets": ["federation.local_epochs=5"], "val": [0.9, 0.91], "teacher": [0.92, 0.93], '
        '"MB": 57.2, "s": 1.0}\n'
        '{"ceiling": true, "rounds": 7, "proxy_size": 5000, "teacher_val": 0.97, "teacher": 0.96, '
        '"val": [0.94, 0.95], "s": 1.0}\n'
    )
    written = {}
    monkeypatch.setattr(federated_select, "publish", lambda name, title, text: written.update({name: text}))
    assert federated_select.main(["--render", str(log)]) == 0
    text = written["federated_select"]
    assert "| 0.1 | local_epochs=5 | 0.900 0.910 | 0.930 | 57.2 MB |" in text
    assert "| 5,000 | 0.9700 / 0.9600 | 0.940 0.950 |" in text and "for 7 rounds" in text
