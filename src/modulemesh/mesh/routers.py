"""Routers: per-input weights over the experts of a mesh.

Every router returns ``(weights, gate_logits)``: ``weights`` is (N, E), non-negative, rows sum to 1
(zero for experts that do not run on that input); ``gate_logits`` is (N, E) for learned gates,
``None`` otherwise. Routers with ``needs_expert_outputs`` see every expert's logits (dense routing).

Adaptive compute: a router whose ``threshold`` is set (``router.k: auto``, ``router.threshold: p``)
keeps, at evaluation, only each input's fewest experts whose weights sum to >= p (``adaptive``).
The base class applies it to whatever weights a subclass computes, so every router gets the rule
without code of its own; while training, the full weights are used so every expert and the gate
keep their gradients (as top-k's mask applies only at evaluation).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModuleMeshError
from .adaptive import check_threshold, threshold_mask


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) per row."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


class Router(nn.Module):
    needs_expert_outputs = False

    def __init__(self, num_experts: int = 0):
        super().__init__()
        self.num_experts = num_experts
        self._threshold: Optional[float] = None
        self.register_forward_hook(_adaptive_weights)

    @property
    def threshold(self) -> Optional[float]:
        """p of adaptive compute (None: off); validated, 0 < p <= 1."""
        return self._threshold

    @threshold.setter
    def threshold(self, p: Optional[float]) -> None:
        self._threshold = None if p is None else check_threshold(p)

    def add_expert(self) -> None:
        self.num_experts += 1

    def remove_expert(self, index: int) -> None:
        self.num_experts -= 1

    def forward(
        self,
        x: torch.Tensor,
        expert_logits: Optional[Sequence[torch.Tensor]] = None,
        task_ids: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        raise NotImplementedError

    def export_state(self) -> dict[str, torch.Tensor]:
        """Tensors to save with the mesh (a router with non-parameter state overrides this)."""
        return self.state_dict()

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state)

    # Per-expert state: what routing to one expert needs, so experts trained apart (each with its
    # own router) can be composed into one mesh. Stateless routers have none.
    def export_expert_state(self, index: int) -> dict[str, torch.Tensor]:
        """Everything this router holds about expert ``index`` (CPU tensors); {} when it holds nothing."""
        self._check_index(index)
        return {}

    def import_expert_state(self, index: int, state: dict[str, torch.Tensor]) -> None:
        """Install ``state`` (from ``export_expert_state``) for expert ``index``, after ``mesh.add_expert``."""
        self._check_index(index)
        if state:
            raise ModuleMeshError(f"{type(self).__name__} keeps no per-expert state, got keys {sorted(state)[:3]}")

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_experts:
            raise ModuleMeshError(
                f"expert index {index} is out of range: this router has {self.num_experts} expert slots"
            )


def _adaptive_weights(router: Router, args, output):
    """Forward hook of every router: the threshold rule on its weights at evaluation."""
    if router.threshold is None or router.training:
        return None
    weights, gate = output
    return threshold_mask(weights, router.threshold), gate


class EntropyRouter(Router):
    """Seed 000: w_i(x) = softmax_i(-H(E_i(x)) / tau); dense, every expert runs.

    With ``normalize=True`` each entropy is divided by log(#classes of that expert), so experts
    covering different numbers of classes are compared on the same 0..1 scale.
    """

    needs_expert_outputs = True

    def __init__(self, num_experts: int = 0, temperature: float = 1.0, normalize: bool = False):
        super().__init__(num_experts)
        self.temperature = temperature
        self.normalize = normalize

    def forward(self, x, expert_logits=None, task_ids=None):
        if expert_logits is None:
            raise ModuleMeshError("EntropyRouter needs every expert's logits; call it through ModuleMesh")
        h = torch.stack([prediction_entropy(z) for z in expert_logits], dim=1)
        if self.normalize:
            sizes = torch.tensor([max(z.shape[1], 2) for z in expert_logits], device=h.device, dtype=h.dtype)
            h = h / sizes.log()
        return F.softmax(-h / self.temperature, dim=1), None


class TopKRouter(Router):
    """Seed 001: a small gate net, g = softmax(l / tau) masked to the top-k experts (``hidden=0``: linear).

    ``k="auto"`` masks nothing here: the full softmax goes to the threshold rule (``threshold``).

    Renormalization: kept weights are divided by their sum (``renormalize=True``, the default) so
    the mesh output stays a proper mixture of distributions (sums to 1) and its log-likelihood is
    a valid training loss. The catch is that at k=1 the renormalized weight is always 1 and the
    gate would get no gradient, so during training the gate routes densely (all experts, full
    softmax) and the top-k mask applies at evaluation, where only the selected experts run. The
    sparsity regularizer (entropy of g) closes the gap between the two.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int = 0,
        k: int | str = 1,
        temperature: float = 1.0,
        hidden: int = 128,
        renormalize: bool = True,
        dense_training: bool = True,
    ):
        super().__init__(num_experts)
        if k != "auto" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ModuleMeshError(f"top-k router: k must be a positive integer or 'auto' (got {k!r})")
        self.k, self.temperature, self.renormalize, self.dense_training = k, temperature, renormalize, dense_training
        if hidden < 0:
            raise ModuleMeshError(f"top-k router: hidden must be >= 0 (0: a linear gate), got {hidden}")
        self.in_features, self.hidden = in_features, hidden
        # hidden=0: a linear gate on the input, in*E multiply-adds instead of in*hidden; that matters
        # when the gate's cost is charged to a budget counted in a small expert's steps (upcycling).
        hidden_layer = [nn.Linear(in_features, hidden), nn.ReLU()] if hidden else []
        self.body = nn.Sequential(nn.Flatten(), *hidden_layer)
        self.head = nn.Linear(hidden or in_features, max(num_experts, 1))

    def add_expert(self) -> None:
        # Grow the output layer by one row; existing rows are kept so old routes are preserved.
        old = self.head
        if self.num_experts == 0:
            self.num_experts = 1
            return
        new = nn.Linear(old.in_features, self.num_experts + 1).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight[: self.num_experts] = old.weight
            new.bias[: self.num_experts] = old.bias
            new.weight[self.num_experts].zero_()
            new.bias[self.num_experts] = old.bias.mean()
        self.head = new
        self.num_experts += 1

    def remove_expert(self, index: int) -> None:
        keep = [i for i in range(self.num_experts) if i != index]
        old = self.head
        new = nn.Linear(old.in_features, max(len(keep), 1)).to(old.weight.device, old.weight.dtype)
        if keep:
            with torch.no_grad():
                new.weight.copy_(old.weight[keep])
                new.bias.copy_(old.bias[keep])
        self.head = new
        self.num_experts -= 1

    def export_expert_state(self, index: int) -> dict[str, torch.Tensor]:
        """The expert's row of the gate's output layer. It routes only together with the shared
        hidden layer (``body``), so it composes between meshes that share that layer."""
        self._check_index(index)
        return {
            "head.weight": self.head.weight[index].detach().cpu().clone(),
            "head.bias": self.head.bias[index : index + 1].detach().cpu().clone(),
        }

    def import_expert_state(self, index: int, state: dict[str, torch.Tensor]) -> None:
        self._check_index(index)
        if set(state) != {"head.weight", "head.bias"} or state["head.weight"].shape != self.head.weight[index].shape:
            raise ModuleMeshError(
                f"top-k gate state for expert {index} needs head.weight of shape "
                f"{tuple(self.head.weight[index].shape)} and head.bias; got {sorted(state)}"
            )
        with torch.no_grad():
            self.head.weight[index] = state["head.weight"].to(self.head.weight)
            self.head.bias[index] = state["head.bias"].to(self.head.bias).reshape(())

    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))[:, : self.num_experts]

    def forward(self, x, expert_logits=None, task_ids=None):
        logits = self.gate_logits(x)
        probs = F.softmax(logits / self.temperature, dim=1)
        if self.k == "auto" or (self.training and self.dense_training) or self.k >= self.num_experts:
            return probs, logits
        return topk_mask(probs, self.k, self.renormalize), logits


