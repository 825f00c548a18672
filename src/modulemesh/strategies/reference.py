"""Reference arms that classify without experts, to show what ModuleMesh's experts add.

- ``router-only``: the density router's own class posterior (the config's density router, or one with its
  ``router.components``/``clusters``/``state_dtype`` when the config names another router type),
  argmax_c log p(x | c) + log p(c), with
  per-class PPCA densities fit on each task's training inputs (in the router's feature space when
  ``router.features`` is set). This is ModuleMesh with the experts taken out.
- ``ncm``: nearest class mean (Euclidean) on the same inputs or features.

Neither trains anything by gradient. The mesh still needs an expert per task for its routing weights
(``evaluate`` runs the mesh); these are linear placeholders that never train and never predict, so
the arms report no within-expert accuracy and their task-id accuracy is "the predicted class belongs
to the input's task".
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..data.scenarios import as_float
from ..mesh import DensityRouter, Expert
from ..mesh.mesh import NO_COVER
from .base import Strategy


class _NoExperts(Strategy):
    predicts_with_experts = False

    def new_expert(self, name: str, classes: list[int]) -> Expert:
        return Expert(
            name,
            classes,
            {"type": "mlp", "hidden": []},
            self.scenario.input_shape,
            metadata={"strategy": self.name, "placeholder": True},
        )

    def task_classes(self, task) -> list[int]:
        return list(range(self.scenario.num_classes)) if self.scenario.kind == "domain_incremental" else task.classes

    def before_task(self, ctx) -> None:
        mesh = ctx.mesh
        expert = mesh.add_expert(
            self.new_expert(f"expert{len(mesh.experts)}", self.task_classes(ctx.task)).to(ctx.device)
        )
        expert.freeze()
        ctx.state["report"] = {"action": "add", "expert": expert.name}

    def skip_training(self, ctx) -> bool:
        return True

    def trainable_parameters(self, ctx):
        return []


class RouterOnly(_NoExperts):
    name = "router-only"

    def setup(self, mesh) -> None:
        # The arm is the density router's posterior; under another router type (a config written for a learned
        # gate) it brings its own density router with the config's router.components/clusters/state_dtype.
        if not hasattr(mesh.router, "class_log_posterior"):
            r = self.cfg.router
            mesh.router = DensityRouter(components=r.components, clusters=r.clusters, state_dtype=r.state_dtype)

    def after_task(self, ctx) -> None:
        task = ctx.task
        ctx.mesh.router.fit_expert(
            len(ctx.mesh.experts) - 1, as_float(task.x_train.to(ctx.device)), task.y_train.to(ctx.device)
        )

    def predict_log_probs(self, mesh, x, task_ids):
        joint = mesh.router.class_log_posterior(x, self.scenario.num_classes)
        return F.log_softmax(joint.clamp_min(NO_COVER), dim=1)


class NearestClassMean(_NoExperts):
    name = "ncm"

    def __init__(self, cfg, scenario, params=None):
        super().__init__(cfg, scenario, params)
        self.sums: Optional[torch.Tensor] = None  # (C, D) per-class feature sums; means = sums / counts
        self.counts: Optional[torch.Tensor] = None

    def embed(self, mesh, x: torch.Tensor) -> torch.Tensor:
        embed = getattr(mesh.router, "embed", None)  # the router's feature space when it has one
        return embed(x) if embed is not None else x.flatten(1).float()

    @torch.no_grad()
    def after_task(self, ctx) -> None:
        x, y = ctx.task.x_train, ctx.task.y_train.to(ctx.device)
        z = torch.cat(
            [self.embed(ctx.mesh, as_float(x[b : b + 4096].to(ctx.device))) for b in range(0, x.shape[0], 4096)]
        )
        if self.sums is None:
            self.sums = z.new_zeros(self.scenario.num_classes, z.shape[1])
            self.counts = z.new_zeros(self.scenario.num_classes)
        self.sums = self.sums.to(z.device).index_add(0, y, z)
        self.counts = self.counts.to(z.device).index_add(0, y, torch.ones_like(y, dtype=z.dtype))

    @torch.no_grad()
    def predict_log_probs(self, mesh, x, task_ids):
        if self.sums is None:
            return None
        known = self.counts.to(x.device) > 0
        means = self.sums.to(x.device) / self.counts.to(x.device).clamp_min(1)[:, None]
        scores = -torch.cdist(self.embed(mesh, x), means).pow(2)
        return F.log_softmax(torch.where(known, scores, torch.full_like(scores, NO_COVER)), dim=1)

    def state_dict(self):
        return {} if self.sums is None else {"sums": self.sums.cpu(), "counts": self.counts.cpu()}

    def load_state_dict(self, state):
        self.sums, self.counts = state.get("sums"), state.get("counts")
