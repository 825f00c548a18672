"""Aggregation of parameters from several clients: pure functions on tensors, no I/O, no engine.

* ``aggregate(contribs, weights)`` - per-tensor FedAvg. Each contribution is a ``{name: tensor}``
  dict and may hold a different subset of names; every tensor is averaged only over the clients
  that sent it, weighted by their example counts renormalised over those clients:
  ``theta = sum_{k holds t} n_k theta_k / sum_{k holds t} n_k``.
* ``aggregate_modules(contribs, weights)`` - the same one level up: ``{module: {param: tensor}}``.
  A module is averaged over the peers that hold it (seed 000 §3.3D consensus update); the weight
  of a peer may be one number or a number per module.
* ``method``: ``mean`` (FedAvg), ``fisher`` (per-coordinate Fisher-weighted:
  ``sum n_k F_k theta_k / sum n_k F_k``, falling back to the mean where all Fisher values vanish),
  ``median`` (coordinate-wise median, ignores weights) and ``trimmed_mean`` (drop the ``trim``
  fraction of the largest and of the smallest values of each coordinate, mean of the rest,
  ignores weights). The last two bound the damage of a poisoned client.
* Integer tensors (e.g. BatchNorm's ``num_batches_tracked``) take the element-wise maximum.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch

from ..errors import ConfigError

METHODS = ("mean", "fisher", "median", "trimmed_mean")

State = Mapping[str, torch.Tensor]


def weighted_mean(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    w = weights.to(torch.float64)
    w = w / w.sum()
    shape = (-1,) + (1,) * (stack.dim() - 1)
    return (stack.to(torch.float64) * w.view(shape)).sum(0).to(stack.dtype)


def coordinate_median(stack: torch.Tensor) -> torch.Tensor:
    """Median along dim 0; for an even count the mean of the two middle values."""
    n = stack.shape[0]
    s = stack.sort(dim=0).values
    if n % 2:
        return s[n // 2].clone()
    return (s[n // 2 - 1] + s[n // 2]) / 2


def trimmed_mean(stack: torch.Tensor, trim: float = 0.1) -> torch.Tensor:
    """Drop ``floor(trim * n)`` values at each end of every coordinate, average the rest."""
    if not 0 <= trim < 0.5:
        raise ConfigError(f"trimmed-mean fraction must be in [0, 0.5), got {trim}")
    n = stack.shape[0]
    cut = int(trim * n)
    s = stack.sort(dim=0).values
    return s[cut : n - cut].mean(0)


def fisher_weighted(
    stack: torch.Tensor, fishers: torch.Tensor, weights: torch.Tensor, eps: float = 1e-12
) -> torch.Tensor:
    """Per-coordinate ``sum w_k F_k theta_k / sum w_k F_k``; plain weighted mean where ``sum w_k F_k <= eps``."""
    if fishers.shape != stack.shape:
        raise ConfigError(
            f"Fisher values of shape {tuple(fishers.shape)} do not match parameters of shape {tuple(stack.shape)}"
        )
    shape = (-1,) + (1,) * (stack.dim() - 1)
    wf = fishers.to(torch.float64).clamp_min(0) * weights.to(torch.float64).view(shape)
    denom = wf.sum(0)
    fw = (wf * stack.to(torch.float64)).sum(0) / denom.clamp_min(eps)
    fallback = weighted_mean(stack.to(torch.float64), weights)
    return torch.where(denom > eps, fw, fallback).to(stack.dtype)


def combine(
    stack: torch.Tensor,
    weights: torch.Tensor,
    method: str = "mean",
    trim: float = 0.1,
    fishers: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Aggregate a stack ``(n, ...)`` of one tensor from n clients."""
    if not stack.is_floating_point():
        return stack.max(0).values
    weights = weights.to(stack.device)
    if fishers is not None:
        fishers = fishers.to(stack.device)
    if method == "mean":
        return weighted_mean(stack, weights)
    if method == "median":
        return coordinate_median(stack)
    if method == "trimmed_mean":
        return trimmed_mean(stack, trim)
    if method == "fisher":
        if fishers is None:
            raise ConfigError(
                "method 'fisher' needs the clients' Fisher values (pass fishers=...) or use method 'mean'"
            )
        return fisher_weighted(stack, fishers, weights)
    raise ConfigError(f"unknown aggregation method {method!r}; choose one of {', '.join(METHODS)}")


