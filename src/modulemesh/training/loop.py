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

from ..data.scenarios import Scenario, Task, as_float
from ..errors import TrainingError
from ..mesh.mesh import MeshOutput, ModuleMesh
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


@dataclass
class TaskStats:
    steps: int = 0
    samples: int = 0  # rows processed (current + replay), over all epochs
    flops: int = 0
    flops_per_sample: float = 0.0
    wall_time_s: float = 0.0
    params_trained: int = 0
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


class Trainer:
    def __init__(self, mesh: ModuleMesh, strategy, train_cfg, device: torch.device, seed: int = 0,
                 on_step: Optional[Callable[[int, int], None]] = None,
                 on_start: Optional[Callable[[int], None]] = None):
        self.mesh, self.strategy, self.cfg, self.device = mesh, strategy, train_cfg, device
        self.generator = torch.Generator().manual_seed(seed)
        self.on_step = on_step  # progress callback(step, total_steps)
        self.on_start = on_start  # progress callback(total_steps) when a task starts

    def steps_per_task(self, n_train: int) -> int:
        return self.cfg.epochs * len(batch_bounds(n_train, self.cfg.batch_size))

    def train_task(self, task: Task, scenario: Scenario) -> TaskStats:
        s, mesh = self.strategy, self.mesh
        ctx = Context(mesh, scenario, task, self.device, self.generator, self.cfg.batch_size)
        s.before_task(ctx)
        x_all, y_all, t_all = s.train_data(ctx)
        x_all, y_all, t_all = x_all.to(self.device), y_all.to(self.device), t_all.to(self.device)
        n = int(y_all.shape[0])
        if n == 0:
            raise TrainingError(f"task {task.id} has no training examples")
        if s.skip_training(ctx):
            s.after_task(ctx)
            mesh.eval()
            return TaskStats(report=dict(ctx.state.get("report", {})))
        params = [p for p in s.trainable_parameters(ctx) if p.requires_grad]
        before = {id(p): p.detach().clone() for p in params}
        c = self.cfg
        ctx.optimizer = make_optimizer(params, c.optimizer, c.lr, c.momentum, c.weight_decay, what="the mesh for this task")
        stats, total = TaskStats(), self.steps_per_task(n)
        if self.on_start:
            self.on_start(total)
        mesh.train()
        start = time.perf_counter()
        for epoch in range(self.cfg.epochs):
            ctx.epoch = epoch
            s.before_epoch(ctx)
            order = torch.randperm(n, generator=self.generator).to(self.device)
            for begin, end in batch_bounds(n, self.cfg.batch_size):
                idx = order[begin:end]
                ctx.x, ctx.y, ctx.t = as_float(x_all[idx]), y_all[idx], t_all[idx]
                ctx.n_current = int(idx.shape[0])
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
            s.after_epoch(ctx)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        stats.wall_time_s = time.perf_counter() - start
        stats.flops = int(round(stats.flops_per_sample * stats.samples))
        stats.final_loss = float(ctx.loss.detach()) if ctx.loss is not None else float("nan")
        # Count what actually changed, not what was merely handed to the optimizer.
        stats.params_trained = int(sum((p.detach() != before[id(p)]).sum() for p in params))
        stats.report = dict(ctx.state.get("report", {}))
        s.after_task(ctx)
        mesh.eval()
        return stats

    def _step(self, ctx: Context) -> None:
        s = self.strategy
        s.before_batch(ctx)
        ctx.out = ctx.mesh(ctx.x, ctx.t)
        ctx.loss = s.loss(ctx)
        if not torch.isfinite(ctx.loss):
            raise TrainingError(f"loss became {float(ctx.loss.detach())} at task {ctx.task.id}, epoch {ctx.epoch}, step {ctx.step}; "
                                "lower train.lr or check the data for NaN/inf values")
        if ctx.loss.requires_grad:
            ctx.optimizer.zero_grad(set_to_none=True)
            s.before_backward(ctx)
            ctx.loss.backward()
            s.after_backward(ctx)
            ctx.optimizer.step()
        # else: no trainable parameter is on this batch's path (e.g. a random router sent every row
        # to frozen experts); nothing to learn from it, but the strategy still sees the batch.
        s.after_batch(ctx)
