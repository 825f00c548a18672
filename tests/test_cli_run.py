import json
import subprocess
import sys

import pytest
import yaml

from helpers import interrupted_at_checkpoint
from modulemesh.cli import main
from modulemesh.config import ExperimentConfig, load_config
from modulemesh.errors import ConfigError

FAST = ["--set", "data.name=digits", "--set", "train.batch_size=16", "--quiet"]


def run(tmp_path, *extra, name="out"):
    out = tmp_path / name
    code = main(["run", *FAST, *extra, "--out", str(out)])
    return code, out


def test_run_end_to_end_writes_results_and_is_reproducible(tmp_path):
    code, out = run(tmp_path, "--set", "train.epochs=3")
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in (
        "average_accuracy",
        "forgetting",
        "bwt",
        "fwt",
        "accuracy_matrix",
        "params_trained_per_task",
        "flops",
        "wall_time_s",
    ):
        assert key in m
    assert len(m["accuracy_matrix"]) == 5 and all(len(r) == 5 for r in m["accuracy_matrix"])
    assert len(m["experts"]) == 5 and m["flops"] > 0
    assert all(p > 0 for p in m["params_trained_per_task"])
    # Each new expert is trained; old experts are frozen, so they never count again.
    changed = m["parameters_changed_per_task"]
    assert max(changed) <= m["expert_parameters"][0] + m["total_parameters"] - sum(m["expert_parameters"])
    # The density router's state fit per task is part of what a task trains: each task fits its own
    # expert's density once, so the per-task fits add up to the router's whole state.
    assert all(r > 0 for r in m["router_state_fit_per_task"])
    assert sum(m["router_state_fit_per_task"]) == m["router_state_elements"]
    assert m["params_trained_per_task"] == [a + b for a, b in zip(changed, m["router_state_fit_per_task"])]
    # Costs include the end-of-task density fit (SVDs), counted analytically.
    assert m["strategy_flops"] > 0 and m["flops"] == m["train_loop_flops"] + m["strategy_flops"]
    assert m["train_time_s"] >= m["train_loop_time_s"] + m["strategy_time_s"] - 1e-6
    for png in ("accuracy_matrix.png", "task_accuracy.png", "routing.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["data"]["name"] == "digits" and cfg["train"]["epochs"] == 3
    # The first task's expert is accurate on its own two digits right after training.
    assert m["accuracy_matrix"][0][0] > 90
    code, out2 = run(tmp_path, "--set", "train.epochs=3", name="again")
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["accuracy_matrix"] == m["accuracy_matrix"]  # same seed, same numbers


def test_interrupted_run_resumes_to_identical_numbers(tmp_path):
    code, full = run(tmp_path, name="full")
    reference = json.loads((full / "metrics.json").read_text())["accuracy_matrix"]

    with interrupted_at_checkpoint(2):
        assert run(tmp_path, name="resumed")[0] == 130
    progress = json.loads((tmp_path / "resumed" / "checkpoint" / "progress.json").read_text())
    assert progress["completed_tasks"] == 2
    code, out = run(tmp_path, name="resumed")
    assert code == 0
    assert json.loads((out / "metrics.json").read_text())["accuracy_matrix"] == reference


@pytest.mark.parametrize("strategy", ["finetune", "joint"])
def test_baselines_bound_the_problem(tmp_path, strategy):
    code, out = run(tmp_path, "--set", f"strategy.name={strategy}", "--set", "train.epochs=3", name=strategy)
    m = json.loads((out / "metrics.json").read_text())
    assert code == 0 and len(m["experts"]) == 1
    if strategy == "finetune":
        assert m["forgetting"] > 50  # class-IL fine-tuning forgets almost everything
    else:
        assert m["average_accuracy"] > 80 and m["forgetting"] < 15


def test_task_incremental_with_oracle_router(tmp_path):
    code, out = run(
        tmp_path,
        "--set",
        "scenario.kind=task_incremental",
        "--set",
        "router.type=oracle",
        "--set",
        "train.epochs=3",
        "--set",
        "expert.backbone={type: mlp, hidden: [64]}",
    )
    m = json.loads((out / "metrics.json").read_text())
    assert code == 0 and m["average_accuracy"] > 95 and m["forgetting"] == pytest.approx(0.0, abs=1e-9)
    # The oracle sends each task's test data to that task's expert only.
    assert all(row[i] == pytest.approx(1.0) for i, row in enumerate(m["routing_matrix"]))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "train.epochz=2"], "unknown config key 'train.epochz'"),
        (["--set", "router.type=magic"], "router.type"),
        (["--set", "train.lr=-1"], "train.lr"),
        (["--set", "strategy.bufer_size=3"], "bufer_size"),
        (["--set", "strategy.name=nope"], "unknown strategy"),
        (["--set", "data.name=nope"], "nope"),
        (["--set", "router.type=oracle"], "task ids"),
        (["--set", "scenario.n_tasks=20"], "at most 10"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(tmp_path, capsys, args, message):
    code = main(["run", *FAST, *args, "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_missing_config_file_and_other_experiment_in_out(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "out" / "checkpoint").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint" / "progress.json").write_text("{}")
    (tmp_path / "out" / "config.yaml").write_text("name: other\n")
    assert main(["run", *FAST, "--out", str(tmp_path / "out")]) == 2
    assert "different experiment" in capsys.readouterr().err


def test_yaml_config_with_overrides():
    cfg = load_config(ExperimentConfig, None, ["router.type=entropy", "train.epochs=2"], seed=7)
    assert cfg.router.type == "entropy" and cfg.train.epochs == 2 and cfg.seed == 7
    with pytest.raises(ConfigError, match="key=value"):
        load_config(ExperimentConfig, None, ["train.epochs"])


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "modulemesh.cli", "run", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--set" in r.stdout and "--device" in r.stdout


def test_diverging_loss_stops_with_a_clear_error(tmp_path, capsys):
    code = main(
        ["run", *FAST, "--set", "strategy.name=finetune", "--set", "train.lr=1e30", "--out", str(tmp_path / "nan")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "loss became NaN or inf" in err and "lower train.lr" in err
