"""``modulemesh compare --tune``: a grid per strategy chosen on the validation split, then every seed."""

import dataclasses
import json

import numpy as np
import pytest

import modulemesh.runner as runner
from modulemesh.cli import main

CONFIG = "configs/split_digits.yaml"
FAST = ["--set", "scenario.n_tasks=3", "--set", "strategy.buffer_size=50", "--quiet"]


def tune(out, *extra, strategies="finetune,er", seeds="2"):
    return main(["compare", CONFIG, "--strategies", strategies, "--seeds", seeds, *FAST, *extra, "--out", str(out)])


def test_a_clearly_bad_lr_is_never_chosen_and_the_choice_runs_on_every_seed(tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    trained = []
    original = runner.run_experiment
    monkeypatch.setattr(
        runner, "run_experiment", lambda cfg, o, *a, **k: trained.append(str(o)) or original(cfg, o, *a, **k)
    )
    assert tune(out, "--tune", "train.lr=0.0001,0.1", "--tune", "train.batch_size=16,32", strategies="joint,er") == 0
    saved = json.loads((out / "tuning.json").read_text())
    assert saved["grid"] == {"train.lr": ["0.0001", "0.1"], "train.batch_size": ["16", "32"]}
    for s in ("joint", "er"):
        entry = saved["strategies"][s]
        assert entry["seed"] == 0 and len(entry["grid"]) == 4
        assert entry["chosen"]["train.lr"] == "0.1"
        acc = {
            (g["point"]["train.lr"], g["point"]["train.batch_size"]): g["validation_average_accuracy"]
            for g in entry["grid"]
        }
        assert max(acc["0.1", b] for b in ("16", "32")) > max(acc["0.0001", b] for b in ("16", "32")) + 20
        assert entry["chosen_validation_average_accuracy"] == max(acc.values())
        # The chosen point runs on every seed; seed 0 is the tuning run itself, copied, not trained again.
        for seed in (0, 1):
            cfg = (out / s / f"seed{seed}" / "config.yaml").read_text()
            assert "lr: 0.1" in cfg and f"batch_size: {entry['chosen']['train.batch_size']}" in cfg
    assert len(trained) == 2 * 4 + 2 and all("/tune/" in t for t in trained[:8])
    assert "**" in (out / "tuning.md").read_text() and "| er |" in (out / "tuning.md").read_text()

    # Resumable: the same command again trains nothing and chooses the same.
    monkeypatch.setattr(runner, "run_experiment", lambda *a, **k: pytest.fail("a finished run was trained again"))
    before = (out / "tuning.json").read_text()
    assert tune(out, "--tune", "train.lr=0.0001,0.1", "--tune", "train.batch_size=16,32", strategies="joint,er") == 0
    assert (out / "tuning.json").read_text() == before


def test_noise_in_place_of_the_test_split_changes_no_choice(tmp_path, monkeypatch):
    grid = ["--tune", "train.lr=0.01,0.1"]
    assert tune(tmp_path / "clean", *grid, strategies="er,ewc", seeds="1") == 0
    original = runner.load_dataset

    def noisy(*a, **k):
        ds = original(*a, **k)
        rng = np.random.default_rng(1)
        x = rng.integers(0, 256, size=ds.x_test.shape).astype(ds.x_test.dtype)
        return dataclasses.replace(ds, x_test=x, y_test=rng.permutation(ds.y_test))

    monkeypatch.setattr(runner, "load_dataset", noisy)
    assert tune(tmp_path / "noisy", *grid, strategies="er,ewc", seeds="1") == 0
    clean = json.loads((tmp_path / "clean" / "tuning.json").read_text())["strategies"]
    noise = json.loads((tmp_path / "noisy" / "tuning.json").read_text())["strategies"]
    assert noise == clean  # every validation score and every choice, exactly
    # ... while the test accuracies did see the noise (so the patch took effect).
    test_acc = [
        json.loads((tmp_path / d / "er" / "seed0" / "metrics.json").read_text())["average_accuracy"]
        for d in ("clean", "noisy")
    ]
    assert test_acc[0] > test_acc[1] + 20


@pytest.mark.parametrize(
    "spec, words",
    [
        (["--tune", "train.lr="], "at least one value"),
        (["--tune", "train.lr"], "at least one value"),
        (["--tune", "train.lrr=0.1,0.2"], "lrr"),
        (["--tune", "scenario.val_fraction=0.1,0.2"], "cannot vary"),
        (["--tune", "seed=1,2"], "cannot vary"),
        (["--tune", "train.lr=0.1,0.1"], "repeats"),
        (["--tune", "train.lr=0.1,0.2", "--tune", "train.lr=0.3"], "twice"),
        (["--tune", "train.lr=0.1,0.2", "--set", "er.train.lr=0.1"], "drop one"),
    ],
)
def test_bad_grid_is_one_line_exit_2_before_any_output(tmp_path, capsys, spec, words):
    assert tune(tmp_path / "x", *spec) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "x").exists()


def test_tuning_needs_a_validation_split(tmp_path, capsys):
    assert tune(tmp_path / "x", "--tune", "train.lr=0.1", "--set", "scenario.val_fraction=0", seeds="1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "val_fraction" in err[0] and not (tmp_path / "x").exists()


def test_validation_accuracy_is_in_every_runs_metrics(tmp_path):
    assert tune(tmp_path / "x", strategies="finetune", seeds="1") == 0
    m = json.loads((tmp_path / "x" / "finetune" / "seed0" / "metrics.json").read_text())
    assert len(m["validation_accuracies"]) == 3
    assert m["validation_average_accuracy"] == pytest.approx(sum(m["validation_accuracies"]) / 3)


def test_a_diverging_point_is_recorded_never_chosen_and_all_diverging_is_one_line(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert tune(out, "--tune", "train.lr=1e30,0.1", strategies="finetune", seeds="1") == 0
    entry = json.loads((out / "tuning.json").read_text())["strategies"]["finetune"]
    failed = [g for g in entry["grid"] if g["validation_average_accuracy"] is None]
    assert [g["point"]["train.lr"] for g in failed] == ["1e30"] and "NaN or inf" in failed[0]["failed"]
    assert entry["chosen"] == {"train.lr": "0.1"} and entry["chosen_validation_average_accuracy"] > 25
    assert "failed (diverged)" in (out / "tuning.md").read_text()
    assert (out / "finetune" / "seed0" / "metrics.json").exists()  # the chosen point ran
    capsys.readouterr()
    assert tune(tmp_path / "all", "--tune", "train.lr=1e30,1e31", strategies="finetune", seeds="1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "every --tune point of finetune failed" in err[0] and "lower" in err[0]
