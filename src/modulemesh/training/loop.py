"""The one training loop. Strategies change what it does through hooks, never by copying it.

Per task:  before_task -> [before_epoch -> [before_batch -> forward -> loss -> before_backward
           -> backward -> after_backward -> step -> after_batch]* -> after_epoch]* -> after_task

Data of a task is moved to the device once and minibatches are sliced from it by a seeded random
permutation, so the loop costs what a bare PyTorch loop over in-memory tensors costs.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..costs import measure
from ..data.augment import BatchAugment
from ..data.scenarios import Scenario, Task, as_float
from ..errors import TrainingError
from ..mesh.mesh import MeshOutput, ModuleMesh
from . import fastpath
from .optim import make_optimizer


@dataclass
class Context:
    """Everything a hook may read or change; one object per task, reused across batches."""

    mesh: ModuleMesh
    scenario: Scenario
    task: Task
    device: torch.device
    generator: torch.Generator
    batch_size: int
    optimizer: Optional[torch.optim.Optimizer] = None
    epoch: int = 0
    step: int = 0
    x: Optional[torch.Tensor] = None  # current batch (float, on device); hooks may append replay rows
    y: Optional[torch.Tensor] = None
    t: Optional[torch.Tensor] = None  # task id of each row
    n_current: int = 0  # rows of x that come from the current task (the rest is replay)
    out: Optional[MeshOutput] = None
    loss: Optional[torch.Tensor] = None
    state: dict[str, Any] = field(default_factory=dict)  # scratch space for strategies
    augment: Optional[Callable] = None  # train-time batch augmentation (train.augment), None when off


@dataclass
class TaskStats:
    """Costs of one task: the training loop plus the strategy's own work before and after it
    (density fits, Fisher passes, herding, candidate scoring): all of it is in the totals."""

    steps: int = 0
    samples: int = 0  # rows processed (current + replay), over all epochs
    flops: int = 0  # training loop + strategy work outside it
    flops_per_sample: float = 0.0  # of one training step
    train_flops: int = 0
    strategy_flops: int = 0  # before_task / after_task work, decompositions counted analytically
    wall_time_s: float = 0.0  # training loop + strategy work outside it
    train_time_s: float = 0.0
    strategy_time_s: float = 0.0
    params_trained: int = 0  # parameters that changed
    router_state_changed: int = 0  # non-parameter router state written (e.g. density fit)
    final_loss: float = float("nan")
    report: dict = field(default_factory=dict)  # what the strategy decided for this task


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Minibatch [begin, end) ranges over n rows. A trailing batch smaller than half a batch is
    folded into the one before it: with plain SGD a last step on a handful of rows (one row at
    batch 10 in joint Split-MNIST) can undo much of an epoch, measured at 95% -> 72% accuracy."""
    bounds = [(b, min(b + batch_size, n)) for b in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < batch_size / 2:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def router_state(mesh: ModuleMesh) -> dict[str, torch.Tensor]:
    """The router's non-parameter state (density fits, statistics); parameters are counted apart."""
    params = {name for name, _ in mesh.router.named_parameters()}
    return {k: v.detach().clone() for k, v in mesh.router.export_state().items() if k not in params}


def changed_elements(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> int:
    """Elements of ``after`` that are new or differ from ``before`` (a re-shaped tensor counts whole)."""
    n = 0
    for k, v in after.items():
        old = before.get(k)
        n += v.numel() if old is None or old.shape != v.shape else int((old.cpu() != v.cpu()).sum())
    return n


class Trainer:
    def __init__(
        self,
        mesh: ModuleMesh,
        strategy,
        train_cfg,
        device: torch.device,
        seed: int = 0,
        on_step: Optional[Callable[[int, int], None]] = None,
        on_start: Optional[Callable[[int], None]] = None,
        on_loss: Optional[Callable[[int, float], None]] = None,
        log_every: int = 10,
    ):
        self.mesh, self.strategy, self.cfg, self.device = mesh, strategy, train_cfg, device
        self.generator = torch.Generator().manual_seed(seed)
        self.on_step = on_step  # progress callback(step, total_steps)
        self.on_start = on_start  # progress callback(total_steps) when a task starts
        # on_loss(step, loss) every log_every steps: reading the loss syncs the device, so not every step.
        self.on_loss, self.log_every = on_loss, log_every

    def steps_per_task(self, n_train: int) -> int:
        return self.cfg.epochs * len(batch_bounds(n_train, self.cfg.batch_size))

    def train_task(self, task: Task, scenario: Scenario) -> TaskStats:
        s, mesh, count = self.strategy, self.mesh, self.cfg.count_flops
        ctx = Context(mesh, scenario, task, self.device, self.generator, self.cfg.batch_size)
        router_before = router_state(mesh)
        with measure(self.device, count) as setup:
            s.before_task(ctx)
            x_all, y_all, t_all = s.train_data(ctx)
        c = self.cfg
        if fastpath.keep_on_device(self.device, (x_all, y_all, t_all), getattr(c, "data_placement", "auto")):
            x_all, y_all, t_all = x_all.to(self.device), y_all.to(self.device), t_all.to(self.device)
        else:  # streamed: each minibatch is copied from pinned host memory
            x_all, y_all, t_all = fastpath.pin(x_all), fastpath.pin(y_all), fastpath.pin(t_all)
        n = int(y_all.shape[0])
        if n == 0:
            raise TrainingError(f"task {task.id} has no training examples")
        stats = TaskStats()
        params: list[torch.nn.Parameter] = []
        before: dict[int, torch.Tensor] = {}
        if not s.skip_training(ctx):
            params = [p for p in s.trainable_parameters(ctx) if p.requires_grad]
            before = {id(p): p.detach().clone() for p in params}
            ctx.optimizer = make_optimizer(
                params, c.optimizer, c.lr, c.momentum, c.weight_decay, what="the mesh for this task"
            )
            fastpath.prepare_experts(
                [e for e in mesh.experts if any(p.requires_grad for p in e.parameters())],
                getattr(c, "channels_last", False),
                getattr(c, "compile", "off"),
            )
            self._train_epochs(ctx, x_all, y_all, t_all, stats)
            stats.final_loss = float(ctx.loss.detach()) if ctx.loss is not None else float("nan")
        stats.report = dict(ctx.state.get("report", {}))
        with measure(self.device, count) as finish:
            s.after_task(ctx)
        mesh.eval()
        stats.strategy_time_s = setup.wall_time_s + finish.wall_time_s
        stats.strategy_flops = setup.flops + finish.flops
        stats.wall_time_s = stats.train_time_s + stats.strategy_time_s
        stats.flops = stats.train_flops + stats.strategy_flops
        # Count what actually changed, not what was merely handed to the optimizer.
        stats.params_trained = int(sum((p.detach() != before[id(p)]).sum() for p in params))
        stats.router_state_changed = changed_elements(router_before, router_state(mesh))
        return stats

    def _train_epochs(self, ctx: Context, x_all, y_all, t_all, stats: TaskStats) -> None:
        s, n, c = self.strategy, int(y_all.shape[0]), self.cfg
        total = self.steps_per_task(n)
        augment = BatchAugment(c.augment.crop_padding, c.augment.flip) if hasattr(c, "augment") else None
        amp = getattr(c, "amp", "off")
        self._scaler = fastpath.grad_scaler(self.device, amp)
        self._autocast = lambda: fastpath.autocast(self.device, amp)
        every = self._every = fastpath.check_every(self.device, getattr(c, "check_finite_every", None))
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        streamed = x_all.device != self.device
        if self.on_start:
            self.on_start(total)
        ctx.mesh.train()
        start = time.perf_counter()
        for epoch in range(self.cfg.epochs):
            ctx.epoch = epoch
            s.before_epoch(ctx)
            order = torch.randperm(n, generator=self.generator).to(x_all.device)
            for begin, end in batch_bounds(n, self.cfg.batch_size):
                idx = order[begin:end]
                xb, yb, tb = x_all[idx], y_all[idx], t_all[idx]
                if streamed:
                    xb, yb, tb = (v.to(self.device, non_blocking=True) for v in (xb, yb, tb))
                ctx.x, ctx.y, ctx.t = as_float(xb), yb, tb
                ctx.n_current = int(idx.shape[0])
                ctx.augment = augment if augment is not None and augment.active else None
                count = self.cfg.count_flops and stats.steps == 0
                with FlopCounterMode(display=False) if count else nullcontext() as fc:
                    self._step(ctx)
                if count:
                    stats.flops_per_sample = fc.get_total_flops() / ctx.x.shape[0]
                stats.steps += 1
                stats.samples += int(ctx.x.shape[0])
                ctx.step += 1
                if self.on_step:
                    self.on_step(stats.steps, total)
                if every > 1 and (stats.steps % every == 0 or stats.steps == total):
                    self._raise_if_nonfinite(ctx, every)
                log_every = self.log_every if self.device.type == "cpu" else max(self.log_every, every)
                if self.on_loss and (stats.steps % log_every == 0 or stats.steps == total):
                    self.on_loss(stats.steps, float(ctx.loss.detach()))
            s.after_epoch(ctx)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        stats.train_time_s = time.perf_counter() - start
        stats.train_flops = int(round(stats.flops_per_sample * stats.samples))

    def _raise_if_nonfinite(self, ctx: Context, every: int) -> None:
        if bool(self._nonfinite):  # the one host read of the flag, every `every` steps
            where = f"step {ctx.step}" if every == 1 else f"one of steps {max(ctx.step - every + 1, 0)}-{ctx.step}"
            raise TrainingError(
                f"loss became NaN or inf at task {ctx.task.id}, epoch {ctx.epoch}, {where}; "
                "lower train.lr or check the data for NaN/inf values"
            )

    def _step(self, ctx: Context) -> None:
        s = self.strategy
        s.before_batch(ctx)
        if ctx.augment is not None:  # after before_batch, so replayed rows are augmented too
            ctx.x = ctx.augment(ctx.x, self.generator)
        with self._autocast():
            ctx.out = ctx.mesh(ctx.x, ctx.t)
            ctx.loss = s.loss(ctx)
        # Flag a NaN/inf loss on the device; the flag is read back every `check_finite_every` steps.
        self._nonfinite |= ~torch.isfinite(ctx.loss.detach())
        if self._every == 1:  # reading is free here: stop before the step, weights untouched
            self._raise_if_nonfinite(ctx, 1)
        if ctx.loss.requires_grad:
            ctx.optimizer.zero_grad(set_to_none=True)
            s.before_backward(ctx)
            if self._scaler is None:
                ctx.loss.backward()
                s.after_backward(ctx)
                ctx.optimizer.step()
            else:
                self._scaler.scale(ctx.loss).backward()
                self._scaler.unscale_(ctx.optimizer)  # hooks (EWC/SI penalty gradients) see true gradients
                s.after_backward(ctx)
                self._scaler.step(ctx.optimizer)
                self._scaler.update()
        # else: no trainable parameter is on this batch's path (e.g. a random router sent every row
        # to frozen experts); nothing to learn from it, but the strategy still sees the batch.
        s.after_batch(ctx)
