"""Class-IL accuracy = task prediction x within-task prediction, on a hand-built toy; reference arms."""

import json

import pytest
import torch

from helpers import DIGITS_MESH_RUN, run_digits_mesh
from modulemesh.cli import main
from modulemesh.data.scenarios import Scenario, Task
from modulemesh.decomposition import routing_decomposition
from modulemesh.mesh import Expert, ModuleMesh, Router


class SignRouter(Router):
    """Hard routing by the sign of feature 0: x0 < 0 -> expert 0, else expert 1."""

    def forward(self, x, expert_logits=None, task_ids=None):
        second = (x.flatten(1)[:, 0] >= 0).long()
        return torch.nn.functional.one_hot(second, self.num_experts).float(), None


def _linear_expert(name, classes, sign):
    """Predicts its first class when feature 1 * sign > 0, else its second."""
    e = Expert(name, classes, {"type": "mlp", "hidden": []}, (2,))
    with torch.no_grad():
        e.net[-1].weight.copy_(torch.tensor([[0.0, sign], [0.0, -sign]]))
        e.net[-1].bias.zero_()
    return e


def test_decomposition_on_a_hand_built_toy():
    # Task 0 = classes {0, 1} (should go to expert 0), task 1 = classes {2, 3} (expert 1).
    # Expert 0 predicts class 0 iff x1 > 0; expert 1 predicts class 2 iff x1 < 0 (sign -1).
    x0 = torch.tensor([[-1.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])  # routed 0, 0, 1 (wrong), 0
    y0 = torch.tensor([0, 1, 0, 1])  # expert 0 right, right, right, wrong
    x1 = torch.tensor([[1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]])  # routed 1, 1, 0 (wrong)
    y1 = torch.tensor([2, 3, 2])  # expert 1 right, right, right
    empty = torch.empty(0, 2)
    tasks = [Task(0, [0, 1], x0, y0, empty, y0[:0], x0, y0), Task(1, [2, 3], x1, y1, empty, y1[:0], x1, y1)]
    scenario = Scenario("class_incremental", tasks, 4, (2,))
    mesh = ModuleMesh(4, (2,), SignRouter())
    mesh.add_expert(_linear_expert("a", [0, 1], 1.0))
    mesh.add_expert(_linear_expert("b", [2, 3], -1.0))
    weights = [mesh.eval()(t.x_test).weights for t in tasks]
    d = routing_decomposition(mesh, scenario, weights, [{}, {}], "cpu")
    assert d["task_id_accuracy_per_task"] == pytest.approx([75.0, 200 / 3])
    assert d["within_expert_accuracy_per_task"] == pytest.approx([75.0, 100.0])
    assert d["task_id_accuracy"] == pytest.approx((75.0 + 200 / 3) / 2)
    # With hard routing an input is right iff it is routed right and its expert is right.
    acc = [100.0 * float((mesh.predict(t.x_test) == t.y_test).float().mean()) for t in tasks]
    assert acc == pytest.approx([50.0, 200 / 3])


_run = run_digits_mesh


def test_every_run_reports_the_decomposition_and_the_reference_arms_run(tmp_path):
    mm = _run(tmp_path, "mm", "--set", "strategy.name=modulemesh")
    ro = _run(tmp_path, "ro", "--set", "strategy.name=router-only")
    ncm = _run(tmp_path, "ncm", "--set", "strategy.name=ncm")
    t = mm["num_tasks"]
    assert len(mm["task_id_accuracy_per_task"]) == t and len(mm["within_expert_accuracy_per_task"]) == t
    # Experts alone on their own tasks' data are far better than chance (50% on two-class tasks).
    assert mm["within_expert_accuracy"] > 85
    # Hard-ish density routing: average accuracy cannot exceed what routing and experts allow.
    assert mm["average_accuracy"] <= min(mm["task_id_accuracy"], mm["within_expert_accuracy"]) + 1.0
    # The router is the same in both arms, so router-only predicts the task as often as the mesh routes right.
    assert abs(ro["task_id_accuracy"] - mm["task_id_accuracy"]) < 3.0
    # router-only trains no parameter; what it fits per task is the router's densities.
    assert ro["within_expert_accuracy"] is None and ro["parameters_changed_per_task"] == [0] * t
    assert all(n > 0 for n in ro["router_state_fit_per_task"])
    assert ro["average_accuracy"] > 70 and ncm["average_accuracy"] > 60
    # Bytes: the density router keeps state and no replay buffer; ncm keeps only class means (+ placeholders).
    assert mm["router_state_bytes"] > 0 and mm["strategy_state_bytes"] == 0
    assert ncm["strategy_state_bytes"] == 10 * 64 * 4 + 10 * 4


def test_router_only_brings_its_own_density_router_under_a_learned_gate_config(tmp_path):
    out = tmp_path / "x"
    assert (
        main([*DIGITS_MESH_RUN, "--set", "strategy.name=router-only", "--set", "router.type=topk", "--out", str(out)])
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "mesh" / "mesh.json").read_text())["router"]["type"] == "density"
    assert m["average_accuracy"] > 70 and m["router_state_bytes"] > 0