def topk_mask(probs: torch.Tensor, k: int, renormalize: bool) -> torch.Tensor:
    idx = probs.topk(k, dim=1).indices
    mask = torch.zeros_like(probs).scatter_(1, idx, 1.0)
    kept = probs * mask
    return kept / kept.sum(1, keepdim=True) if renormalize else kept


class RandomRouter(Router):
    """Ablation: k experts chosen uniformly at random per input, equal weights."""

    def __init__(self, num_experts: int = 0, k: int = 1, seed: int = 0):
        super().__init__(num_experts)
        self.k = k
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x, expert_logits=None, task_ids=None):
        scores = torch.rand(x.shape[0], self.num_experts, generator=self.generator).to(x.device)
        return _uniform_topk(scores, min(self.k, self.num_experts)), None


def _uniform_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    idx = scores.topk(k, dim=1).indices
    return torch.zeros_like(scores).scatter_(1, idx, 1.0 / k)


class OracleRouter(Router):
    """Ablation / task-IL: route each input to the expert assigned to its task id."""

    def __init__(self, num_experts: int = 0):
        super().__init__(num_experts)
        self.task_to_expert: dict[int, int] = {}

    def assign(self, task_id: int, expert_index: int) -> None:
        self.task_to_expert[int(task_id)] = int(expert_index)

    def remove_expert(self, index: int) -> None:
        super().remove_expert(index)
        self.task_to_expert = {t: (e if e < index else e - 1) for t, e in self.task_to_expert.items() if e != index}

    def export_expert_state(self, index: int) -> dict[str, torch.Tensor]:
        """The task ids routed to this expert."""
        self._check_index(index)
        return {
            "tasks": torch.tensor(sorted(t for t, e in self.task_to_expert.items() if e == index), dtype=torch.long)
        }

    def import_expert_state(self, index: int, state: dict[str, torch.Tensor]) -> None:
        self._check_index(index)
        if set(state) - {"tasks"}:
            raise ModuleMeshError(f"oracle router state for expert {index} holds only 'tasks'; got {sorted(state)}")
        for t in state.get("tasks", torch.empty(0, dtype=torch.long)).tolist():
            self.assign(t, index)

    def forward(self, x, expert_logits=None, task_ids=None):
        n = x.shape[0]
        if self.num_experts == 1:
            return torch.ones(n, 1, device=x.device), None
        if task_ids is None:
            raise ModuleMeshError(
                "OracleRouter needs task ids: use it with a task-incremental scenario, or pick router.type topk/entropy"
            )
        table = torch.full((int(task_ids.max()) + 1,), -1, dtype=torch.long)
        for t, e in self.task_to_expert.items():
            if t < table.numel():
                table[t] = e
        chosen = table.to(task_ids.device)[task_ids]
        weights = F.one_hot(chosen.clamp_min(0), self.num_experts).float()
        # A task with no expert yet (evaluated before it is trained, for forward transfer) gets a
        # uniform mixture of all experts instead of an error.
        unassigned = chosen < 0
        weights[unassigned] = 1.0 / self.num_experts
        return weights, None


