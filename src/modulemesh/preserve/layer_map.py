"""Mapping one target layer from its paired source layer: weights, bias and BatchNorm, unit by unit,
Fisher-selected and beta-mixed into the target's own init (``new_state`` is updated in place)."""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from .layer_chain import Layer
from .pairing import IDENTITY
from .units import expand_columns, fisher_for, mix, unit_map


def map_layer(
    t: Layer,
    s: Layer,
    rel: str,
    importance: torch.Tensor,
    in_space: int,
    in_map: Optional[torch.Tensor],
    in_share: Optional[torch.Tensor],
    new_state: dict[str, torch.Tensor],
    fisher: Optional[Mapping[str, torch.Tensor]],
    prefix: str,
    thr: float,
    beta: float,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, int, float, list[int], str]:
    """Write target layer ``t`` into ``new_state``; returns (out_map, out_share, entries transferred,
    Fisher mass of the source entries used, source weight shape, note)."""
    tw = t.module.weight
    note = ""
    # Output-unit map of this target layer.
    if t.section == "output":
        out_map, out_share = torch.arange(t.out_units), torch.ones(t.out_units)
    else:
        out_map, out_share = unit_map(importance, t.out_units, gen)
    # Input-column map from the previous layer's units.
    if in_space == -1:
        cols, share = torch.arange(t.in_units), torch.ones(t.in_units)
    else:
        cols, share = expand_columns(in_map, in_share, t.grid)
    col_ok = cols >= 0
    colc = cols.clamp(min=0)
    extra_dims = (1,) * (tw.dim() - 2)
    col_scale = share.view(1, -1, *extra_dims)

    if rel == IDENTITY:
        w_map = (out_map[:, None] == colc[None, :]).float() * col_scale
        f_map = torch.full(tw.shape, math.inf)
        src_w_shape = [s.out_units, s.out_units]
        b_map = torch.zeros(t.out_units)
        fb_map = torch.full((t.out_units,), math.inf)
    else:
        sw = s.module.weight.detach().float().cpu()
        w_map = sw[out_map][:, colc] * col_scale
        f_src = fisher_for(fisher, prefix, f"{s.name}.weight", s.module.weight)
        f_map = f_src[out_map][:, colc]
        src_w_shape = list(sw.shape)
    mask_w = (f_map > thr) & col_ok.view(1, -1, *extra_dims)
    new_state[f"{t.name}.weight"] = mix(w_map, new_state[f"{t.name}.weight"].cpu(), mask_w, beta).to(tw.device)
    transferred = int(mask_w.sum())
    used_mass = 0.0
    if rel != IDENTITY:
        used = torch.zeros_like(f_src, dtype=torch.bool)
        idx = mask_w.nonzero(as_tuple=True)
        used[(out_map[idx[0]], colc[idx[1]], *idx[2:])] = True
        used_mass += float(f_src[used].sum())

    if t.module.bias is not None:
        if rel == IDENTITY:
            bmask = fb_map > thr
            b_new = mix(b_map, new_state[f"{t.name}.bias"].cpu(), bmask, beta)
        elif s.module.bias is not None:
            fb = fisher_for(fisher, prefix, f"{s.name}.bias", s.module.bias)
            bmask = fb[out_map] > thr
            b_new = mix(s.module.bias.detach().float().cpu()[out_map], new_state[f"{t.name}.bias"].cpu(), bmask, beta)
            used_mass += float(fb[torch.unique(out_map[bmask])].sum())
        else:
            bmask = torch.zeros(t.out_units, dtype=torch.bool)
            b_new = new_state[f"{t.name}.bias"].cpu()
        new_state[f"{t.name}.bias"] = b_new.to(tw.device)
        transferred += int(bmask.sum())

    if t.bn is not None:
        if rel != IDENTITY and s.bn is not None and type(s.bn) is type(t.bn):
            for pname in ("weight", "bias"):
                if getattr(t.bn, pname, None) is None or getattr(s.bn, pname, None) is None:
                    continue
                fbn = fisher_for(fisher, prefix, f"{s.bn_name}.{pname}", getattr(s.bn, pname))
                m = fbn[out_map] > thr
                key = f"{t.bn_name}.{pname}"
                new_state[key] = mix(
                    getattr(s.bn, pname).detach().float().cpu()[out_map], new_state[key].cpu(), m, beta
                ).to(tw.device)
                transferred += int(m.sum())
                used_mass += float(fbn[torch.unique(out_map[m])].sum())
            for bname in ("running_mean", "running_var"):
                sb = getattr(s.bn, bname, None)
                if sb is not None and f"{t.bn_name}.{bname}" in new_state:
                    new_state[f"{t.bn_name}.{bname}"] = sb.detach().cpu()[out_map].clone().to(tw.device)
            if f"{t.bn_name}.num_batches_tracked" in new_state and s.bn.num_batches_tracked is not None:
                new_state[f"{t.bn_name}.num_batches_tracked"] = s.bn.num_batches_tracked.detach().clone()
        else:
            note = "its BatchNorm keeps its fresh init (no source BatchNorm)"
    return out_map, out_share, transferred, used_mass, src_w_shape, note
