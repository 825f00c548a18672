"""Unit-level pieces of a transfer: Fisher lookup, unit importance, which source unit each target unit copies
(narrowing keeps the most important, widening replicates them with random shares), similarity, beta-mixing."""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from ..errors import ModuleMeshError
from .layer_chain import Layer


def fisher_for(
    fisher: Optional[Mapping[str, torch.Tensor]], prefix: str, name: str, like: torch.Tensor
) -> torch.Tensor:
    if fisher is None:
        return torch.ones_like(like, dtype=torch.float32, device="cpu")
    for key in (prefix + name, name, "net." + name):
        if key in fisher:
            f = fisher[key].detach().float().cpu()
            if f.shape != like.shape:
                raise ModuleMeshError(
                    f"Fisher entry {key!r} has shape {tuple(f.shape)} but the parameter is "
                    f"{tuple(like.shape)}; compute the Fisher on the source model"
                )
            return f
    raise ModuleMeshError(
        f"the Fisher dict has no entry for source parameter {name!r}; compute it with "
        "fisher_diagonal(source_model, ...)"
    )


def unit_importance(layers: list[Layer], idx: int, fisher, prefix: str) -> torch.Tensor:
    """Fisher mass of each output unit of layers[idx]: incoming weights, bias, BN, outgoing weights."""
    l = layers[idx]
    w = l.module.weight
    imp = fisher_for(fisher, prefix, f"{l.name}.weight", w).reshape(w.shape[0], -1).sum(1)
    if l.module.bias is not None:
        imp = imp + fisher_for(fisher, prefix, f"{l.name}.bias", l.module.bias)
    if l.bn is not None and l.bn.weight is not None:
        imp = imp + fisher_for(fisher, prefix, f"{l.bn_name}.weight", l.bn.weight)
        imp = imp + fisher_for(fisher, prefix, f"{l.bn_name}.bias", l.bn.bias)
    if idx + 1 < len(layers):
        nxt = layers[idx + 1]
        fw = fisher_for(fisher, prefix, f"{nxt.name}.weight", nxt.module.weight)
        fw = fw.reshape(fw.shape[0], l.out_units, -1)  # (out_next, units, positions * kernel)
        imp = imp + fw.sum(dim=(0, 2))
    return imp


def unit_map(importance: torch.Tensor, width: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Target unit -> source unit, plus the share of the source unit's outgoing weight each gets."""
    n = importance.numel()
    order = torch.argsort(importance, descending=True, stable=True)
    if width <= n:
        return torch.sort(order[:width]).values, torch.ones(width)
    mapping = torch.cat([torch.arange(n), order[torch.arange(width - n) % n]])
    counts = torch.bincount(mapping, minlength=n)
    raw = 0.5 + torch.rand(width, generator=gen)
    raw[counts[mapping] == 1] = 1.0
    totals = torch.zeros(n).index_add_(0, mapping, raw)
    return mapping, raw / totals[mapping]


def expand_columns(unit_map: torch.Tensor, share: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel maps -> flattened-feature maps (channel c, position p -> feature c * grid + p)."""
    if grid == 1:
        return unit_map, share
    pos = torch.arange(grid)
    cols = torch.where(unit_map[:, None] >= 0, unit_map[:, None] * grid + pos[None, :], -1).reshape(-1)
    return cols, share.repeat_interleave(grid)


def similarity(t: Layer, s_shape: tuple[int, ...]) -> float:
    tw = tuple(t.module.weight.shape)
    sim = min(tw[0], s_shape[0]) / max(tw[0], s_shape[0]) * min(tw[1], s_shape[1]) / max(tw[1], s_shape[1])
    return float(sim)


def mix(mapped: torch.Tensor, random: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    mapped = mapped.to(random.dtype)
    return torch.where(mask, beta * mapped + (1.0 - beta) * random, random)