ROUTERS = ("entropy", "topk", "density", "random", "oracle")
ADAPTIVE = ("topk", "entropy", "density")  # the routers whose weights the threshold rule can read


def build_router(
    kind: str,
    input_shape: Sequence[int],
    *,
    k: int | str = 1,
    temperature: float = 1.0,
    hidden: int = 128,
    renormalize: bool = True,
    components: int = 10,
    seed: int = 0,
    clusters: int = 1,
    state_dtype: str = "float32",
    features: Optional[str] = None,
    features_backbone: Optional[dict] = None,
    features_expert: Optional[str] = None,
    expert_weight: float = 0.0,
    probe_weight: float = 0.0,
    threshold: Optional[float] = None,
) -> Router:
    """The router of ``kind``; ``k="auto"`` with ``threshold`` p turns on adaptive compute."""
    if features and kind != "density":
        raise ModuleMeshError(f"router.features needs router.type density (got {kind!r})")
    if (k == "auto") != (threshold is not None):
        raise ModuleMeshError(
            "adaptive compute needs both router.k: auto and router.threshold: p (0 < p <= 1); "
            f"got k={k!r}, threshold={threshold!r}"
        )
    if k == "auto" and kind not in ADAPTIVE:
        raise ModuleMeshError(
            f"router.k: auto needs a router that produces weights ({', '.join(ADAPTIVE)}); {kind!r} does not"
        )
    router = _make_router(
        kind,
        input_shape,
        k=k,
        temperature=temperature,
        hidden=hidden,
        renormalize=renormalize,
        components=components,
        seed=seed,
        clusters=clusters,
        state_dtype=state_dtype,
        features=features,
        features_backbone=features_backbone,
        features_expert=features_expert,
        expert_weight=expert_weight,
        probe_weight=probe_weight,
    )
    router.threshold = threshold
    return router


def _make_router(
    kind: str,
    input_shape: Sequence[int],
    *,
    k,
    temperature,
    hidden,
    renormalize,
    components,
    seed,
    clusters,
    state_dtype,
    features,
    features_backbone,
    features_expert,
    expert_weight,
    probe_weight,
) -> Router:
    if kind == "entropy":
        return EntropyRouter(temperature=temperature)
    if kind == "topk":
        return TopKRouter(math.prod(input_shape), k=k, temperature=temperature, hidden=hidden, renormalize=renormalize)
    if kind == "density":
        from .density import DensityRouter

        if features:
            from .features import FeatureDensityRouter, load_extractor

            extractor, spec = load_extractor(features, tuple(input_shape), features_backbone, features_expert)
            return FeatureDensityRouter(
                extractor,
                spec,
                components=components,
                temperature=temperature,
                clusters=clusters,
                state_dtype=state_dtype,
                expert_weight=expert_weight,
                probe_weight=probe_weight,
            )
        return DensityRouter(
            components=components,
            temperature=temperature,
            clusters=clusters,
            state_dtype=state_dtype,
            expert_weight=expert_weight,
            probe_weight=probe_weight,
        )
    if kind == "random":
        return RandomRouter(k=k, seed=seed)
    if kind == "oracle":
        return OracleRouter()
    raise ModuleMeshError(f"unknown router {kind!r}; choose one of {', '.join(ROUTERS)}")
