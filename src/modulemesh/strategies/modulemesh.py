"""ModuleMesh's core continual strategy: one new expert per task, old experts frozen.

When task t arrives a fresh expert covering the task's classes (all classes in domain-IL) joins
the mesh and every earlier expert is frozen, so nothing learned before can be overwritten. The
router learns which expert owns an input from the current task plus a small reservoir replay
buffer of earlier tasks: each batch is the current minibatch with an equal-sized replay batch
appended, and the loss is the mesh's mixture negative log-likelihood on all of it.

Why this trains the new expert as if it were alone: for a current-task example whose class no
old expert covers, p(y|x) = w_new(x) p_new(y|x), so the gradient of log p(y|x) with respect to the
new expert is exactly that of log p_new(y|x), whatever the routing weight. Replay rows give the
new expert no gradient (it does not cover their classes) and teach the router the old routes.
"""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..data.scenarios import as_float
from ..training.buffer import ReplayBuffer
from .base import Strategy


class ModuleMeshParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    replay_batch_size: Optional[int] = Field(None, ge=1, description="replay rows per step; default: train.batch_size")
    balance_tasks: bool = Field(True, description="router loss = sum over tasks in the batch of each task's mean NLL")


class ModuleMeshStrategy(Strategy):
    name = "modulemesh"
    Params = ModuleMeshParams

    def __init__(self, cfg, scenario, params=None):
        super().__init__(cfg, scenario, params)
        self.buffer = ReplayBuffer(cfg.strategy.buffer_size, seed=cfg.seed)

    def before_task(self, ctx) -> None:
        task, mesh = ctx.task, ctx.mesh
        classes = list(range(self.scenario.num_classes)) if self.scenario.kind == "domain_incremental" else task.classes
        for expert in mesh.experts:
            expert.freeze()
        mesh.add_expert(self.new_expert(f"expert{task.id}", classes).to(ctx.device))
        if hasattr(mesh.router, "assign"):
            mesh.router.assign(task.id, len(mesh.experts) - 1)
        self.buffer.to(ctx.device)

    def trainable_parameters(self, ctx):
        return list(ctx.mesh.experts[-1].parameters()) + list(ctx.mesh.router.parameters())

    def before_batch(self, ctx) -> None:
        # Replay only teaches a router with parameters; density/entropy routers need none.
        if len(self.buffer) == 0 or not any(p.requires_grad for p in ctx.mesh.router.parameters()):
            return
        n = self.params.replay_batch_size or ctx.batch_size
        x, y, t, _ = self.buffer.sample(n, ctx.generator)
        ctx.x = torch.cat([ctx.x, as_float(x)])
        ctx.y = torch.cat([ctx.y, y])
        ctx.t = torch.cat([ctx.t, t])

    def loss(self, ctx) -> torch.Tensor:
        if not self.params.balance_tasks or ctx.n_current == ctx.y.shape[0]:
            return super().loss(ctx)
        # Replay rows are few and spread over many old tasks; a plain mean would teach the router
        # that almost everything belongs to the newest expert. Summing each task's mean NLL gives
        # every task the same say, and keeps the current task's term (the only one that trains the
        # new expert) at the weight it would have alone.
        nll = -ctx.out.log_probs.gather(1, ctx.y[:, None]).squeeze(1)
        counts = torch.bincount(ctx.t)
        loss = (nll / counts[ctx.t]).sum()
        return loss + self.routing_penalty(ctx)

    def after_task(self, ctx) -> None:
        task = ctx.task
        if hasattr(ctx.mesh.router, "fit_expert"):
            # The finished expert's density model, fit once on its own task's inputs.
            ctx.mesh.router.fit_expert(len(ctx.mesh.experts) - 1, as_float(task.x_train.to(ctx.device)), task.y_train.to(ctx.device))
        self.buffer.add(task.x_train.to(ctx.device), task.y_train.to(ctx.device), torch.full_like(task.y_train, task.id).to(ctx.device))

    def state_dict(self):
        return {f"buffer.{k}": v for k, v in self.buffer.state_dict().items()}

    def load_state_dict(self, state):
        self.buffer.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("buffer.")})
