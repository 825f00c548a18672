"""Worker processes die with the process that started them (``training.pool``), e.g. a killed ``compare --jobs 2``."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modulemesh.training.pool import WorkerPool

ROOT = Path(__file__).resolve().parents[1]


def children_of(pid: int) -> set[int]:
    kids = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return kids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited


def square(x: int) -> int:
    return x * x


def test_pool_returns_results_and_progress():
    messages = []
    with WorkerPool(2, progress=True) as pool:
        futures = [pool.submit(square, i) for i in range(4)]
        results = sorted(f.result() for f in pool.as_completed(futures, on_message=lambda *m: messages.append(m)))
    assert results == [0, 1, 4, 9]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc to find the worker processes")
def test_killing_compare_with_jobs_leaves_no_worker_alive(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "modulemesh.cli",
        "compare",
        str(ROOT / "configs" / "split_digits.yaml"),
        "--strategies",
        "finetune,er,der",
        "--seeds",
        "2",
        "--jobs",
        "2",
        "--set",
        "train.epochs=50",
        "--out",
        str(tmp_path / "cmp"),
        "--quiet",
    ]
    parent = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        workers: set[int] = set()
        deadline = time.time() + 120
        while time.time() < deadline and len(workers) < 2:  # wait until both workers run (spawn + import torch)
            workers = {
                p
                for p in children_of(parent.pid)
                if "spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
            }
            time.sleep(0.5)
        assert len(workers) == 2, f"compare --jobs 2 started {len(workers)} workers"
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.time() + 20
        while time.time() < deadline and any(alive(p) for p in workers):
            time.sleep(0.2)
        assert not any(alive(p) for p in workers), "a worker outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
