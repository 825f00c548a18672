"""Strategy: a bundle of hooks on the one training loop, plus its own typed parameters.

A strategy owns how the mesh grows (``setup``/``before_task``), what data a task trains on
(``train_data``), what is trained (``trainable_parameters``) and the loss (``loss``). Everything
else is the shared ``Trainer``. Parameters come from the config's ``strategy:`` section; each
strategy validates its extra keys with its own ``Params`` model, so a typo is reported with the
list of valid keys.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable, Type

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from ..config import describe_validation_error
from ..errors import ConfigError
from ..mesh import Expert, ModuleMesh
from ..mesh.regularizers import load_balance_loss, routing_entropy, specialization_loss


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Strategy:
    name: ClassVar[str] = "base"
    Params: ClassVar[Type[BaseModel]] = NoParams

    def __init__(self, cfg, scenario, params: dict[str, Any] | None = None):
        self.cfg, self.scenario = cfg, scenario
        try:
            self.params = self.Params.model_validate(params or {})
        except Exception as e:  # pydantic.ValidationError
            raise ConfigError(
                describe_validation_error(self.Params, e, f"strategy {self.name!r}").replace("'", "'strategy.", 1)
            ) from None

    # ---------------------------------------------------------------- building the mesh
    def setup(self, mesh: ModuleMesh) -> None:
        """Called once before the first task."""

    def new_expert(self, name: str, classes: list[int]) -> Expert:
        return Expert(
            name, classes, self.cfg.expert.backbone, self.scenario.input_shape, metadata={"strategy": self.name}
        )

    # ---------------------------------------------------------------- hooks
    def before_task(self, ctx) -> None: ...
    def before_epoch(self, ctx) -> None: ...
    def before_batch(self, ctx) -> None: ...
    def before_backward(self, ctx) -> None: ...
    def after_backward(self, ctx) -> None: ...
    def after_batch(self, ctx) -> None: ...
    def after_epoch(self, ctx) -> None: ...
    def after_task(self, ctx) -> None: ...

    def skip_training(self, ctx) -> bool:
        """True when this task needs no gradient steps (e.g. an expert is reused as it is)."""
        return False

    def train_data(self, ctx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        task = ctx.task
        return task.x_train, task.y_train, torch.full_like(task.y_train, task.id)

    def trainable_parameters(self, ctx) -> Iterable[torch.nn.Parameter]:
        return ctx.mesh.parameters()

    def loss(self, ctx) -> torch.Tensor:
        """Mixture negative log-likelihood plus the configured routing regularizers."""
        loss = F.nll_loss(ctx.out.log_probs, ctx.y)
        penalty = self.routing_penalty(ctx)
        return loss if isinstance(penalty, float) and penalty == 0.0 else loss + penalty

    def routing_penalty(self, ctx) -> torch.Tensor | float:
        r, w = self.cfg.router, ctx.out.weights
        if w.shape[1] < 2:
            return 0.0
        penalty = 0.0
        if r.specialization_weight:
            penalty = penalty + r.specialization_weight * specialization_loss(w, ctx.y, self.scenario.num_classes)
        if r.load_balance_weight:
            penalty = penalty + r.load_balance_weight * load_balance_loss(w)
        if r.sparsity_weight:
            penalty = penalty + r.sparsity_weight * routing_entropy(w)
        return penalty

    # ---------------------------------------------------------------- evaluation
    def predict_log_probs(
        self, mesh: ModuleMesh, x: torch.Tensor, task_ids: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Scores (N, C) over the global label space that ``evaluate`` uses instead of the mesh's
        log-probabilities (e.g. iCaRL's nearest-mean-of-exemplars classifier); None = use the mesh."""
        return None

    # ---------------------------------------------------------------- resumable state
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...
