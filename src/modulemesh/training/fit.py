"""The one step-budget training loop: ``fit`` trains for a fixed number of minibatch steps.

The continual ``Trainer`` (``loop.py``) walks a scenario task by task through strategy hooks; every
other trainer in the project (upgrades, m2mKD stages, federated local updates) trains a set of
parameters for N steps on in-memory tensors, and is a call of the pieces here:

* ``TensorBatches``: N minibatches drawn from seeded epochs of random permutations; the order
  depends on the seed only, so runs that differ in their initialization see the same batches.
* ``train_step``: one forward/backward/update with a finiteness check (the single step).
* ``fit``: ``train_step`` N times, with an optional schedule, gradient clipping, a FLOP count of
  the first step and a per-step callback that may stop training early.
* ``sgd_update`` / ``fit_stacked``: the same step written functionally for parameters stacked on a
  leading client axis and trained together under ``torch.func.vmap`` (many clients at once), with
  a per-client step budget, an optional update mask and an optional squared-gradient accumulator.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..data.scenarios import as_float
from ..errors import DataError, ModuleMeshError, TrainingError
from .optim import OptimizerSpec, build

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs (float), labels, row indices into the data
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (xb, yb, idx) -> scalar loss
StepCallback = Callable[[int, torch.Tensor], Optional[bool]]  # (step from 1, loss) -> True stops training


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices for ``steps`` minibatches (epochs of random permutations), shape (steps, batch)."""
    g = torch.Generator().manual_seed(int(seed))
    need = steps * batch_size
    epochs = -(-need // n)  # ceil
    order = (
        torch.cat([torch.randperm(n, generator=g) for _ in range(epochs)])
        if epochs
        else torch.zeros(0, dtype=torch.long)
    )
    return order[:need].view(steps, batch_size)


class TensorBatches:
    """``steps`` minibatches of ``(x, y)``, indexable by step (0-based): ``(as_float(x[idx]), y[idx], idx)``.

    Batches hold ``min(batch_size, len(x))`` rows; ``device`` moves each batch there (None: leave
    the tensors where they are).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        steps: int,
        batch_size: int,
        seed: int,
        device: Optional[torch.device | str] = None,
    ):
        n = int(x.shape[0])
        if n == 0 or y.shape[0] != n:
            raise DataError(
                f"training data must be non-empty with one label per input (got {n} inputs, {y.shape[0]} labels)"
            )
        if steps < 0 or batch_size < 1:
            raise ModuleMeshError(f"steps must be >= 0 and batch_size >= 1 (got {steps}, {batch_size})")
        self.x, self.y, self.device = x, y, device
        self.order = batch_order(n, steps, min(batch_size, n), seed)

    def __len__(self) -> int:
        return int(self.order.shape[0])

    def __getitem__(self, step: int) -> Batch:
        idx = self.order[step]
        xb, yb = self.x[idx], self.y[idx]
        if self.device is not None:
            xb, yb = xb.to(self.device), yb.to(self.device)
        return as_float(xb), yb, idx


@dataclass
class FitResult:
    steps: int  # steps taken (fewer than asked when a callback stopped training)
    seconds: float = 0.0  # wall time of the training steps (not the FLOP count)
    flops_per_step: float = 0.0  # forward + backward of the first batch, when counted
    train_flops: float = 0.0
    final_loss: Optional[float] = None  # mean loss over the last tenth of the steps
    stopped_early: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def train_step(
    loss_fn: LossFn,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    params: Sequence[nn.Parameter] = (),
    grad_clip: float = 0.0,
    scheduler=None,
    step: int = 0,
    lr_hint: str = "the learning rate",
) -> torch.Tensor:
    """One update: loss, zero_grad, backward, optional clipping of ``params``' gradient norm, step."""
    loss = loss_fn(*batch)
    if not torch.isfinite(loss):
        raise TrainingError(
            f"loss became {float(loss.detach())} at step {step}; lower {lr_hint} or check the data for NaN/inf"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss


def fit(
    params: Union[nn.Module, Sequence[nn.Parameter]],
    loss_fn: LossFn,
    batches: Union[TensorBatches, Sequence[Batch], tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    optimizer: Union[OptimizerSpec, torch.optim.Optimizer],
    scheduler=None,
    batch_size: int = 128,
    seed: int = 0,
    device: Optional[torch.device | str] = None,
    modules: Sequence[nn.Module] = (),
    count_flops: bool = False,
    on_step: Optional[StepCallback] = None,
    lr_hint: str = "the learning rate",
    what: str = "the model",
) -> FitResult:
    """Train ``params`` (a module's trainable parameters, or a list) for ``steps`` minibatch steps.

    ``batches``: a ``TensorBatches`` (or any sequence of ``(xb, yb, idx)``), or ``(x, y)``, which
    becomes ``TensorBatches(x, y, steps, batch_size, seed, device)``. ``optimizer``: an
    ``OptimizerSpec`` (the optimizer, schedule and clipping are built from it) or a ready optimizer
    (with ``scheduler``). ``modules`` are put in train mode for the steps and in eval mode after.
    ``count_flops`` runs the first batch once under ``FlopCounterMode`` (forward + backward, its
    gradients discarded). ``on_step(step, loss)`` runs after every step; returning True stops.
    """
    params = list(params.parameters()) if isinstance(params, nn.Module) else list(params)
    params = [p for p in params if p.requires_grad]
    result = FitResult(steps=steps)
    if steps == 0:
        return result
    if isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], torch.Tensor):
        batches = TensorBatches(batches[0], batches[1], steps, batch_size, seed, device)
    if len(batches) < steps:
        raise ModuleMeshError(f"fit asked for {steps} steps but the batch source has {len(batches)}")
    for m in modules:
        m.train()
    grad_clip = 0.0
    if isinstance(optimizer, OptimizerSpec):
        grad_clip = optimizer.grad_clip
        optimizer, scheduler = build(params, optimizer, steps, what)
    elif not params:
        raise TrainingError(f"nothing to train: every parameter of {what} is frozen")
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            loss_fn(*batches[0]).backward()
        optimizer.zero_grad(set_to_none=True)
        result.flops_per_step = float(fc.get_total_flops())
    tail: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        loss = train_step(loss_fn, batches[step], optimizer, params, grad_clip, scheduler, step + 1, lr_hint)
        if step >= steps - max(1, steps // 10):
            tail.append(float(loss.detach()))
        if on_step is not None and on_step(step + 1, loss):
            result.steps, result.stopped_early = step + 1, step + 1 < steps
            break
    for m in modules:
        m.eval()
    result.seconds = round(time.perf_counter() - start, 3)
    result.train_flops = result.flops_per_step * result.steps
    result.final_loss = sum(tail) / len(tail) if tail else float(loss.detach())
    return result


# ----------------------------------------------------------------------------- many clients at once (vmap)


Params = dict[str, torch.Tensor]


def sgd_update(
    params: Params,
    grads: Mapping[str, torch.Tensor],
    lr: float,
    weight: torch.Tensor,
    *,
    momentum: float = 0.0,
    buffers: Optional[Params] = None,
    sq_grads: Optional[Params] = None,
    steps: Optional[torch.Tensor] = None,
) -> None:
    """One functional SGD step, in place, on parameters stacked along leading axes.

    ``weight`` (leading axes of the parameters, e.g. (clients,) or (clients, modules)) scales each
    member's update: 0 leaves a member untouched (a client past its step budget, a frozen module).
    ``sq_grads`` accumulates ``weight * g^2 / steps`` per member (a diagonal empirical Fisher
    averaged over each client's ``steps``); ``buffers`` hold heavy-ball momentum. Without momentum, fresh
    contiguous gradients are scaled in place (``grads`` is consumed).
    """
    for n, g in grads.items():
        a = weight.view(*weight.shape, *([1] * (g.dim() - weight.dim())))
        if sq_grads is not None:
            sq_grads[n] += a * g * g / steps.clamp_min(1).view(-1, *([1] * (g.dim() - 1)))
        if buffers is not None:
            buffers[n].mul_(momentum).add_(g)
            g = buffers[n]
        elif g._base is None and g.is_contiguous():
            # a fresh gradient: scale it in place (same numbers as ``lr * a * g``); at 1,000 stacked clients the
            # temporary would be a new 600 MB buffer, page-faulted in on every step
            params[n] -= g.mul_(lr * a)
            continue
        params[n] -= lr * a * g


def fit_stacked(
    params: Params,
    loss_fn: Callable,
    batch_fn: Callable[[int], tuple],
    steps: torch.Tensor,
    lr: float,
    *,
    momentum: float = 0.0,
    sq_grads: Optional[Params] = None,
    mask: Optional[torch.Tensor] = None,
    what: str = "local training",
) -> tuple[Params, float]:
    """vmapped SGD over stacked parameters: ``loss_fn(p_k, *batch_k)`` per client k, which stops after ``steps[k]``
    steps.

    ``batch_fn(t)`` returns step t's arguments, each with a leading client axis. ``mask`` (clients,
    ...) multiplies each client's update (e.g. which of its modules train). Returns new parameters
    (the input is not modified) and the last step's mean loss over active clients.
    """
    from torch.func import grad_and_value, vmap

    total = int(steps.max()) if len(steps) else 0
    g_fn = vmap(grad_and_value(loss_fn))
    params = {n: v.clone() for n, v in params.items()}
    first = next(iter(params.values()))
    steps = steps.to(first.device)
    buffers = {n: torch.zeros_like(v) for n, v in params.items()} if momentum else None
    last = float("nan")
    for t in range(total):
        active = (steps > t).to(first.dtype)
        grads, loss = g_fn(params, *batch_fn(t))
        if not torch.isfinite(loss).all():
            raise TrainingError(f"{what} diverged (loss {loss.tolist()[:4]}...) at step {t}; lower lr")
        last = float((loss * active).sum() / active.sum().clamp_min(1))
        weight = active if mask is None else active.view(-1, *([1] * (mask.dim() - 1))) * mask
        sgd_update(params, grads, lr, weight, momentum=momentum, buffers=buffers, sq_grads=sq_grads, steps=steps)
    return params, last


__all__ = [
    "Batch",
    "LossFn",
    "TensorBatches",
    "FitResult",
    "batch_order",
    "train_step",
    "fit",
    "sgd_update",
    "fit_stacked",
    "Params",
]
