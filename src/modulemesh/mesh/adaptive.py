"""Adaptive compute: per input, run only the experts its routing weights need, and count what that costs.

``router.k: auto`` with ``router.threshold: p`` keeps, for each input, the fewest experts whose
routing weights (sorted from the largest) sum to at least ``p``, renormalizes their weights and
skips the rest: an input the router is sure about runs one expert, an ambiguous one runs several.
Any router that produces weights gets the rule (``Router`` applies it at evaluation; see
``routers.Router``). A router that must run every expert to compute its weights (entropy routing,
a density router with ``expert_weight``) still mixes only the kept experts, but saves no expert
compute: ``flops_per_input`` counts every expert as run for it.

FLOPs are ``torch.utils.flop_counter`` counts of one forward pass (matmuls and convolutions; the
mixing and masking are elementwise and not counted), per sample.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..errors import ModuleMeshError

# Cumulative sums are compared with p minus this slack, so weights that reach p in exact
# arithmetic (0.6 + 0.3 >= 0.9) are not pushed one expert further by float rounding.
SLACK = 1e-6


def check_threshold(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < float(p) <= 1:
        raise ModuleMeshError(f"router.threshold must be a number with 0 < p <= 1 (got {p!r}); e.g. 0.9")
    return float(p)


def experts_needed(weights: torch.Tensor, p: float) -> torch.Tensor:
    """(N,) the fewest experts whose weights, largest first, sum to >= p; p = 1 keeps every expert
    with a non-zero weight."""
    p = check_threshold(p)
    if p >= 1.0:
        return (weights > 0).sum(1).clamp_min(1)
    cum = weights.sort(dim=1, descending=True, stable=True).values.cumsum(1)
    return ((cum < p - SLACK).sum(1) + 1).clamp_max(weights.shape[1])


def threshold_mask(weights: torch.Tensor, p: float) -> torch.Tensor:
    """``weights`` with all but each row's ``experts_needed`` largest set to 0, the rest renormalized.

    Ties are broken by expert index (the lower index is kept), so the result is deterministic.
    """
    if check_threshold(p) >= 1.0:
        return weights
    n = experts_needed(weights, p)
    order = weights.sort(dim=1, descending=True, stable=True).indices
    rank = torch.arange(weights.shape[1], device=weights.device).expand_as(weights)
    keep = torch.zeros_like(weights, dtype=torch.bool).scatter_(1, order, rank < n.unsqueeze(1))
    kept = weights * keep
    return kept / kept.sum(1, keepdim=True).clamp_min(1e-30)


def _count(fn) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def _probe(mesh, n: int) -> torch.Tensor:
    device = next((p.device for p in mesh.parameters()), torch.device("cpu"))
    return torch.zeros(n, *mesh.input_shape, device=device)


def expert_flops_per_sample(mesh, probe: int = 8) -> list[float]:
    """Forward FLOPs of each expert for one input (counted on ``probe`` inputs, divided)."""
    x = _probe(mesh, probe)
    out = []
    for e in mesh.experts:
        was = e.training
        e.eval()
        out.append(_count(lambda e=e: e(x)) / probe)
        e.train(was)
    return out


def router_flops_per_sample(mesh, probe: int = 8) -> float:
    """Forward FLOPs of the router for one input, at evaluation; 0 for a one-expert mesh (not routed)."""
    if len(mesh.experts) < 2:
        return 0.0
    x = _probe(mesh, probe)
    router, was = mesh.router, mesh.router.training
    router.eval()
    try:
        logits = [e(x) for e in mesh.experts] if router.needs_expert_outputs else None
        tasks = torch.zeros(probe, dtype=torch.long, device=x.device)
        return _count(lambda: router(x, logits, tasks)) / probe
    finally:
        router.train(was)


def experts_run(mesh, weights: torch.Tensor) -> torch.Tensor:
    """(N, E) bool: which experts the mesh ran on each input, given its evaluation weights."""
    if len(mesh.experts) == 1 or mesh.router.needs_expert_outputs:
        return torch.ones_like(weights, dtype=torch.bool)
    return weights > 0


def flops_per_input(mesh, weights: torch.Tensor, expert_flops: Optional[list[float]] = None) -> torch.Tensor:
    """(N,) inference FLOPs of each input: the experts actually run on it plus the router."""
    if weights.shape[1] != len(mesh.experts):
        raise ModuleMeshError(f"weights have {weights.shape[1]} columns for {len(mesh.experts)} experts")
    per_expert = torch.tensor(expert_flops or expert_flops_per_sample(mesh), dtype=torch.float64)
    return experts_run(mesh, weights).cpu().double() @ per_expert + router_flops_per_sample(mesh)


def inference_costs(mesh, weights: torch.Tensor) -> dict[str, float]:
    """Mean per-sample inference costs over the inputs whose evaluation routing ``weights`` are given."""
    per_expert = expert_flops_per_sample(mesh)
    ran = experts_run(mesh, weights).cpu()
    expert = ran.double() @ torch.tensor(per_expert, dtype=torch.float64)
    return {
        "expert_flops_per_sample": float(expert.mean()),
        "router_flops_per_sample": router_flops_per_sample(mesh),
        "all_experts_flops_per_sample": float(sum(per_expert)),
        "experts_run_per_sample": float(ran.sum(1).double().mean()),
    }


__all__ = [
    "check_threshold",
    "experts_needed",
    "threshold_mask",
    "expert_flops_per_sample",
    "router_flops_per_sample",
    "experts_run",
    "flops_per_input",
    "inference_costs",
]