def aggregate(
    contribs: Sequence[Optional[State]],
    weights: Sequence[float],
    method: str = "mean",
    trim: float = 0.1,
    fishers: Optional[Sequence[Optional[State]]] = None,
) -> dict[str, torch.Tensor]:
    """Per-tensor aggregation over the clients that sent each tensor (``None`` = client sent nothing)."""
    if len(contribs) != len(weights):
        raise ConfigError(
            f"{len(contribs)} contributions but {len(weights)} weights; give one weight (example count) per client"
        )
    if any(w < 0 for w in weights):
        raise ConfigError(f"client weights must be >= 0 (example counts), got {list(weights)}")
    if method not in METHODS:
        raise ConfigError(f"unknown aggregation method {method!r}; choose one of {', '.join(METHODS)}")
    names: list[str] = []
    for c in contribs:
        for k in c or {}:
            if k not in names:
                names.append(k)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        holders = [i for i, c in enumerate(contribs) if c is not None and name in c]
        shapes = {tuple(contribs[i][name].shape) for i in holders}
        if len(shapes) > 1:
            raise ConfigError(
                f"tensor {name!r} arrives with different shapes {sorted(shapes)}; "
                "clients must share the module's architecture"
            )
        w = torch.tensor([float(weights[i]) for i in holders], dtype=torch.float64)
        if method in ("mean", "fisher") and not w.sum() > 0:
            raise ConfigError(
                f"tensor {name!r}: every client that holds it has weight 0; "
                "weights are example counts and must not all be 0"
            )
        stack = torch.stack([contribs[i][name].detach() for i in holders])
        fstack = None
        if method == "fisher":
            if fishers is None or any(fishers[i] is None or name not in fishers[i] for i in holders):
                raise ConfigError(f"method 'fisher' needs a Fisher tensor for {name!r} from every client that sends it")
            fstack = torch.stack([fishers[i][name].detach() for i in holders])
        out[name] = combine(stack, w, method, trim, fstack)
    return out


def aggregate_stacked(
    stacked: State,
    weights: Sequence[float],
    method: str = "mean",
    trim: float = 0.1,
    fishers: Optional[State] = None,
) -> dict[str, torch.Tensor]:
    """``aggregate`` of n clients that all sent every tensor, given as ``{name: (n, ...)}`` (no re-stacking).

    Equal, bit for bit, to ``aggregate([row 0, ..., row n-1], weights, ...)``.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown aggregation method {method!r}; choose one of {', '.join(METHODS)}")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if (w < 0).any():
        raise ConfigError(f"client weights must be >= 0 (example counts), got {list(weights)}")
    if method in ("mean", "fisher") and not w.sum() > 0:
        raise ConfigError("every client has weight 0; weights are example counts and must not all be 0")
    out: dict[str, torch.Tensor] = {}
    for name, stack in stacked.items():
        if stack.shape[0] != len(w):
            raise ConfigError(f"tensor {name!r} stacks {stack.shape[0]} clients but {len(w)} weights were given")
        if method == "fisher" and (fishers is None or name not in fishers):
            raise ConfigError(f"method 'fisher' needs a Fisher tensor for {name!r} from every client that sends it")
        out[name] = combine(stack.detach(), w, method, trim, fishers[name] if method == "fisher" else None)
    return out


Weight = Union[float, Mapping[str, float]]


def aggregate_modules(
    contribs: Sequence[Optional[Mapping[str, State]]],
    weights: Sequence[Weight],
    method: str = "mean",
    trim: float = 0.1,
    fishers: Optional[Sequence[Optional[Mapping[str, State]]]] = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Module-level FedAvg: each module averaged over only the peers that hold (and sent) it.

    ``weights[k]`` is peer k's example count, or a dict of example counts per module.
    """
    if len(contribs) != len(weights):
        raise ConfigError(f"{len(contribs)} contributions but {len(weights)} weights; give one weight per peer")
    modules: list[str] = []
    for c in contribs:
        for m in c or {}:
            if m not in modules:
                modules.append(m)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for m in modules:
        holders = [i for i, c in enumerate(contribs) if c is not None and m in c]
        ws = []
        for i in holders:
            w = weights[i]
            ws.append(float(w[m]) if isinstance(w, Mapping) else float(w))
        fs = None
        if fishers is not None:
            fs = [(fishers[i] or {}).get(m) for i in holders]
        out[m] = aggregate([contribs[i][m] for i in holders], ws, method, trim, fs)
    return out
