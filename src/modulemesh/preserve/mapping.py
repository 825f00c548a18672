"""Carry a trained model's parameters into a NEW architecture (seed 001 §2.4, seed 000 §3.3B).

``transfer(source, target, fisher, beta=..., tau=...)`` overwrites ``target``'s parameters in place
and returns a ``TransferReport``. How it maps:

1. **Layers are paired by role.** A chain model (the project's ``MLP`` and ``SmallCNN``, or any
   ``nn.Sequential`` of Linear/Conv2d/BatchNorm/ReLU/pool/flatten/dropout) is read as an ordered list
   of conv layers, hidden linear layers and an output layer. Target conv j pairs with source conv j,
   target hidden j with source hidden j, output with output. A layer pair is kept only when the target
   layer reads the same features the source layer reads (same input units, same spatial grid after
   flattening); otherwise the layer is reported as unmapped and so is everything that reads it.
2. **Units are chosen by importance.** Each source unit (row / output channel) gets the Fisher mass of
   its incoming weights, bias, BatchNorm scale/shift and outgoing weights. A *narrower* target keeps
   the most important units; the same choice selects the columns of the next layer, so kept units
   stay connected. A *wider* target keeps every unit and replicates the most important ones
   (Net2WiderNet): each replica copies the incoming weights and the outgoing weights are split among
   the replicas with random shares that sum to one, which preserves the function exactly and, unlike
   an even split, lets the replicas diverge during training.
3. **Extra depth is identity-initialized.** A deeper target (more hidden linear layers) gets its
   extra layers as identities over the last source hidden layer's units; after a ReLU this is exact.
   Extra conv layers have no identity (pooling follows them), so they keep their random init and
   are reported as new.
4. **Selective transfer.** theta' = beta * theta_mapped + (1 - beta) * theta_random, applied to the
   mapped entries whose Fisher exceeds ``tau`` (or the top-q fraction); the others keep the target's
   random init. BatchNorm running statistics of mapped channels are copied.

Each target layer's report gives shapes, the fraction of its parameters set by the transfer
(identity layers count as set), the share of the paired source layer's Fisher mass carried, a
role/shape similarity ``sim`` and the mapping score ``M = sim * I`` (I = the source layer's share
of the model's Fisher mass). Models that are not
chains (e.g. ResNet-18) fall back to copying tensors whose name and shape match, and list the rest.

Files: ``layer_chain`` (reading a model), ``pairing`` (rule 1 and its checks), ``units`` (rule 2's unit
maps, Fisher lookup, beta-mixing), ``layer_map`` (one layer's weights/bias/BatchNorm), this module (the
whole transfer, the by-name fallback), ``transfer_report`` (the report).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
from torch import nn

from ..errors import ModuleMeshError
from .fisher import threshold_for_top_fraction
from .layer_chain import Layer, layer_chain, unwrap
from .layer_map import map_layer
from .pairing import IDENTITY, NEW, check_pair, pair_layers
from .transfer_report import LayerReport, TransferReport
from .units import fisher_for, mix, similarity, unit_importance


def transfer(
    source: nn.Module,
    target: nn.Module,
    fisher: Optional[Mapping[str, torch.Tensor]] = None,
    *,
    beta: float = 1.0,
    tau: Optional[float] = None,
    top_q: Optional[float] = None,
    seed: int = 0,
    input_shape: Optional[tuple[int, ...]] = None,
) -> TransferReport:
    """Overwrite ``target``'s parameters with knowledge mapped from ``source``; return the report.

    ``fisher``: ``fisher_diagonal(source, ...)`` (None = every parameter equally important).
    ``beta``: weight of the mapped value against the target's own random init (1 = pure transfer).
    ``tau``: transfer only entries whose Fisher is > tau (None = every mapped entry).
    ``top_q``: alternatively transfer only the top-q fraction of the source's parameters by Fisher.
    ``seed``: randomness of the replica shares when widening. ``target`` keeps its random init where
    nothing is transferred, so build it with the seed you want for theta_random.
    """
    if not 0.0 <= beta <= 1.0:
        raise ModuleMeshError(
            f"beta must be in [0, 1] (1 = keep the mapped weights, 0 = keep the random init), got {beta}"
        )
    if tau is not None and top_q is not None:
        raise ModuleMeshError("pass either tau (Fisher threshold) or top_q (fraction to keep), not both")
    if tau is not None and tau < 0:
        raise ModuleMeshError(f"tau must be >= 0, got {tau}")
    if top_q is not None:
        if fisher is None:
            raise ModuleMeshError("top_q selection needs the source's Fisher; pass fisher=fisher_diagonal(source, ...)")
        tau = threshold_for_top_fraction(fisher, top_q)
    src_net, src_prefix = unwrap(source)
    tgt_net, _ = unwrap(target)
    src_layers = layer_chain(source, input_shape)
    tgt_layers = layer_chain(target, input_shape)
    gen = torch.Generator().manual_seed(int(seed))
    if src_layers is None or tgt_layers is None:
        return transfer_by_name(src_net, tgt_net, fisher, src_prefix, beta, tau)
    return transfer_chain(src_layers, tgt_layers, tgt_net, fisher, src_prefix, beta, tau, gen)


def transfer_chain(
    src: list[Layer],
    tgt: list[Layer],
    tgt_net: nn.Module,
    fisher,
    prefix: str,
    beta: float,
    tau: Optional[float],
    gen: torch.Generator,
) -> TransferReport:
    """Rules 1-4 of the module doc over two layer chains: pair, check, map each target layer, report."""
    if src[-1].out_units != tgt[-1].out_units:
        raise ModuleMeshError(
            f"the old model has {src[-1].out_units} outputs and the new one {tgt[-1].out_units}; "
            "build the new model for the same classes (num_outputs) as the old one"
        )
    thr = -math.inf if tau is None else tau
    total_mass = 0.0
    layer_mass = []
    for i, s in enumerate(src):
        m = float(fisher_for(fisher, prefix, f"{s.name}.weight", s.module.weight).sum())
        if s.module.bias is not None:
            m += float(fisher_for(fisher, prefix, f"{s.name}.bias", s.module.bias).sum())
        if s.bn is not None and s.bn.weight is not None:
            m += float(
                fisher_for(fisher, prefix, f"{s.bn_name}.weight", s.bn.weight).sum()
                + fisher_for(fisher, prefix, f"{s.bn_name}.bias", s.bn.bias).sum()
            )
        layer_mass.append(m)
        total_mass += m
    importance = [unit_importance(src, i, fisher, prefix) for i in range(len(src))]

    src_reads = [-1] + list(range(len(src) - 1))  # source layer i reads the units of layer i-1
    pairs = pair_layers(src, tgt)
    reports: list[LayerReport] = []
    warnings: list[str] = []
    new_state = {k: v.detach().clone() for k, v in tgt_net.state_dict().items()}
    carried_mass = 0.0
    n_transferred = 0
    n_params = sum(p.numel() for p in tgt_net.parameters())
    # Units of the previous target layer: the source layer whose units they are (-1 = raw input) and the map.
    in_space: Optional[int] = -1
    in_map: Optional[torch.Tensor] = None
    in_share: Optional[torch.Tensor] = None

    for t, (rel, si) in zip(tgt, pairs):
        t_shape = list(t.module.weight.shape)
        s = src[si] if si is not None else None
        ok, note = check_pair(t, s, rel, si, in_space, src, src_reads)
        if not ok:
            reports.append(
                LayerReport(
                    t.name,
                    t.kind,
                    t_shape,
                    s.name if s else None,
                    list(s.module.weight.shape) if s else None,
                    "new" if rel == NEW else "unmapped",
                    0.0,
                    None if s is None else 0.0,
                    0.0,
                    None if s is None else 0.0,
                    note,
                )
            )
            if rel != NEW:
                warnings.append(f"layer {t.name}: {note}")
            in_space, in_map, in_share = None, None, None
            continue
        out_map, out_share, transferred, used_mass, src_w_shape, note = map_layer(
            t, s, rel, importance[si], in_space, in_map, in_share, new_state, fisher, prefix, thr, beta, gen
        )

        t_numel = sum(
            p.numel()
            for p in (t.module.weight, t.module.bias, getattr(t.bn, "weight", None), getattr(t.bn, "bias", None))
            if p is not None
        )
        n_transferred += transferred
        if rel == IDENTITY:
            relation, mass, sim, score = IDENTITY, None, 1.0, None
            note = note or f"identity over {s.name}'s units (function-preserving after ReLU)"
        else:
            dims = [(t.out_units, s.out_units), (t.in_units, s.in_units)]
            if all(a == b for a, b in dims):
                relation = "copied"
            elif all(a <= b for a, b in dims):
                relation = "narrowed"
            elif all(a >= b for a, b in dims):
                relation = "widened"
            else:
                relation = "resized"  # narrower on one side, wider on the other
            mass = used_mass / layer_mass[si] if layer_mass[si] > 0 else 0.0
            carried_mass += used_mass
            sim = similarity(t, tuple(s.module.weight.shape))
            score = sim * (layer_mass[si] / total_mass if total_mass > 0 else 0.0)
        reports.append(
            LayerReport(
                t.name,
                t.kind,
                t_shape,
                s.name,
                src_w_shape,
                relation,
                transferred / max(t_numel, 1),
                mass,
                sim,
                score,
                note,
            )
        )
        in_space = in_space if rel == IDENTITY else si
        in_map, in_share = out_map, out_share

    for i, s in enumerate(src):
        if i not in {si for rel, si in pairs if rel == "copy"}:
            warnings.append(
                f"source layer {s.name} ({'x'.join(map(str, s.module.weight.shape))}) has no counterpart "
                "in the new model; its knowledge is not transferred"
            )
    tgt_net.load_state_dict(new_state)
    return TransferReport(
        reports,
        beta,
        tau,
        "chain",
        n_transferred / max(n_params, 1),
        carried_mass / total_mass if total_mass > 0 else 0.0,
        warnings,
    )


def transfer_by_name(
    src_net: nn.Module, tgt_net: nn.Module, fisher, prefix: str, beta: float, tau: Optional[float]
) -> TransferReport:
    """Fallback for models that are not chains: copy tensors whose name and shape match."""
    thr = -math.inf if tau is None else tau
    src_state = src_net.state_dict()
    src_params = dict(src_net.named_parameters())
    new_state = {k: v.detach().clone() for k, v in tgt_net.state_dict().items()}
    param_names = {k for k, _ in tgt_net.named_parameters()}
    reports, warnings = [], []
    total_mass = sum(float(fisher_for(fisher, prefix, k, v).sum()) for k, v in src_params.items())
    carried = 0.0
    n_transferred = 0
    for k, v in new_state.items():
        s = src_state.get(k)
        if s is None or s.shape != v.shape:
            why = "no tensor of this name in the old model" if s is None else f"shape {tuple(s.shape)} in the old model"
            if k in param_names:
                reports.append(
                    LayerReport(
                        k,
                        "tensor",
                        list(v.shape),
                        k if s is not None else None,
                        list(s.shape) if s is not None else None,
                        "unmapped",
                        0.0,
                        None,
                        0.0,
                        None,
                        why,
                    )
                )
                warnings.append(f"{k}: {why}; keeps its random init (width changes of non-chain models are not mapped)")
            continue
        if k not in param_names:
            new_state[k] = s.detach().clone().to(v.device)  # buffers (BN statistics) are copied as they are
            continue
        f = fisher_for(fisher, prefix, k, src_params[k])
        mask = f > thr
        new_state[k] = mix(s.detach().float().cpu(), v.cpu(), mask, beta).to(v.device)
        n_transferred += int(mask.sum())
        used = float(f[mask].sum())
        carried += used
        fm = float(f.sum())
        reports.append(
            LayerReport(
                k,
                "tensor",
                list(v.shape),
                k,
                list(s.shape),
                "copied",
                float(mask.float().mean()),
                used / fm if fm > 0 else 0.0,
                1.0,
                fm / total_mass if total_mass > 0 else 0.0,
            )
        )
    tgt_net.load_state_dict(new_state)
    n_params = sum(p.numel() for p in tgt_net.parameters())
    return TransferReport(
        reports,
        beta,
        tau,
        "by-name",
        n_transferred / max(n_params, 1),
        carried / total_mass if total_mass > 0 else 0.0,
        warnings,
    )


@torch.no_grad()
def fit_output_layer(
    model: nn.Module, x: torch.Tensor, teacher_logits: torch.Tensor, ridge: float = 1e-3, batch_size: int = 2048
) -> float:
    """Refit ``model``'s last Linear layer by ridge least squares so that ``model(x)`` matches the
    (per-row centred) ``teacher_logits``; returns the relative residual of the fit.

    For the case the Fisher mapping cannot cover: a shallower new model whose output layer reads
    different features than the old one's. This is data-driven (it uses the old model's outputs,
    not its output weights) and is an addition to the seeds' protocol, so ``upgrade`` only does it
    when ``transfer.fit_unmapped_output`` is set.
    """
    from ..data.scenarios import as_float

    net, _ = unwrap(model)
    last = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ModuleMeshError("fit_output_layer needs a model whose last layer is nn.Linear")
    last = last[-1]
    if teacher_logits.shape != (x.shape[0], last.out_features):
        raise ModuleMeshError(
            f"teacher_logits must be ({x.shape[0]}, {last.out_features}), got {tuple(teacher_logits.shape)}"
        )
    feats: list[torch.Tensor] = []
    hook = last.register_forward_hook(lambda mod, inp, out: feats.append(inp[0].detach().double().cpu()))
    was_training = net.training
    net.eval()
    try:
        device = last.weight.device
        for i in range(0, x.shape[0], batch_size):
            net(as_float(x[i : i + batch_size].to(device)))
    finally:
        hook.remove()
        net.train(was_training)
    h = torch.cat(feats)
    h1 = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], 1)
    z = teacher_logits.double().cpu()
    z = z - z.mean(1, keepdim=True)  # softmax ignores a per-row shift
    reg = ridge * h.shape[0] * torch.eye(h1.shape[1], dtype=h.dtype)
    reg[-1, -1] = 0.0  # do not shrink the bias
    w = torch.linalg.pinv(h1.T @ h1 + reg, hermitian=True) @ (h1.T @ z)  # pinv: dead ReLU units give zero columns
    last.weight.copy_(w[:-1].T.to(last.weight.dtype))
    last.bias.copy_(w[-1].to(last.bias.dtype))
    return float((h1 @ w - z).pow(2).sum() / z.pow(2).sum().clamp_min(1e-12))


__all__ = [
    "transfer",
    "transfer_chain",
    "transfer_by_name",
    "fit_output_layer",
    "TransferReport",
    "LayerReport",
    "layer_chain",
]
