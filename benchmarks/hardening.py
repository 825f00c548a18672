"""Kill -9 campaign: interrupt `run`, `compare` and `federate` at random moments, rerun, check nothing was lost.

Each cycle starts the command as its own process (own session), waits until it holds its --out lock
(imports done, work started), sleeps a random time, sends SIGKILL, then checks
- no orphan: no process of the killed command's session is alive 3 s later (compare --jobs 2 has workers);
- the rerun (same argv, same --out) exits 0, leaves no ``.*.tmp`` file anywhere under --out, and every
  output the command documents exists;
- the rerun's results equal an uninterrupted reference run's (timings and memory excluded).
Orphans found are killed by pid (they are this script's descendants) so the next cycle starts clean.

    python benchmarks/hardening.py --kills 33 --seed 0      # writes benchmarks/results/hardening.md

``tests/test_hardening_kill.py`` runs the same cycle a few times.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = [
    "--set",
    "data.name=digits",
    "--set",
    "scenario.max_train_per_task=120",
    "--set",
    "scenario.max_test_per_task=40",
    "--set",
    "train.batch_size=16",
    "--quiet",
]
RUN_PLOTS = ("accuracy_matrix.png", "task_accuracy.png", "routing.png")
RUN_OUTPUTS = ("metrics.json", "config.yaml", "mesh/mesh.json", *RUN_PLOTS)
VOLATILE = ("time", "seconds", "memory")  # measured, not computed: differ between any two runs


@dataclass
class Command:
    """One command under test: its argv (without --out), its outputs, and what must be identical."""

    name: str
    argv: list[str]
    outputs: Callable[[Path], list[Path]]
    result: Callable[[Path], Any]
    duration_s: float  # rough length of an uninterrupted run here, to spread the kill moments


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def stable(obj: Any) -> Any:
    """``obj`` without measured fields (wall time, seconds, peak memory)."""
    if isinstance(obj, dict):
        return {k: stable(v) for k, v in obj.items() if not any(word in k for word in VOLATILE)}
    if isinstance(obj, list):
        return [stable(v) for v in obj]
    return obj


def close(a: Any, b: Any, rel: float = 1e-6, tiny: float = 1e-9) -> bool:
    """Same structure and values, floats within ``rel`` relative or ``tiny`` absolute (resuming reloads saved
    float32 tensors, whose contiguous layout can change a reduction's last bits, e.g. the density router's
    log-densities; routing weights of 1e-40 then differ relatively by a lot but absolutely by nothing)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], rel, tiny) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, rel, tiny) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return a == b or abs(a - b) <= max(rel * max(abs(a), abs(b)), tiny) or (a != a and b != b)
    return a == b


def compare_outputs(out: Path) -> list[Path]:
    files = [
        out / n
        for n in ("results.csv", "results.md", "results.json", "accuracy_vs_forgetting.png", "seen_accuracy.png")
    ]
    for sub in sorted(p.parent for p in out.glob("*/seed*/config.yaml")):
        files += [sub / n for n in RUN_OUTPUTS]
    return files


def compare_result(out: Path) -> Any:
    subs = {str(p.parent.relative_to(out)): stable(_json(p)) for p in sorted(out.glob("*/seed*/metrics.json"))}
    return {"rows": stable(_json(out / "results.json")["rows"]), "runs": subs}


FED_OUTPUTS = (
    "config.yaml",
    "results.json",
    "rounds.csv",
    "accuracy_vs_rounds.png",
    "accuracy_vs_bytes.png",
    "client_accuracy.png",
    "state.safetensors",
    "state.json",
)

COMMANDS = {
    "run": Command(
        "run",
        ["run", *TINY_RUN],
        lambda o: [o / n for n in RUN_OUTPUTS],
        lambda o: stable(_json(o / "metrics.json")),
        6.0,
    ),
    "compare": Command(
        "compare",
        [
            "compare",
            *TINY_RUN,
            "--set",
            "scenario.n_tasks=3",
            "--strategies",
            "finetune,er",
            "--seeds",
            "1",
            "--jobs",
            "2",
        ],
        compare_outputs,
        compare_result,
        14.0,
    ),
    "federate": Command(
        "federate",
        [
            "federate",
            str(ROOT / "configs" / "federate_digits.yaml"),
            "--mode",
            "fedavg",
            "--rounds",
            "4",
            "--set",
            "federation.max_train=400",
            "--set",
            "federation.local_epochs=1",
            "--quiet",
        ],
        lambda o: [o / n for n in FED_OUTPUTS],
        lambda o: (
            stable(_json(o / "results.json")["summary"]) | {"history": stable(_json(o / "results.json")["history"])}
        ),
        6.0,
    ),
}


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def run_to_end(argv: list[str], out: Path) -> int:
    return subprocess.run(
        [sys.executable, "-m", "modulemesh.cli", *argv, "--out", str(out)],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=600,
    ).returncode


