"""ModuleMesh's continual strategy: grow, reuse or update experts; never overwrite old knowledge.

``policy: add`` (one new expert per task): when task t arrives a fresh expert covering the task's
classes (all classes in domain-IL) joins the mesh and every earlier expert is frozen. The router
learns which expert owns an input: a learned gate from the current task plus a reservoir replay
buffer of earlier tasks (each batch = current minibatch + an equal-sized replay batch, loss =
sum over the tasks in the batch of each task's mean mixture NLL, so old tasks are not outvoted);
the density router needs no replay and keeps none: it fits the finished expert's input density once.

With the density router a task's data trains only its own expert: while the task trains, the router
sends every row to the expert being trained (``router.train_target``), so its loss is exactly its own
cross-entropy; in domain-IL, where old experts cover the same classes, no frozen expert takes a share
of the mixture. With a learned gate, for a current-task example whose class no old expert covers,
p(y|x) = w_new(x) p_new(y|x), so the gradient with respect to the new expert is again that of
log p_new(y|x), whatever the routing weight; replay rows give the new expert no gradient (it does not
cover their classes) and teach the gate.

``policy: auto`` (seed 001 §2.5) decides per task from data. The candidates are the experts that
cover every class of the new task; each is scored alone on the task's held-out (validation) data:
- best accuracy >= ``reuse_accuracy``: the expert already handles the task -> reuse it (no expert
  trains; the router learns the new inputs: the density router adds the task's components);
- best accuracy >= ``update_accuracy``: the expert is related -> update it on the new task with
  L_new + gamma * L_distill_old, the distillation term keeping its outputs on the replay buffer
  close to its own pre-update outputs;
- otherwise add a new expert, initialized from the best candidate when ``init_from_similar``.
In class-IL a new task brings new classes, so no expert covers it and the protocol always adds.
Every decision and the accuracies behind it are written into the run's per-task report.
"""

from __future__ import annotations

import copy
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..data.scenarios import as_float
from ..errors import ConfigError
from ..mesh.mesh import NO_COVER
from ..training.losses import kl_divergence
from .base import Strategy
from .head_refit import RIDGE, last_linear, refit_head_lda
from .replay import ReplayMixin


class ModuleMeshParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    replay_batch_size: Optional[int] = Field(None, ge=1, description="replay rows per step; default: train.batch_size")
    balance_tasks: bool = Field(True, description="router loss = sum over tasks in the batch of each task's mean NLL")
    policy: Literal["add", "auto"] = Field(
        "add", description="add: one expert per task; auto: reuse/update/add from data"
    )
    reuse_accuracy: float = Field(95.0, ge=0, le=100, description="auto: reuse an expert at least this accurate (%)")
    update_accuracy: float = Field(60.0, ge=0, le=100, description="auto: update an expert at least this accurate (%)")
    init_from_similar: bool = Field(True, description="auto: a new expert starts as a copy of the best candidate")
    distill_weight: float = Field(1.0, ge=0, description="gamma: weight of L_distill_old when updating an expert")
    distill_temperature: float = Field(2.0, gt=0)
    init_from_previous: bool = Field(
        False,
        description="add: a new expert starts as a copy of the newest expert "
        "(forward transfer; old experts stay frozen)",
    )
    reject_weight: float = Field(
        0.0,
        ge=0,
        description="density router: train each new expert to reject replayed inputs "
        "of earlier tasks (logsumexp of its logits = 'mine' logit), for router.expert_weight",
    )
    reject_samples: int = Field(
        0,
        ge=0,
        description="with reject_weight and a pixel-space density router: per step, this many inputs drawn from "
        "earlier tasks' fitted densities join the replayed inputs the new expert learns to reject",
    )
    reject_noise: float = Field(
        1.0, ge=0, description="scale of the densities' isotropic residual in those draws (0: principal subspace only)"
    )
    reject_shift: int = Field(
        0,
        ge=0,
        le=4,
        description="image inputs: the rows of the rejection loss (own and rejected) are shifted by up to this "
        "many pixels, a fresh shift per step",
    )
    head_refit: Literal["none", "lda"] = Field(
        "none",
        description="lda: when an added expert's task ends, its last linear layer is replaced by linear "
        "discriminant analysis on its own features of the task's training data (one forward pass, no gradient "
        "step); not with the rejection evidence (it rescales the logits); pick on validation",
    )
    head_ridge: float = Field(
        RIDGE,
        gt=0,
        description="lda: shrinkage added to the features' covariance, times its mean variance; larger keeps the "
        "refit head's entries in a narrower range (what an int8 head can hold); pick on validation",
    )
    router_weight: float = Field(
        0.0,
        ge=0,
        description="alpha: within an expert, combine its class posterior with "
        "the density router's (log p_i(c|x) + alpha log p_router(c|x, expert i)); pick on validation",
    )


