"""``modulemesh compare``: strategies x seeds, table/CSV/markdown/plots, resume by skipping finished runs."""

import csv
import json

import pytest

import modulemesh.runner as runner
from modulemesh.cli import main
from modulemesh.sweep import plan_runs

FAST = [
    "--set",
    "data.name=digits",
    "--set",
    "train.batch_size=16",
    "--set",
    "train.lr=0.1",
    "--set",
    "strategy.buffer_size=50",
    "--quiet",
]


def compare(out, *extra):
    return main(["compare", "--strategies", "finetune,er", "--seeds", "2", *FAST, *extra, "--out", str(out)])


def test_compare_writes_table_plots_and_skips_finished_runs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    assert compare(out) == 0
    printed = capsys.readouterr().out
    assert "±" in printed and "avg" in printed
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["strategy"] for r in rows] == ["finetune", "er"] and all(r["seeds"] == "2" for r in rows)
    for s, r in zip(["finetune", "er"], rows):
        accs = [json.loads((out / s / f"seed{k}" / "metrics.json").read_text())["average_accuracy"] for k in (0, 1)]
        assert float(r["average_accuracy_mean"]) == pytest.approx(sum(accs) / 2, rel=1e-5)
        assert float(r["average_accuracy_std"]) == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5, rel=1e-4, abs=1e-9)
    finetune, er = rows
    assert float(er["average_accuracy_mean"]) > float(finetune["average_accuracy_mean"])  # replay helps
    md = (out / "results.md").read_text()
    assert "| finetune | 2 |" in md and "forgetting" in md
    for png in ("accuracy_vs_forgetting.png", "seen_accuracy.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # Rerun with the same --out: every run is finished, so nothing trains and the table is the same.
    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner, "run_experiment", no_training)
    before = (out / "results.csv").read_text()
    assert compare(out) == 0
    assert "4 of 4 runs already finished" in capsys.readouterr().err
    assert (out / "results.csv").read_text() == before


def test_compare_reruns_only_what_is_missing(tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    assert main(["compare", "--strategies", "finetune", "--seeds", "1", *FAST, "--out", str(out)]) == 0
    trained = []
    original = runner.run_experiment
    monkeypatch.setattr(
        runner, "run_experiment", lambda cfg, o, *a, **k: trained.append(str(o)) or original(cfg, o, *a, **k)
    )
    assert main(["compare", "--strategies", "finetune", "--seeds", "2", *FAST, "--out", str(out)]) == 0
    assert trained == [str(out / "finetune" / "seed1")]


def test_bad_strategy_name_is_one_clear_line(tmp_path, capsys):
    assert main(["compare", "--strategies", "er,nope", *FAST, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown strategy 'nope'" in err[0] and "derpp" in err[0]
    assert not (tmp_path / "x").exists()


def test_per_strategy_overrides_apply_to_one_strategy_only():
    runs = plan_runs(
        "configs/split_mnist_class_il.yaml",
        ["er.train.lr=0.07", "der.alpha=0.2", "strategy.buffer_size=200"],
        ["er", "der", "ewc"],
        2,
        "cpu",
    )
    by = {(s, seed): cfg for s, seed, cfg in runs}
    assert len(runs) == 6 and {seed for _, seed, _ in runs} == {0, 1}
    # er's --set wins; der and ewc keep their own per_strategy blocks (lr 0.1) from the file.
    assert by["er", 0].train.lr == 0.07 and by["der", 0].train.lr == 0.1 and by["ewc", 1].train.lr == 0.1
    assert by["der", 1].strategy.model_extra == {"alpha": 0.2} and by["er", 0].strategy.model_extra == {}
    assert all(cfg.strategy.buffer_size == 200 and cfg.device == "cpu" for cfg in by.values())


def test_parallel_jobs_match_serial_runs(tmp_path):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    extra = ["--set", "scenario.n_tasks=2", "--seeds", "1"]
    assert main(["compare", "--strategies", "finetune,der", *FAST, *extra, "--out", str(serial)]) == 0
    assert main(["compare", "--strategies", "finetune,der", *FAST, *extra, "--jobs", "2", "--out", str(parallel)]) == 0
    for s in ("finetune", "der"):
        a = json.loads((serial / s / "seed0" / "metrics.json").read_text())["accuracy_matrix"]
        b = json.loads((parallel / s / "seed0" / "metrics.json").read_text())["accuracy_matrix"]
        assert a == b


def test_a_run_saved_before_a_new_config_key_is_still_read_back(tmp_path, monkeypatch, capsys):
    """A key added to the schema since a run was saved (default unchanged) does not make it another
    experiment; a saved value that differs still does."""
    import yaml

    out = tmp_path / "cmp"
    assert main(["compare", "--strategies", "finetune", "--seeds", "1", *FAST, "--out", str(out)]) == 0
    saved = out / "finetune" / "seed0" / "config.yaml"
    cfg = yaml.safe_load(saved.read_text())
    assert cfg["router"].pop("threshold", "missing") is None  # as an older version wrote it
    saved.write_text(yaml.safe_dump(cfg))
    trained = []
    original = runner.run_experiment
    monkeypatch.setattr(
        runner, "run_experiment", lambda c, o, *a, **k: trained.append(str(o)) or original(c, o, *a, **k)
    )
    assert main(["compare", "--strategies", "finetune", "--seeds", "1", *FAST, "--out", str(out)]) == 0
    assert trained == []
    cfg["train"]["lr"] = 0.5  # a real difference: the run is not this experiment's
    saved.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    rc = main(["compare", "--strategies", "finetune", "--seeds", "1", *FAST, "--out", str(out)])
    assert rc == 2 and "different experiment (sections differ: train)" in capsys.readouterr().err
