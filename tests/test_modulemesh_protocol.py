"""The continual protocol's decisions (policy: auto) on domain-incremental digits."""

import json

import pytest

from modulemesh.cli import main

BASE = [
    "run",
    "--quiet",
    "--set",
    "data.name=digits",
    "--set",
    "train.batch_size=16",
    "--set",
    "train.epochs=3",
    "--set",
    "scenario.kind=domain_incremental",
    "--set",
    "scenario.n_tasks=3",
    "--set",
    "strategy.policy=auto",
    "--set",
    "router.components=4",
    "--set",
    "expert.backbone={type: mlp, hidden: [64]}",
]


def run(tmp_path, name, *extra):
    out = tmp_path / name
    assert main([*BASE, *extra, "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_unrelated_domains_get_new_experts(tmp_path):
    m = run(tmp_path, "perm", "--set", "scenario.transform=permutation")
    actions = [t["report"]["action"] for t in m["per_task"]]
    assert actions == ["add", "add", "add"] and len(m["experts"]) == 3
    # The decision is backed by the candidates' held-out accuracy, which is low on a new permutation.
    assert all(a < 60 for a in m["per_task"][1]["report"]["candidate_accuracy"].values())


def test_reuse_trains_nothing_and_extends_the_density(tmp_path):
    m = run(tmp_path, "reuse", "--set", "scenario.transform=rotation", "--set", "strategy.reuse_accuracy=0")
    assert [t["report"]["action"] for t in m["per_task"]] == ["add", "reuse", "reuse"]
    # No parameter changes; the density router fits the new domains' components (counted as trained).
    assert m["experts"] == ["expert0"] and m["parameters_changed_per_task"][1:] == [0, 0]
    assert all(n > 0 for n in m["router_state_fit_per_task"])
    assert m["params_trained_per_task"][1:] == m["router_state_fit_per_task"][1:]
    # The reused expert still serves every domain: no forgetting is possible without training.
    assert m["forgetting"] == pytest.approx(0.0, abs=1e-9)


def test_update_trains_the_old_expert_with_distillation(tmp_path):
    m = run(
        tmp_path,
        "update",
        "--set",
        "scenario.transform=rotation",
        "--set",
        "strategy.reuse_accuracy=100",
        "--set",
        "strategy.update_accuracy=0",
        "--set",
        "router.type=topk",
    )
    assert [t["report"]["action"] for t in m["per_task"]] == ["add", "update", "update"]
    assert m["experts"] == ["expert0"] and all(p > 0 for p in m["params_trained_per_task"])
    manifest = json.loads((tmp_path / "update" / "mesh" / "experts" / "expert0.json").read_text())
    assert manifest["version"] == 3  # bumped by each update


def test_new_expert_can_start_from_the_most_similar_one(tmp_path):
    m = run(
        tmp_path,
        "init",
        "--set",
        "scenario.transform=rotation",
        "--set",
        "strategy.reuse_accuracy=100",
        "--set",
        "strategy.update_accuracy=100",
    )
    assert [t["report"]["action"] for t in m["per_task"]] == ["add", "add", "add"]
    manifest = json.loads((tmp_path / "init" / "mesh" / "experts" / "expert1.json").read_text())
    assert manifest["metadata"]["initialized_from"] in ("expert0",)
