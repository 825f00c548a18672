"""The one evaluation loop: top-1 accuracy in percent, as every metric of the project reports it.

``count_correct`` walks a tensor data set in batches and counts correct top-1 predictions of any
scoring function; ``accuracy`` wraps it for a plain model (percent), ``evaluate_task`` for one task
of a continual scenario (percent, plus the routing weights the routing statistics need).
Upgrade and m2mKD files store accuracies as fractions (their file format, kept): ``accuracy_fraction``
divides the correct count by the number of examples instead of rescaling a percentage, so their
numbers stay bit-identical.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..data.scenarios import Scenario, Task, as_float
from ..errors import DataError


@torch.no_grad()
def count_correct(
    scores_of: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 2048,
    device: Optional[torch.device] = None,
) -> int:
    """Number of rows whose argmax of ``scores_of(batch)`` equals the label (inputs as floats on ``device``)."""
    correct = 0
    for begin in range(0, int(x.shape[0]), batch_size):
        xb, yb = x[begin : begin + batch_size], y[begin : begin + batch_size]
        if device is not None:
            xb, yb = xb.to(device), yb.to(device)
        correct += int((scores_of(as_float(xb)).argmax(-1) == yb).sum())
    return correct


@torch.no_grad()
def correct_predictions(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048, device: Optional[torch.device] = None
) -> int:
    """Correct top-1 predictions of ``model`` (evaluated in eval mode, its mode restored) on (x, y)."""
    if x.shape[0] == 0:
        raise DataError("cannot evaluate on an empty set")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return count_correct(model, x, y, batch_size, device)
    finally:
        model.train(was_training)


def accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048, device: Optional[torch.device] = None
) -> float:
    """Top-1 accuracy (%) of ``model`` on uint8 or float inputs (x, y)."""
    return 100.0 * correct_predictions(model, x, y, batch_size, device) / x.shape[0]


def accuracy_fraction(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048, device: Optional[torch.device] = None
) -> float:
    """Top-1 accuracy as a fraction in [0, 1]: only for the upgrade and m2mKD files, which store fractions."""
    return correct_predictions(model, x, y, batch_size, device) / x.shape[0]


@torch.no_grad()
def evaluate_task(
    mesh,
    task: Task,
    scenario: Scenario,
    device: torch.device,
    batch_size: int = 1024,
    split: str = "test",
    strategy=None,
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Accuracy (%) of a mesh on one task, plus the routing weights (N,E) and targets for routing statistics.

    A ``strategy`` whose ``predict_log_probs`` returns scores (iCaRL's nearest-mean classifier)
    decides the predictions; the mesh still supplies the routing weights.

    Task-incremental evaluation gives the mesh the task id and restricts predictions to the task's
    classes; class- and domain-incremental evaluation gives neither.
    """
    mesh.eval()
    x, y = (task.x_test, task.y_test) if split == "test" else (task.x_val, task.y_val)
    weights: list[torch.Tensor] = []
    mask = None
    if scenario.task_ids_at_test:
        mask = torch.full((scenario.num_classes,), float("-inf"), device=device)
        mask[task.classes] = 0.0

    def scores_of(xb: torch.Tensor) -> torch.Tensor:
        tb = torch.full((xb.shape[0],), task.id, dtype=torch.long, device=device) if scenario.task_ids_at_test else None
        out = mesh(xb, tb)
        custom = strategy.predict_log_probs(mesh, xb, tb) if strategy is not None else None
        scores = out.log_probs if custom is None else custom
        weights.append(out.weights.float().cpu())
        return scores if mask is None else scores + mask

    correct = count_correct(scores_of, x, y, batch_size, device)
    return 100.0 * correct / max(int(y.shape[0]), 1), torch.cat(weights), y.cpu()


__all__ = ["count_correct", "correct_predictions", "accuracy", "accuracy_fraction", "evaluate_task"]
