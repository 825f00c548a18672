"""Class-IL accuracy as task prediction x within-task prediction, and what a run costs in bytes.

- ``task_id_accuracy`` (per task j): share of task j's test inputs whose highest-weight expert is the
  expert that owns task j (the one the strategy trained or reused for it; without a record, the first
  expert covering the task's classes). In class-IL that is exactly "the top expert covers the input's
  true class"; in domain-IL, where every expert covers every class, it asks for the task's own expert.
- ``within_expert_accuracy`` (per task j): task j's owner expert alone on task j's test data, predicting
  among its own classes: what the mesh would score with a perfect router.

With hard (top-1) routing an input is classified right only if both are right, so average accuracy is at
most their product's worth; a soft mixture can do better than the router when experts disagree usefully.
Both are reported per task and as the mean over tasks (like average accuracy). Arms that predict without
experts (``router-only``, ``ncm``) report no within-expert accuracy.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .data.scenarios import Scenario, as_float


def owner_experts(mesh, scenario: Scenario, per_task: Sequence[dict[str, Any]]) -> list[int]:
    """Index of the expert that owns each task (-1 when no expert covers its classes)."""
    names = mesh.pool.names
    owners = []
    for task, info in zip(scenario.tasks, per_task):
        recorded = (info.get("report") or {}).get("expert")
        if recorded in names:
            owners.append(names.index(recorded))
            continue
        covering = [i for i, e in enumerate(mesh.experts) if set(task.classes) <= set(e.classes)]
        owners.append(covering[0] if covering else -1)
    return owners


@torch.no_grad()
def within_expert_accuracy(expert, x: torch.Tensor, y: torch.Tensor, device, batch_size: int = 1024) -> float:
    """Accuracy (%) of ``expert`` alone on (x, y), predicting among its own classes."""
    expert.eval()
    correct = 0
    for b in range(0, int(y.shape[0]), batch_size):
        xb = as_float(x[b : b + batch_size].to(device))
        pred = expert.class_index[expert(xb).argmax(1)]
        correct += int((pred.cpu() == y[b : b + batch_size]).sum())
    return 100.0 * correct / max(int(y.shape[0]), 1)


@torch.no_grad()
def predicted_task_accuracy(strategy, mesh, task, device, batch_size: int = 1024) -> float:
    """Share (%) of the task's test inputs whose predicted class is one of the task's classes."""
    own = torch.zeros(mesh.num_classes, dtype=torch.bool)
    own[task.classes] = True
    hits = 0
    for b in range(0, int(task.y_test.shape[0]), batch_size):
        xb = as_float(task.x_test[b : b + batch_size].to(device))
        hits += int(own[strategy.predict_log_probs(mesh, xb, None).argmax(1).cpu()].sum())
    return 100.0 * hits / max(int(task.y_test.shape[0]), 1)


def routing_decomposition(
    mesh,
    scenario: Scenario,
    weights: Sequence[torch.Tensor],
    per_task: Sequence[dict[str, Any]],
    device,
    batch_size: int = 1024,
    strategy=None,
) -> dict[str, Any]:
    """Task-id and within-expert accuracy, mean and per task. ``weights[j]`` are the routing weights
    (N_j, E) of task j's test inputs, as ``evaluate`` returns them. A strategy that predicts without
    experts (``predicts_with_experts = False``) gets the task of its predicted class instead."""
    with_experts = getattr(strategy, "predicts_with_experts", True)
    owners = owner_experts(mesh, scenario, per_task)
    if with_experts:
        task_id = [
            100.0 * float((w.argmax(1) == o).float().mean()) if o >= 0 and w.numel() else 0.0
            for w, o in zip(weights, owners)
        ]
    else:
        task_id = [predicted_task_accuracy(strategy, mesh, t, device, batch_size) for t in scenario.tasks]
    within: Optional[list[float]] = None
    if with_experts:
        within = [
            within_expert_accuracy(mesh.experts[o], t.x_test, t.y_test, device, batch_size) if o >= 0 else 0.0
            for t, o in zip(scenario.tasks, owners)
        ]
    return {
        "task_id_accuracy": sum(task_id) / len(task_id),
        "task_id_accuracy_per_task": task_id,
        "within_expert_accuracy": None if within is None else sum(within) / len(within),
        "within_expert_accuracy_per_task": within,
    }


def total_bytes(mesh, strategy) -> dict[str, int]:
    """Bytes a run keeps: mesh parameters and buffers, router state (e.g. densities), strategy state
    (replay buffers, stored logits, exemplars, class means)."""
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))  # noqa: E731
    # A one-expert mesh (every baseline) never runs its router, so an unused gate is not counted.
    # Each expert as it is stored: a compressed one (expert.storage fp16/int8) in its packed form.
    experts = sum(size(e.stored_state().values()) for e in mesh.pool)
    params = experts + (size(mesh.router.parameters()) if len(mesh.pool) > 1 else 0)
    router = size(mesh.router.export_state().values()) - size(
        mesh.router.parameters()
    )  # learned gate weights are params
    state = strategy.state_dict() if strategy is not None else {}
    kept = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor) and t.numel() > 1)
    return {
        "parameter_bytes": params,
        "router_state_bytes": max(router, 0),
        "strategy_state_bytes": kept,
        "total_bytes": params + max(router, 0) + kept,
    }
