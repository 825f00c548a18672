"""File problems, the --out lock, validation before --overwrite, temp cleanup and outputs restored on rerun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from modulemesh.cli import main
from modulemesh.io import lock_path

RUN = [
    "--set",
    "data.name=digits",
    "--set",
    "scenario.max_train_per_task=60",
    "--set",
    "scenario.max_test_per_task=40",
    "--set",
    "train.batch_size=16",
    "--quiet",
]
FED = [
    "configs/federate_digits.yaml",
    "--mode",
    "fedavg",
    "--rounds",
    "2",
    "--set",
    "federation.max_train=300",
    "--set",
    "federation.local_epochs=1",
    "--quiet",
]
ROOT = Path(__file__).resolve().parents[1]
FED[0] = str(ROOT / FED[0])


def one_line_refusal(capsys, argv) -> str:
    rc = main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"modulemesh {argv[0]}: error: "), (rc, err)
    return err[0]


def argv_for(command: str, config: str, out: Path) -> list[str]:
    if command == "upgrade":
        return ["upgrade", "--from", str(out.parent / "old"), "--to", config, "--quiet", "--out", str(out)]
    return [command, config, "--quiet", "--out", str(out)]


COMMANDS = ["run", "compare", "federate", "m2mkd", "upgrade"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_directory_or_binary_file_as_config_is_one_line(tmp_path, capsys, command):
    line = one_line_refusal(capsys, argv_for(command, str(tmp_path), tmp_path / "out"))
    assert "is a directory" in line and str(tmp_path) in line
    binary = tmp_path / "model.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    assert "not a text file" in one_line_refusal(capsys, argv_for(command, str(binary), tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_out_that_is_a_file_is_one_line_and_left_alone(tmp_path, capsys, command):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"backbone": {"type": "mlp"}} if command == "upgrade" else {"seed": 0}))
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    for out in (existing, existing / "sub"):
        line = one_line_refusal(capsys, argv_for(command, str(config), out))
        assert "existing file" in line and str(existing) in line
    assert existing.read_text() == "keep me"


def test_empty_config_and_too_large_router_k_are_refused(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n# nothing\n")
    assert "is empty" in one_line_refusal(capsys, ["run", str(empty), "--out", str(tmp_path / "a")])
    line = one_line_refusal(capsys, ["run", *RUN, "--set", "router.k=10", "--out", str(tmp_path / "b")])
    assert "rule router.k <= number of experts" in line and "router.k=10" in line and "at most 5 experts" in line


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", *RUN, "--out", str(out)]) == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    return out


def test_overwrite_with_bad_data_keeps_the_previous_run_intact(finished_run, tmp_path, capsys):
    out = copy_of(finished_run, tmp_path)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    line = one_line_refusal(capsys, ["run", *RUN, "--set", "data.name=no_such_data", "--overwrite", "--out", str(out)])
    assert "no_such_data" in line
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # checkpoint, config.yaml, metrics.json and mesh/ untouched


@pytest.mark.parametrize(
    "damage",
    [
        "progress_garbage",
        "progress_truncated",
        "progress_wrong_shape",
        "config_binary",
        "config_truncated",
        "state_truncated",
    ],
)
def test_damaged_checkpoint_or_saved_config_is_one_line_naming_the_file(finished_run, tmp_path, capsys, damage):
    out = copy_of(finished_run, tmp_path)
    progress = out / "checkpoint" / "progress.json"
    state = next((out / "checkpoint").glob("after_task*/state.safetensors"))
    target, content = {
        "progress_garbage": (progress, b"\xff\xfe\x00garbage"),
        "progress_truncated": (progress, progress.read_bytes()[: len(progress.read_bytes()) // 2]),
        "progress_wrong_shape": (
            progress,
            json.dumps(
                {"completed_tasks": 9, "dir": "after_task4", "accuracy_matrix": [], "per_task": [], "elapsed_s": 1.0}
            ).encode(),
        ),
        "config_binary": (out / "config.yaml", b"\x00\x01\x02\xff"),
        "config_truncated": (out / "config.yaml", b"data: {name: dig"),
        "state_truncated": (state, state.read_bytes()[:100]),
    }[damage]
    target.write_bytes(content)
    line = one_line_refusal(capsys, ["run", *RUN, "--out", str(out)])
    assert target.name in line and "--overwrite" in line, line


def test_second_writer_on_the_same_out_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from modulemesh.io import OutputLock;"
            f"lock = OutputLock({str(out)!r}, 'modulemesh run other.yaml').acquire(); "
            "print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_line_refusal(capsys, ["run", *RUN, "--out", str(out)])
        assert f"pid {holder.pid}" in line and "modulemesh run other.yaml" in line and "another --out" in line
        assert not out.exists()  # refused before anything was written
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with its holder
        holder.wait()
    assert main(["run", *RUN, "--set", "scenario.n_tasks=2", "--out", str(out)]) == 0
    assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()


def test_stale_temp_files_are_removed_when_a_command_starts(finished_run, tmp_path, monkeypatch):
    out = copy_of(finished_run, tmp_path)
    cache = tmp_path / "cache"  # the shared data cache has no lock: only temp files an hour old are a dead writer's
    cache.mkdir()
    monkeypatch.setenv("MODULEMESH_CACHE", str(cache))
    old_cache_tmp, live_cache_tmp = cache / ".digits-1.npz.a1.tmp", cache / ".digits-2.npz.b2.tmp"
    old_cache_tmp.write_bytes(b"x")
    live_cache_tmp.write_bytes(b"y")
    os.utime(old_cache_tmp, (time.time() - 7200, time.time() - 7200))
    stale = [
        out / ".metrics.json.k2j3h4.tmp",
        out / "mesh" / ".mesh.json.x8y7.tmp",
        out / "checkpoint" / ".progress.json.q1.tmp",
    ]
    for p in stale:
        p.write_bytes(b"half a file")
    (out / "notes.tmp").write_text("a user's file: not ours to delete")
    assert main(["run", *RUN, "--out", str(out)]) == 0
    assert not any(p.exists() for p in stale) and (out / "notes.tmp").exists()
    assert not list(out.rglob(".*.tmp"))
    assert not old_cache_tmp.exists() and live_cache_tmp.exists()


def test_compare_redraws_a_finished_sub_runs_lost_plots(tmp_path, capsys):
    argv = [
        "compare",
        *RUN,
        "--strategies",
        "finetune",
        "--seeds",
        "1",
        "--set",
        "scenario.n_tasks=2",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    sub = tmp_path / "finetune" / "seed0"
    metrics = (sub / "metrics.json").read_bytes()
    for png in ("routing.png", "task_accuracy.png"):
        (sub / png).unlink()
    capsys.readouterr()
    assert main(argv) == 0
    assert "1 of 1 runs already finished" in capsys.readouterr().err
    assert (sub / "routing.png").read_bytes()[:4] == b"\x89PNG" and (sub / "task_accuracy.png").read_bytes()[
        :4
    ] == b"\x89PNG"
    assert (sub / "metrics.json").read_bytes() == metrics  # read back, not rerun


def test_rerun_of_a_finished_federate_keeps_every_summary_field(tmp_path):
    out = tmp_path / "fed"
    assert main(["federate", *FED, "--out", str(out)]) == 0
    first = json.loads((out / "results.json").read_text())["summary"]
    assert 0.0 <= first["membership_auc"] <= 1.0
    (out / "accuracy_vs_rounds.png").unlink()
    assert main(["federate", *FED, "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["summary"] == first
    assert (out / "accuracy_vs_rounds.png").exists()


def test_overwrite_sets_old_outputs_aside_until_the_command_succeeds(tmp_path):
    from modulemesh.io import OutputLock, overwrite_transaction, set_aside

    out = tmp_path / "out"
    (out / "arms").mkdir(parents=True)
    (out / "arms" / "a.json").write_text("old arm")
    (out / "report.json").write_text("old report")
    with pytest.raises(RuntimeError), overwrite_transaction():
        set_aside(out / "arms")
        set_aside(out / "report.json")
        (out / "report.json").write_text("half of a new report")
        raise RuntimeError("bad data found late")
    assert (out / "arms" / "a.json").read_text() == "old arm" and (out / "report.json").read_text() == "old report"
    assert sorted(p.name for p in out.iterdir()) == ["arms", "report.json"]
    with overwrite_transaction():
        set_aside(out / "arms")
        (out / "arms").mkdir()
    assert list((out / "arms").iterdir()) == [] and sorted(p.name for p in out.iterdir()) == ["arms", "report.json"]
    set_aside(out / "report.json")  # outside a command: deleted at once
    assert not (out / "report.json").exists() and not list(out.glob(".*"))
    (out / ".arms.overwritten").mkdir()  # what a kill -9 during an --overwrite leaves
    lock = OutputLock(out, "modulemesh test").acquire()
    lock.release()
    assert not (out / ".arms.overwritten").exists()