class ModuleMeshStrategy(ReplayMixin, Strategy):
    name = "modulemesh"
    Params = ModuleMeshParams

    def __init__(self, cfg, scenario, params=None):
        super().__init__(cfg, scenario, params)
        if self.params.reject_samples and (cfg.router.type != "density" or cfg.router.features):
            raise ConfigError(
                "strategy.reject_samples draws inputs from pixel-space densities: it needs router.type: density "
                "without router.features; set strategy.reject_samples: 0"
            )
        if self.params.head_refit != "none" and self.params.reject_weight > 0:
            raise ConfigError(
                "strategy.head_refit rescales an expert's logits, which strategy.reject_weight trains as task "
                "evidence; set strategy.head_refit: none or strategy.reject_weight: 0"
            )
        self.init_buffer(cfg)
        self.action, self.target = "add", -1  # this task's decision and the expert it trains
        self.snapshot = None  # frozen copy of an expert being updated (distillation teacher)
        self.task_expert: dict[int, int] = {}  # task id -> the expert that serves it (the task probe's targets)

    # ---------------------------------------------------------------- deciding
    def task_classes(self, task) -> list[int]:
        return list(range(self.scenario.num_classes)) if self.scenario.kind == "domain_incremental" else task.classes

    @torch.no_grad()
    def candidate_scores(self, ctx) -> dict[int, float]:
        """Accuracy (%) of each expert that covers the task's classes, alone, on held-out task data."""
        task, classes = ctx.task, set(self.task_classes(ctx.task))
        x, y = (task.x_val, task.y_val) if len(task.y_val) else (task.x_train[:1000], task.y_train[:1000])
        x, y = as_float(x.to(ctx.device)), y.to(ctx.device)
        scores = {}
        for i, expert in enumerate(ctx.mesh.experts):
            if not classes <= set(expert.classes):
                continue
            expert.eval()
            pred = expert.class_index[expert(x).argmax(1)]
            scores[i] = 100.0 * float((pred == y).float().mean())
        return scores

    def decide(self, ctx) -> tuple[str, int, dict[int, float]]:
        scores = self.candidate_scores(ctx) if self.params.policy == "auto" and ctx.mesh.experts else {}
        if not scores:
            return "add", -1, scores
        best = max(scores, key=scores.get)
        if scores[best] >= self.params.reuse_accuracy:
            return "reuse", best, scores
        if scores[best] >= self.params.update_accuracy:
            return "update", best, scores
        return "add", best, scores

    # ---------------------------------------------------------------- hooks
    def before_task(self, ctx) -> None:
        task, mesh = ctx.task, ctx.mesh
        action, best, scores = self.decide(ctx)
        for expert in mesh.experts:
            expert.freeze()
        if action == "add":
            expert = self.new_expert(f"expert{len(mesh.experts)}", self.task_classes(task)).to(ctx.device)
            source = best if best >= 0 and self.params.init_from_similar else -1
            if source < 0 and self.params.init_from_previous and mesh.experts:
                source = len(mesh.experts) - 1
            if (
                source >= 0
                and mesh.experts[source].backbone_spec == expert.backbone_spec
                and mesh.experts[source].classes == expert.classes
            ):
                fresh = {k: v.clone() for k, v in last_linear(expert).state_dict().items()}
                expert.load_state_dict(mesh.experts[source].state_dict())
                if self.params.head_refit != "none":
                    # A refit head's logits are on another scale: SGD from it diverges, so the copy keeps its
                    # fresh head and inherits only the features.
                    last_linear(expert).load_state_dict(fresh)
                expert.metadata["initialized_from"] = mesh.experts[source].name
            mesh.add_expert(expert)
            best = len(mesh.experts) - 1
        elif action == "update":
            self.snapshot = copy.deepcopy(mesh.experts[best]).eval()
            mesh.experts[best].unfreeze()
            mesh.experts[best].version += 1
        self.action, self.target = action, best
        self.task_expert[task.id] = best
        if hasattr(mesh.router, "assign"):
            mesh.router.assign(task.id, best)
        if hasattr(mesh.router, "train_target"):
            mesh.router.train_target = None if action == "reuse" else best
        self.buffer_to_device(ctx)
        ctx.state["report"] = {
            "action": action,
            "expert": mesh.experts[best].name,
            "candidate_accuracy": {mesh.experts[i].name: round(a, 2) for i, a in scores.items()},
        }

    def trainable_parameters(self, ctx):
        router = list(ctx.mesh.router.parameters())
        if self.action == "reuse":
            return router
        return list(ctx.mesh.experts[self.target].parameters()) + router

    def skip_training(self, ctx) -> bool:
        # Reusing an expert under a parameter-free router leaves nothing to optimize.
        return self.action == "reuse" and not any(p.requires_grad for p in ctx.mesh.router.parameters())

    def before_batch(self, ctx) -> None:
        needs_replay = (
            any(p.requires_grad for p in ctx.mesh.router.parameters())
            or self.snapshot is not None
            or (self.params.reject_weight > 0 and self.action == "add")
        )
        if needs_replay:
            self.replay(ctx, self.params.replay_batch_size)

    def loss(self, ctx) -> torch.Tensor:
        if getattr(ctx.mesh.router, "train_target", None) is not None:
            return self.own_task_loss(ctx)
        if not self.params.balance_tasks or ctx.n_current == ctx.y.shape[0]:
            loss = super().loss(ctx)
        else:
            # Replay rows are few and spread over many old tasks; a plain mean would teach the router
            # that almost everything belongs to the newest expert. Summing each task's mean NLL gives
            # every task the same say and keeps the current task's term (the only one that trains
            # the new expert) at the weight it would have alone.
            nll = -ctx.out.log_probs.gather(1, ctx.y[:, None]).squeeze(1)
            loss = (nll / torch.bincount(ctx.t)[ctx.t]).sum() + self.routing_penalty(ctx)
        if self.snapshot is not None and ctx.x.shape[0] > ctx.n_current:
            replay = ctx.x[ctx.n_current :]
            expert = ctx.mesh.experts[self.target]
            with torch.no_grad():
                teacher = self.snapshot(replay)
            loss = loss + self.params.distill_weight * kl_divergence(
                expert(replay), teacher, self.params.distill_temperature
            )
        return loss

    def own_task_loss(self, ctx) -> torch.Tensor:
        """The density router sends the task's rows to its expert alone: its own cross-entropy on them, plus,
        with ``reject_weight``, a logistic loss telling its rows (logsumexp of logits high) from replayed rows of
        earlier tasks (low). Replay rows never enter the cross-entropy: old data trains nothing but rejection."""
        n = ctx.n_current
        loss = F.nll_loss(ctx.out.log_probs[:n], ctx.y[:n])
        negatives = self.rejection_rows(ctx) if self.params.reject_weight > 0 and self.action == "add" else ctx.x[:0]
        if negatives.shape[0]:
            m = torch.logsumexp(ctx.mesh.experts[self.target](self.shifted(ctx, torch.cat([ctx.x[:n], negatives]))), 1)
            loss = loss + self.params.reject_weight * (F.softplus(-m[:n]).mean() + F.softplus(m[n:]).mean())
        if self.snapshot is not None and ctx.x.shape[0] > n:
            expert = ctx.mesh.experts[self.target]
            with torch.no_grad():
                teacher = self.snapshot(ctx.x[n:])
            loss = loss + self.params.distill_weight * kl_divergence(
                expert(ctx.x[n:]), teacher, self.params.distill_temperature
            )
        return loss

    def rejection_rows(self, ctx) -> torch.Tensor:
        """Inputs of earlier tasks the new expert learns to reject: the replayed rows, plus ``reject_samples``
        draws from the earlier experts' fitted densities."""
        rows = ctx.x[ctx.n_current :]
        k = self.params.reject_samples
        if k and self.target > 0 and hasattr(ctx.mesh.router, "sample"):
            drawn = ctx.mesh.router.sample(list(range(self.target)), k, ctx.generator, self.params.reject_noise)
            rows = torch.cat([rows, drawn.clamp(0, 1).to(rows.device, rows.dtype).reshape(k, *rows.shape[1:])])
        return rows

    def shifted(self, ctx, rows: torch.Tensor) -> torch.Tensor:
        """The rejection rows, own and rejected alike (a shift must not tell them apart), moved by up to
        ``reject_shift`` pixels: a small buffer replayed many times is then not simply memorized."""
        s = self.params.reject_shift
        if not s or rows.ndim < 3:
            return rows
        dy, dx = (int(v) for v in torch.randint(-s, s + 1, (2,), generator=ctx.generator))
        return torch.roll(rows, (dy, dx), dims=(-2, -1))

    def needs_buffer(self, mesh) -> bool:
        """Replay is for a learned gate and for distilling an updated expert; density routing needs none."""
        return (
            any(p.requires_grad for p in mesh.router.parameters())
            or self.params.policy == "auto"
            or self.params.reject_weight > 0
            or getattr(mesh.router, "probe_weight", 0) > 0
        )

    def after_task(self, ctx) -> None:
        task, router = ctx.task, ctx.mesh.router
        if hasattr(router, "train_target"):
            router.train_target = None
        if self.action == "add" and self.params.head_refit == "lda":
            x, y = task.x_train.to(ctx.device), task.y_train.to(ctx.device)
            refit_head_lda(ctx.mesh.experts[self.target], x, y, ridge=self.params.head_ridge)
        if self.action != "reuse":
            # The expert is finished: keep it in the configured precision (expert.storage) from now on.
            ctx.mesh.experts[self.target].compress(self.cfg.expert.storage)
        if hasattr(router, "fit_expert"):
            # The finished expert's density model, fit once on this task's inputs; a reused or
            # updated expert keeps its old components and adds this task's.
            router.fit_expert(
                self.target,
                as_float(task.x_train.to(ctx.device)),
                task.y_train.to(ctx.device),
                append=self.action != "add",
            )
        self.snapshot = None
        if not self.needs_buffer(ctx.mesh):
            return
        self.buffer.add(
            task.x_train.to(ctx.device),
            task.y_train.to(ctx.device),
            torch.full_like(task.y_train, task.id).to(ctx.device),
        )
        if getattr(router, "probe_weight", 0) > 0 and len(ctx.mesh.experts) > 1:
            self.fit_task_probe(ctx.mesh)

    @torch.no_grad()
    def fit_task_probe(self, mesh, **fit) -> None:
        """Refit the router's task probe on the replay buffer: every expert's outputs on each stored input,
        and the expert that serves the input's task as its target (router.probe_weight; see task_evidence)."""
        x, _, t, _ = self.buffer.all()
        known = torch.tensor([int(v) in self.task_expert for v in t.tolist()], dtype=torch.bool, device=t.device)
        x, t = as_float(x[known]), t[known]
        owner = torch.tensor([self.task_expert[int(v)] for v in t.tolist()], dtype=torch.long)
        was = [e.training for e in mesh.experts]
        for e in mesh.experts:
            e.eval()
        logits = [torch.cat([e(x[i : i + 1024]) for i in range(0, len(x), 1024)]) for e in mesh.experts]
        for e, w in zip(mesh.experts, was):
            e.train(w)
        mesh.router.fit_probe(logits, owner, **fit)  # fit: e.g. l2, when a benchmark refits with another

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        if self.task_expert and len(self.buffer):  # which expert serves each stored row's task (the probe's targets)
            state["task_expert"] = torch.tensor(sorted(self.task_expert.items()), dtype=torch.long)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        if "task_expert" in state:
            self.task_expert = {int(a): int(b) for a, b in state["task_expert"].tolist()}

    @torch.no_grad()
    def predict_log_probs(self, mesh, x, task_ids):
        """With ``router_weight`` > 0 and a density router: p(c|x) = sum_i w_i(x) q_i(c|x), where q_i
        combines expert i's class posterior with the router's class posterior among expert i's classes."""
        alpha, router = self.params.router_weight, mesh.router
        if alpha == 0 or not hasattr(router, "expert_class_log_joint") or len(mesh.experts) < 2 or task_ids is not None:
            return None
        logits = [expert(x) for expert in mesh.experts]
        # The experts' own task evidence (router.expert_weight, probe_weight) counts here too, as in mesh(x).
        weights, _ = router(x, logits if router.needs_expert_outputs else None)
        return mix_log_probs(mesh, weights, logits, router.expert_class_log_joint(x, mesh.num_classes), alpha)


def mix_log_probs(mesh, weights: torch.Tensor, logits: list[torch.Tensor], joint: torch.Tensor, alpha: float):
    """(N, C) log sum_i w_i(x) q_i(c|x) from the routing ``weights``, each expert's ``logits`` and the router's
    ``joint`` (E, N, C) log p(x, y=c) (``ModuleMeshStrategy.predict_log_probs``)."""
    out = weights.new_full((weights.shape[0], mesh.num_classes), NO_COVER, dtype=torch.float32)
    for i, expert in enumerate(mesh.experts):
        own = joint[i][:, expert.class_index]
        own = torch.where(torch.isfinite(own), own, torch.zeros_like(own))  # classes the router never saw
        q = F.log_softmax(F.log_softmax(logits[i], 1) + alpha * F.log_softmax(own, 1), 1)
        term = out.new_full(out.shape, NO_COVER).index_copy(1, expert.class_index, q)
        out = torch.logaddexp(out, term + weights[:, i : i + 1].clamp_min(1e-30).log())
    return out