def start_working(cmd: Command, out: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own session; return once it holds its --out lock (imports done, work begun)."""
    from modulemesh.io import lock_path

    lock = lock_path(out)
    before = lock.stat().st_mtime_ns if lock.exists() else None
    proc = subprocess.Popen(
        [sys.executable, "-m", "modulemesh.cli", *cmd.argv, "--out", str(out)],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if lock.exists() and lock.stat().st_mtime_ns != before:
            break
        time.sleep(0.05)
    return proc


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the killed command and everything it started)."""
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                pids.append(p.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return pids


@dataclass
class Cycle:
    command: str
    delay_s: float
    killed: bool = False
    temp_files_after_kill: int = 0
    orphans: int = 0
    rerun_rc: int | None = None
    temp_files_after_rerun: int = 0
    missing_outputs: list[str] = field(default_factory=list)
    identical: bool | None = None  # bitwise
    close: bool | None = None  # floats within 1e-6 relative

    @property
    def ok(self) -> bool:
        return (
            self.killed
            and self.orphans == 0
            and self.rerun_rc == 0
            and self.temp_files_after_rerun == 0
            and not self.missing_outputs
            and bool(self.close)
        )


def kill_cycle(
    cmd: Command,
    out: Path,
    reference: Any,
    rng: random.Random,
    rerun: Callable[[list[str], Path], int] = run_to_end,
    delay_s: float | None = None,
) -> Cycle:
    """Start ``cmd`` into ``out`` (which may hold an earlier interrupted run), SIGKILL it, rerun, check."""
    from modulemesh.io import stale_temp_files

    cycle = Cycle(cmd.name, rng.uniform(0.0, cmd.duration_s) if delay_s is None else delay_s)
    proc = start_working(cmd, out)
    time.sleep(cycle.delay_s)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        cycle.killed = True
    proc.wait()
    cycle.temp_files_after_kill = len(stale_temp_files(out))
    settle = time.monotonic() + 3.0  # workers that die with their parent get 3 s to notice
    while (left := session_members(proc.pid)) and time.monotonic() < settle:
        time.sleep(0.1)
    cycle.orphans = len(left)
    for pid in left:  # our own descendants: clean up so they cannot race the rerun
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cycle.rerun_rc = rerun(cmd.argv, out)
    cycle.temp_files_after_rerun = len(stale_temp_files(out))
    cycle.missing_outputs = [str(p.relative_to(out)) for p in cmd.outputs(out) if not p.exists()]
    try:
        result = cmd.result(out)
        cycle.identical, cycle.close = result == reference, close(result, reference)
    except (OSError, ValueError, KeyError):
        cycle.identical = cycle.close = False
    return cycle


def campaign(kills: int, seed: int, work: Path) -> list[Cycle]:
    rng = random.Random(seed)
    references = {}
    for name, cmd in COMMANDS.items():
        ref = work / f"reference_{name}"
        proc = start_working(cmd, ref)
        t0 = time.perf_counter()
        assert proc.wait() == 0, f"reference {name} failed"
        cmd.duration_s = time.perf_counter() - t0  # kill moments spread over the work (after imports) on this machine
        references[name] = cmd.result(ref)
        print(f"reference {name}: {cmd.duration_s:.1f} s", flush=True)
    cycles: list[Cycle] = []
    names = list(COMMANDS)
    while sum(c.killed for c in cycles) < kills:
        name = names[len(cycles) % len(names)]
        out = work / f"{name}_{len(cycles)}"
        c = kill_cycle(COMMANDS[name], out, references[name], rng)
        cycles.append(c)
        print(
            f"{len(cycles):3d} {name:9s} kill after {c.delay_s:5.2f}s killed={c.killed} "
            f"temp_after_kill={c.temp_files_after_kill} "
            f"orphans={c.orphans} rerun={c.rerun_rc} temp_after_rerun={c.temp_files_after_rerun} "
            f"missing={len(c.missing_outputs)} identical={c.identical} close={c.close}",
            flush=True,
        )
        shutil.rmtree(out, ignore_errors=True)
    return cycles


def report(cycles: list[Cycle], argv: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from publish import publish

    rows = [
        "| command | kills | finished before the kill | temp files left by the kill | orphans | rerun failed "
        "| temp files after rerun | missing outputs | results bitwise identical | results equal within 1e-6 "
        "| all checks pass |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in [*COMMANDS, "all"]:
        cs = [c for c in cycles if name in (c.command, "all")]
        k = [c for c in cs if c.killed]
        rows.append(
            f"| {name} | {len(k)} | {len(cs) - len(k)} | {sum(c.temp_files_after_kill > 0 for c in k)} | "
            f"{sum(c.orphans for c in k)} | {sum(c.rerun_rc != 0 for c in k)} | "
            f"{sum(c.temp_files_after_rerun for c in k)} | {sum(bool(c.missing_outputs) for c in k)} | "
            f"{sum(bool(c.identical) for c in k)}/{len(k)} | {sum(bool(c.close) for c in k)}/{len(k)} | "
            f"{sum(c.ok for c in k)}/{len(k)} |"
        )
    missing = sorted({m for c in cycles for m in c.missing_outputs})
    body = (
        "Each kill: SIGKILL at a random moment (uniform over one uninterrupted run's length, after the command "
        "took its --out lock), then the same command rerun to the end. Counts are cycles, except orphans (processes). "
        "compare runs two strategies with `--jobs 2` (one worker process each). Results are compared without "
        "timings and memory; 'all checks pass' needs: no orphan, rerun exit 0, no temp file and no missing output "
        "after the rerun, results equal within 1e-6 relative.\n\n" + "\n".join(rows) + "\n"
    )
    if missing:
        body += "\nOutputs missing after a rerun: " + ", ".join(missing) + "\n"
    publish("hardening", "Kill -9 campaign", body, argv)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=33, help="SIGKILLs that hit a live process (default 33)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="modulemesh-kill-") as work:
        cycles = campaign(args.kills, args.seed, Path(work))
    report(cycles, sys.argv[1:] if argv is None else argv)
    return 0 if all(c.ok for c in cycles if c.killed) else 1


if __name__ == "__main__":
    sys.exit(main())
