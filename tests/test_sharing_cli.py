"""compose, run --from, forget and merge end to end on digits, and their bad inputs (one line, exit 2)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from modulemesh.cli import main
from modulemesh.data.scenarios import as_float
from modulemesh.mesh import DensityRouter, Expert, ModuleMesh
from modulemesh.sharing.output import class_split

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "split_digits.yaml")
RUN = ["run", CONFIG, "--quiet", "--set", "strategy.name=modulemesh", "--set", "router.type=density"]


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def one_line_error(capsys, *argv) -> str:
    code, err = cli(capsys, *argv)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
    return err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Five experts trained apart (one task each, seeds 10..14) and one sequential run of all five tasks."""
    root = tmp_path_factory.mktemp("runs")
    for t in range(5):
        assert main([*RUN, "--tasks", str(t), "--seed", str(10 + t), "--out", str(root / f"task{t}")]) == 0
    assert main([*RUN, "--out", str(root / "sequential")]) == 0
    return root


def union_accuracy(mesh: ModuleMesh) -> float:
    x, y = class_split("digits", None, mesh.covered_classes())
    return 100.0 * float((mesh.predict(as_float(x)) == y).float().mean())


def test_compose_experts_trained_apart_matches_the_sequential_run(runs, tmp_path, capsys):
    assert (
        cli(
            capsys,
            "compose",
            *(runs / f"task{t}" / "mesh" for t in range(5)),
            "--out",
            tmp_path / "c",
            "--data",
            "digits",
        )[0]
        == 0
    )
    report = json.loads((tmp_path / "c" / "compose.json").read_text())
    sequential = union_accuracy(ModuleMesh.load(runs / "sequential" / "mesh"))
    composed = ModuleMesh.load(tmp_path / "c")
    assert report["router"] == "DensityRouter" and composed.covered_classes() == set(range(10))
    assert report["accuracy"] == pytest.approx(union_accuracy(composed))
    assert report["accuracy"] > 85 and abs(report["accuracy"] - sequential) < 4, (report["accuracy"], sequential)
    # Routing, not luck: under uniform weights the same experts do far worse.
    composed.router.temperature = 1e9
    assert union_accuracy(composed) < report["accuracy"] - 20


def test_compose_bad_inputs(runs, tmp_path, capsys):
    t0 = runs / "task0" / "mesh"
    assert "class clash: class 0" in one_line_error(capsys, "compose", t0, t0, "--out", tmp_path / "a")
    assert "unknown expert" in one_line_error(capsys, "compose", t0, tmp_path / "nothing.json", "--out", tmp_path / "a")
    wide = Expert("wide", [5], {"type": "mlp", "hidden": [4]}, (1, 28, 28))
    wide.save(tmp_path / "wide")
    assert "incompatible input shapes" in one_line_error(
        capsys, "compose", t0, tmp_path / "wide.json", "--out", tmp_path / "a"
    )
    Expert("plain", [5], {"type": "mlp", "hidden": [4]}, (1, 8, 8)).save(tmp_path / "plain")
    assert "carries none" in one_line_error(
        capsys, "compose", t0, tmp_path / "plain.json", "--router", "density", "--out", tmp_path / "a"
    )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    assert "not empty" in one_line_error(capsys, "compose", t0, "--out", tmp_path / "full")
    assert not (tmp_path / "a").exists()


def test_run_from_a_composed_mesh_trains_only_new_tasks_and_keeps_old_experts(runs, tmp_path, capsys):
    assert cli(capsys, "compose", *(runs / f"task{t}" / "mesh" for t in range(3)), "--out", tmp_path / "c")[0] == 0
    before = ModuleMesh.load(tmp_path / "c")
    assert cli(capsys, *RUN, "--from", tmp_path / "c", "--out", tmp_path / "more")[0] == 0
    after = ModuleMesh.load(tmp_path / "more" / "mesh")
    metrics = json.loads((tmp_path / "more" / "metrics.json").read_text())
    assert len(after.experts) == 5 and metrics["num_tasks"] == 2 and after.covered_classes() == set(range(10))
    for old in before.experts:
        new = after.pool.get(old.name)
        assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))
    assert union_accuracy(after) > 80
    assert "already covers every class" in one_line_error(
        capsys, *RUN, "--from", tmp_path / "more" / "mesh", "--out", tmp_path / "x"
    )
    assert "the scenario has tasks 0..4" in one_line_error(capsys, *RUN, "--tasks", "7", "--out", tmp_path / "z")
    assert not (tmp_path / "z").exists()  # refused before writing anything
    (tmp_path / "c" / "router.json").write_text((tmp_path / "c" / "router.json").read_text().replace("1.0", "0.5"))
    assert "router.json" in one_line_error(capsys, *RUN, "--from", tmp_path / "c", "--out", tmp_path / "w")
    mnist_like = ModuleMesh(10, (1, 28, 28), DensityRouter())
    mnist_like.add_expert(Expert("m", [0], {"type": "mlp", "hidden": [4]}, (1, 28, 28)))
    mnist_like.save(tmp_path / "mnist_like")
    assert "continue it with data of the same kind" in one_line_error(
        capsys, *RUN, "--from", tmp_path / "mnist_like", "--out", tmp_path / "y"
    )


