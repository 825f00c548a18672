"""Merging same-architecture modules: plain (weighted) averaging and Fisher-weighted merging.

Fisher merging (Matena & Raffel, 2022) treats each model's diagonal Fisher as the precision of a
Gaussian posterior over its parameters and takes the product's mode, per parameter entry:

    theta*_j = sum_i w_i F_ij theta_ij / sum_i w_i F_ij

where w_i are model weights (e.g. data sizes). Entries where every model has (near-)zero Fisher
fall back to the plain weighted average, so no entry is left undefined. Buffers (BatchNorm
statistics) are averaged with the plain weights; integer buffers are taken from the first model.
With equal Fisher everywhere Fisher merging equals plain averaging (FedAvg, seeds 000/001).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from ..errors import ModuleMeshError

State = Mapping[str, torch.Tensor]


def _weights(n: int, weights: Optional[Sequence[float]]) -> list[float]:
    if n == 0:
        raise ModuleMeshError("nothing to merge: pass at least one state dict")
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ModuleMeshError(f"got {len(weights)} merge weights for {n} models; pass one weight per model")
    w = [float(x) for x in weights]
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ModuleMeshError(f"merge weights must be >= 0 with a positive sum, got {w}")
    s = sum(w)
    return [x / s for x in w]


def _check_same_architecture(states: Sequence[State]) -> None:
    keys = list(states[0].keys())
    for i, st in enumerate(states[1:], start=1):
        if set(st.keys()) != set(keys):
            missing = sorted(set(keys) - set(st.keys()))[:3]
            extra = sorted(set(st.keys()) - set(keys))[:3]
            raise ModuleMeshError(
                f"model {i} has different tensors than model 0 (missing {missing}, extra {extra}); "
                "only same-architecture modules can be merged"
            )
        for k in keys:
            if tuple(st[k].shape) != tuple(states[0][k].shape):
                raise ModuleMeshError(
                    f"tensor {k!r} is {tuple(st[k].shape)} in model {i} but "
                    f"{tuple(states[0][k].shape)} in model 0; only same-architecture modules can be "
                    "merged"
                )


def average_states(states: Sequence[State], weights: Optional[Sequence[float]] = None) -> dict[str, torch.Tensor]:
    """Weighted average sum_i w_i theta_i (weights normalized to sum 1; default: equal)."""
    w = _weights(len(states), weights)
    _check_same_architecture(states)
    out = {}
    for k, ref in states[0].items():
        if not torch.is_floating_point(ref):
            out[k] = ref.clone()
            continue
        out[k] = sum(wi * st[k].double() for wi, st in zip(w, states)).to(ref.dtype)
    return out


def fisher_merge(
    states: Sequence[State],
    fishers: Sequence[Mapping[str, torch.Tensor]],
    weights: Optional[Sequence[float]] = None,
    eps: float = 1e-12,
) -> dict[str, torch.Tensor]:
    """Fisher-weighted merge of same-architecture state dicts (Matena & Raffel 2022).

    ``fishers[i]`` holds the diagonal Fisher of model i for its parameters (as returned by
    ``fisher_diagonal``); tensors without a Fisher entry (buffers) are plainly averaged.
    """
    if len(fishers) != len(states):
        raise ModuleMeshError(f"got {len(fishers)} Fisher dicts for {len(states)} models; pass one per model")
    w = _weights(len(states), weights)
    _check_same_architecture(states)
    plain = average_states(states, w)
    out = {}
    for k, ref in states[0].items():
        have = [k in f for f in fishers]
        if not torch.is_floating_point(ref) or not any(have):
            out[k] = plain[k]
            continue
        if not all(have):
            raise ModuleMeshError(
                f"Fisher for {k!r} is given for some models but not all; compute every Fisher on the same parameters"
            )
        num = torch.zeros(ref.shape, dtype=torch.float64)
        den = torch.zeros(ref.shape, dtype=torch.float64)
        for wi, st, f in zip(w, states, fishers):
            fk = f[k].detach().double().cpu()
            if fk.shape != ref.shape:
                raise ModuleMeshError(
                    f"Fisher for {k!r} has shape {tuple(fk.shape)} but the tensor is {tuple(ref.shape)}"
                )
            if (fk < 0).any() or not torch.isfinite(fk).all():
                raise ModuleMeshError(f"Fisher for {k!r} has negative or non-finite entries; a diagonal Fisher is >= 0")
            num += wi * fk * st[k].detach().double().cpu()
            den += wi * fk
        merged = torch.where(den > eps, num / den.clamp_min(eps), plain[k].double().cpu())
        out[k] = merged.to(dtype=ref.dtype, device=ref.device)
    return out


__all__ = ["average_states", "fisher_merge"]
