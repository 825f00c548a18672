"""The code stays as ruff wants it (pyproject.toml's [tool.ruff]: line length 120, E/F/W/I rules)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["src", "tests", "benchmarks"]


def ruff(*args):
    return subprocess.run([sys.executable, "-m", "ruff", *args, *PATHS], cwd=ROOT, capture_output=True, text=True)


def test_ruff_check_is_clean():
    r = ruff("check", "--output-format", "concise")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format_is_applied():
    r = ruff("format", "--check")
    assert r.returncode == 0, r.stdout + r.stderr