def test_forget_one_task_matches_retraining(runs, tmp_path, capsys):
    assert cli(capsys, "forget", runs / "sequential" / "mesh", "--classes", "2,3", "--out", tmp_path / "f")[0] == 0
    report = json.loads((tmp_path / "f" / "forget.json").read_text())
    ev = report["evaluation"]
    before, after, retrained = ev["before"], ev["after forgetting"], ev["retrained from scratch"]
    assert report["forgotten_classes"] == [2, 3] and report["removed_experts"] == ["expert1"]
    assert after["forget_accuracy"] <= retrained["forget_accuracy"] + 1 and before["forget_accuracy"] > 80
    assert abs(after["retain_accuracy"] - before["retain_accuracy"]) < 2
    assert abs(after["forget_mia_auc"] - retrained["forget_mia_auc"]) <= 0.02
    assert report["retrain_time_s"] > report["forget_time_s"]
    forgotten = ModuleMesh.load(tmp_path / "f")
    assert [e.name for e in forgotten.experts] == ["expert0", "expert2", "expert3", "expert4"]
    assert not (tmp_path / "f" / "experts" / "expert1.json").exists() and len(forgotten.router.densities) == 4


def test_forget_bad_inputs(runs, tmp_path, capsys):
    mesh = runs / "sequential" / "mesh"
    assert "unknown expert 'nobody'" in one_line_error(
        capsys, "forget", mesh, "--expert", "nobody", "--out", tmp_path / "a"
    )
    single = runs / "task0" / "mesh"
    assert "nothing would be left" in one_line_error(
        capsys, "forget", single, "--classes", "0", "--out", tmp_path / "a"
    )
    assert "not covered" in one_line_error(capsys, "forget", single, "--classes", "7", "--out", tmp_path / "a")
    # The plain split_digits.yaml trains DER with a top-k gate, not the mesh's experts: refused.
    assert "sections router, strategy differ" in one_line_error(
        capsys, "forget", mesh, "--expert", "expert4", "--config", CONFIG, "--out", tmp_path / "b"
    )
    assert cli(capsys, "forget", mesh, "--expert", "expert4", "--no-retrain", "--out", tmp_path / "b")[0] == 0
    assert "retrained from scratch" not in json.loads((tmp_path / "b" / "forget.json").read_text())["evaluation"]


def _copies_of_one_parent(tmp_path):
    """A parent expert for classes 2,3 and three copies fine-tuned on disjoint thirds of their data."""
    x, y = class_split("digits", None, [2, 3], "train")
    x, local = as_float(x), (y == 3).long()
    torch.manual_seed(0)
    parent = Expert("parent", [2, 3], {"type": "mlp", "hidden": [32]}, (1, 8, 8))
    opt = torch.optim.SGD(parent.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(parent(x), local).backward()
        opt.step()
    parent.save(tmp_path / "parent")
    paths = []
    for i in range(3):
        copy = parent.clone(f"copy{i}")
        opt = torch.optim.SGD(copy.parameters(), lr=0.1)
        for _ in range(30):
            opt.zero_grad()
            F.cross_entropy(copy(x[i::3]), local[i::3]).backward()
            opt.step()
        copy.save(tmp_path / f"copy{i}")
        paths.append(tmp_path / f"copy{i}.json")
    return paths


@pytest.mark.parametrize("method", ["mean", "fisher", "ties"])
def test_merge_copies_of_one_module(tmp_path, capsys, method):
    copies = _copies_of_one_parent(tmp_path)
    extra = ["--base", tmp_path / "parent.json"] if method == "ties" else []
    assert (
        cli(capsys, "merge", *copies, "--method", method, "--data", "digits", "--out", tmp_path / "m", *extra)[0] == 0
    )
    report = json.loads((tmp_path / "m" / "merge.json").read_text())
    inputs = [v for k, v in report["accuracy"].items() if k != "merged"]
    assert report["accuracy"]["merged"] >= min(inputs) - 3, report
    merged = Expert.load(tmp_path / "m" / "copy0_merged")
    assert merged.classes == [2, 3] and merged.metadata["merge_method"] == method


def test_merge_bad_inputs(runs, tmp_path, capsys):
    copies = _copies_of_one_parent(tmp_path)
    other = runs / "task3" / "mesh" / "experts" / "expert0.json"
    assert "different classes" in one_line_error(capsys, "merge", copies[0], other, "--out", tmp_path / "a")
    assert "at least two" in one_line_error(capsys, "merge", copies[0], "--out", tmp_path / "a")
    assert "needs data" in one_line_error(capsys, "merge", *copies, "--method", "fisher", "--out", tmp_path / "a")
    assert "common parent" in one_line_error(capsys, "merge", *copies, "--method", "ties", "--out", tmp_path / "a")
    assert "unknown expert" in one_line_error(
        capsys, "merge", copies[0], tmp_path / "none.json", "--out", tmp_path / "a"
    )


def test_merge_experts_from_density_routed_runs_keeps_their_class_densities(runs, tmp_path, capsys):
    # Records written by a density-routed run carry each density component's class ("labels"); the merged
    # record keeps both parents' components with their classes, and composes like any expert.
    parents = [
        runs / "task0" / "mesh" / "experts" / "expert0.json",
        runs / "sequential" / "mesh" / "experts" / "expert0.json",
    ]
    assert cli(capsys, "merge", *parents, "--out", tmp_path / "m")[0] == 0
    merged = Expert.load(tmp_path / "m" / "expert0_merged")
    states = [Expert.load(p.with_suffix("")).router_state[1] for p in parents]
    assert all("labels" in s for s in states)
    assert torch.equal(merged.router_state[1]["labels"], torch.cat([s["labels"] for s in states]))
    assert torch.equal(merged.router_state[1]["counts"], torch.cat([s["counts"] for s in states]))
    others = [runs / f"task{t}" / "mesh" for t in range(1, 5)]
    assert cli(capsys, "compose", tmp_path / "m" / "expert0_merged.json", *others, "--out", tmp_path / "c")[0] == 0
    assert union_accuracy(ModuleMesh.load(tmp_path / "c")) > 80
