"""`modulemesh upgrade` end to end on sklearn digits, and its answers to bad input."""

import json

import pytest
import torch

from modulemesh.cli import main
from modulemesh.preserve.train import load_model
from modulemesh.training.evaluate import accuracy_fraction

TEACHER = "backbone: {type: mlp, hidden: [32]}\ntrain: {steps: 150, batch_size: 64, lr: 0.1, eval_every: 50}\n"
NEW = """backbone: {type: mlp, hidden: [48, 40]}
train: {steps: 20, batch_size: 64, lr: 0.05, eval_every: 10}
distill: {alpha: 0.5, temperature: 4.0}
transfer: {beta: 1.0, fisher_samples: 200}
"""


@pytest.fixture(scope="module")
def upgraded(tmp_path_factory):
    d = tmp_path_factory.mktemp("upgrade")
    (d / "teacher.yaml").write_text(TEACHER)
    (d / "new.yaml").write_text(NEW)
    argv = [
        "upgrade",
        "--from",
        str(d / "old"),
        "--train-teacher",
        str(d / "teacher.yaml"),
        "--data",
        "digits",
        "--to",
        str(d / "new.yaml"),
        "--out",
        str(d / "out"),
        "--device",
        "cpu",
        "--quiet",
    ]
    assert main(argv) == 0
    return d, argv


def test_upgrade_writes_model_and_report(upgraded, capsys):
    d, _ = upgraded
    out = d / "out"
    for name in (
        "new_model.safetensors",
        "new_model.json",
        "report.md",
        "report.json",
        "results.csv",
        "accuracy_vs_steps.png",
        "config.yaml",
    ):
        assert (out / name).exists(), name
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["arms"]) == {"random", "kd", "transfer", "transfer_kd"}
    teacher_acc = rep["old_model"]["accuracy"]
    assert teacher_acc > 0.8
    for arm in rep["arms"].values():
        assert [p["step"] for p in arm["curve"]] == [0, 10, 20]
    # Wider + deeper: the transfer is function-preserving, so the new model starts at the old one's accuracy.
    assert rep["arms"]["transfer"]["init_accuracy"] == pytest.approx(teacher_acc)
    assert rep["arms"]["transfer_kd"]["init_accuracy"] == pytest.approx(teacher_acc)
    assert rep["arms"]["random"]["init_accuracy"] < 0.5
    assert rep["arms"]["random"]["init_accuracy"] == rep["arms"]["kd"]["init_accuracy"]  # same random init
    assert rep["arms"]["transfer_kd"]["steps_to_target"] == 0
    relations = [l["relation"] for l in rep["transfer"]["layers"]]
    assert relations == ["widened", "identity", "widened"]
    assert rep["transfer"]["importance_mass_carried"] == pytest.approx(1.0)
    md = (out / "report.md").read_text()
    assert "(d) Fisher transfer + KD" in md and "identity" in md
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "arm,step,accuracy" and len(csv_lines) == 1 + 4 * 3
    # The saved new model rebuilds from its manifest and scores what the report says.
    model, manifest = load_model(out / "new_model")
    assert manifest["backbone"] == {"type": "mlp", "hidden": [48, 40]} and manifest["arm"] == "transfer_kd"
    from modulemesh.data.datasets import load_dataset

    ds = load_dataset("digits")
    acc = accuracy_fraction(model, torch.as_tensor(ds.x_test), torch.as_tensor(ds.y_test))
    assert acc == pytest.approx(rep["arms"]["transfer_kd"]["final_accuracy"])
    old, old_manifest = load_model(d / "old")
    assert old_manifest["data"] == "digits" and old_manifest["backbone"] == {"type": "mlp", "hidden": [32]}


def test_rerun_reuses_finished_arms(upgraded, capsys):
    d, argv = upgraded
    arm = d / "out" / "arms" / "kd.json"
    before = arm.stat().st_mtime_ns
    assert main(argv) == 0
    assert arm.stat().st_mtime_ns == before
    assert "exists: upgrading it" in capsys.readouterr().err


def test_tampered_old_model_is_refused(upgraded, tmp_path, capsys):
    d, _ = upgraded
    (tmp_path / "old.json").write_text((d / "old.json").read_text())
    blob = bytearray((d / "old.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / "old.safetensors").write_bytes(bytes(blob))
    rc = main(
        [
            "upgrade",
            "--from",
            str(tmp_path / "old"),
            "--to",
            str(d / "new.yaml"),
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert rc == 2 and "sha256" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "no_such_set"], "unknown dataset"),
        (["--data", "mnist"], "shape"),
        (["--beta", "1.5"], "transfer.beta"),
        (["--set", "train.stepz=3"], "unknown config key 'train.stepz'"),
        (["--set", "backbone.type=transformer"], "type 'transformer'"),
    ],
)
def test_bad_input_gets_one_clear_line(upgraded, tmp_path, capsys, extra, message):
    d, _ = upgraded
    rc = main(
        [
            "upgrade",
            "--from",
            str(d / "old"),
            "--to",
            str(d / "new.yaml"),
            "--out",
            str(tmp_path / "o"),
            "--quiet",
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and message in err
    assert not (tmp_path / "o" / "new_model.json").exists()


def test_missing_old_model_says_how_to_make_one(tmp_path, capsys):
    (tmp_path / "new.yaml").write_text(NEW)
    rc = main(["upgrade", "--from", str(tmp_path / "nothing"), "--to", str(tmp_path / "new.yaml"), "--quiet"])
    assert rc == 2 and "--train-teacher" in capsys.readouterr().err
    rc = main(
        [
            "upgrade",
            "--from",
            str(tmp_path / "nothing"),
            "--to",
            str(tmp_path / "new.yaml"),
            "--train-teacher",
            str(tmp_path / "new.yaml"),
            "--quiet",
        ]
    )
    assert rc == 2 and "needs --data" in capsys.readouterr().err


def test_no_distill_writes_the_transfer_only_model(upgraded, tmp_path):
    d, _ = upgraded
    out = tmp_path / "o"
    assert (
        main(
            [
                "upgrade",
                "--from",
                str(d / "old"),
                "--to",
                str(d / "new.yaml"),
                "--out",
                str(out),
                "--quiet",
                "--no-distill",
                "--steps",
                "0",
                "--beta",
                "0.5",
            ]
        )
        == 0
    )
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["arms"]) == {"random", "transfer"}
    assert load_model(out / "new_model")[1]["arm"] == "transfer"
    assert rep["transfer"]["beta"] == 0.5


def test_library_rejects_kd_arms_without_distillation(upgraded, tmp_path):
    from modulemesh.data.datasets import load_dataset
    from modulemesh.errors import ConfigError
    from modulemesh.preserve.upgrade import UpgradeConfig, run_upgrade

    d, _ = upgraded
    teacher, manifest = load_model(d / "old")
    cfg = UpgradeConfig(backbone={"type": "mlp", "hidden": [8]}, distill={"enabled": False})
    with pytest.raises(ConfigError, match="KD arms"):
        run_upgrade(teacher, manifest, cfg, load_dataset("digits"), tmp_path, arms=("kd",))
