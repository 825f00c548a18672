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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..errors import ModuleMeshError
from .fisher import threshold_for_top_fraction

_PASS_THROUGH = (nn.ReLU, nn.Flatten, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity)
_NEW, _IDENTITY = "new", "identity"


# ----------------------------------------------------------------------------- report


@dataclass
class LayerReport:
    target: str
    kind: str
    target_shape: list[int]
    source: Optional[str]
    source_shape: Optional[list[int]]
    relation: str  # copied | narrowed | widened | resized | identity | new | unmapped
    fraction_transferred: float
    importance_mass_carried: Optional[float]
    similarity: float
    score: Optional[float]
    note: str = ""


@dataclass
class TransferReport:
    layers: list[LayerReport]
    beta: float
    tau: Optional[float]
    mode: str  # "chain" or "by-name"
    fraction_transferred: float = 0.0
    importance_mass_carried: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        head = "| target layer | shape | source layer | source shape | relation | transferred | Fisher mass carried | sim | M = sim*I |\n"
        head += "|---|---|---|---|---|---|---|---|---|\n"
        rows = []
        for r in self.layers:
            mass = "n/a" if r.importance_mass_carried is None else f"{r.importance_mass_carried:.1%}"
            score = "n/a" if r.score is None else f"{r.score:.3f}"
            rows.append(
                f"| {r.target} | {'x'.join(map(str, r.target_shape))} | {r.source or '-'} | "
                f"{'x'.join(map(str, r.source_shape)) if r.source_shape else '-'} | {r.relation} | "
                f"{r.fraction_transferred:.1%} | {mass} | {r.similarity:.2f} | {score} |"
            )
        tail = (
            f"\nOverall: {self.fraction_transferred:.1%} of the new model's parameters transferred, carrying "
            f"{self.importance_mass_carried:.1%} of the old model's Fisher mass (beta={self.beta}, tau={self.tau}, mode={self.mode}).\n"
        )
        notes = [f"- {r.target}: {r.note}" for r in self.layers if r.note]
        notes += [f"- warning: {w}" for w in self.warnings if not w.startswith("layer ")]
        return head + "\n".join(rows) + "\n" + tail + ("\n" + "\n".join(notes) + "\n" if notes else "")


# ----------------------------------------------------------------------------- reading a model


@dataclass
class _Layer:
    name: str
    kind: str  # "linear" | "conv"
    module: nn.Module
    bn_name: Optional[str] = None
    bn: Optional[nn.Module] = None
    section: str = ""  # "conv" | "hidden" | "output"
    in_shape: tuple[int, ...] = ()
    grid: int = 1  # for a linear layer that reads flattened conv features: positions per channel

    @property
    def out_units(self) -> int:
        return self.module.weight.shape[0]

    @property
    def in_units(self) -> int:
        return self.module.weight.shape[1]


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    net = getattr(model, "net", None)
    if isinstance(net, nn.Module) and not isinstance(model, nn.Sequential):
        return net, "net."
    return model, ""


def _input_shape(net: nn.Module, layers: list[_Layer]) -> Optional[tuple[int, ...]]:
    shape = getattr(net, "input_shape", None)
    if shape is not None:
        return tuple(int(s) for s in shape)
    if layers and layers[0].kind == "linear":
        return (layers[0].in_units,)
    return None


def layer_chain(model: nn.Module, input_shape: Optional[tuple[int, ...]] = None) -> Optional[list[_Layer]]:
    """The model's Linear/Conv2d layers in execution order, or None if it is not a plain chain."""
    from ..mesh.backbones import MLP, SmallCNN

    net, _ = _unwrap(model)
    if not isinstance(net, (MLP, SmallCNN, nn.Sequential)):
        return None
    layers: list[_Layer] = []
    for name, m in net.named_modules():
        if name == "" or any(True for _ in m.children()):
            continue
        if isinstance(m, nn.Linear):
            layers.append(_Layer(name, "linear", m))
        elif isinstance(m, nn.Conv2d):
            if m.groups != 1:
                return None
            layers.append(_Layer(name, "conv", m))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not layers or layers[-1].bn is not None or layers[-1].out_units != m.num_features:
                return None
            layers[-1].bn_name, layers[-1].bn = name, m
        elif not isinstance(m, _PASS_THROUGH):
            return None
    if not layers or layers[-1].kind != "linear":
        return None
    # Execution order must be conv* then linear+ for the pairing rules to hold.
    kinds = [l.kind for l in layers]
    if "conv" in kinds[kinds.index("linear") :]:
        return None
    shape = input_shape or _input_shape(net, layers)
    if shape is None:
        return None
    seen: dict[str, tuple[int, ...]] = {}
    hooks = [l.module.register_forward_hook(lambda mod, inp, out, n=l.name: seen.__setitem__(n, tuple(inp[0].shape[1:]))) for l in layers]
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            p = next(net.parameters())
            net(torch.zeros((1, *shape), dtype=p.dtype, device=p.device))
    except RuntimeError as e:
        raise ModuleMeshError(f"model does not accept inputs of shape {shape}: {e}") from None
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    linears = [l for l in layers if l.kind == "linear"]
    for l in layers:
        l.in_shape = seen.get(l.name, ())
        l.section = "conv" if l.kind == "conv" else ("output" if l is linears[-1] else "hidden")
    for prev, l in zip(layers, layers[1:]):
        if l.kind == "linear" and prev.kind == "conv":
            if l.in_units % prev.out_units:
                return None
            l.grid = l.in_units // prev.out_units
    return layers


# ----------------------------------------------------------------------------- helpers


def _fisher_for(fisher: Optional[Mapping[str, torch.Tensor]], prefix: str, name: str, like: torch.Tensor) -> torch.Tensor:
    if fisher is None:
        return torch.ones_like(like, dtype=torch.float32, device="cpu")
    for key in (prefix + name, name, "net." + name):
        if key in fisher:
            f = fisher[key].detach().float().cpu()
            if f.shape != like.shape:
                raise ModuleMeshError(f"Fisher entry {key!r} has shape {tuple(f.shape)} but the parameter is {tuple(like.shape)}; compute the Fisher on the source model")
            return f
    raise ModuleMeshError(f"the Fisher dict has no entry for source parameter {name!r}; compute it with fisher_diagonal(source_model, ...)")


def _unit_importance(layers: list[_Layer], idx: int, fisher, prefix: str) -> torch.Tensor:
    """Fisher mass of each output unit of layers[idx]: incoming weights, bias, BN, outgoing weights."""
    l = layers[idx]
    w = l.module.weight
    imp = _fisher_for(fisher, prefix, f"{l.name}.weight", w).reshape(w.shape[0], -1).sum(1)
    if l.module.bias is not None:
        imp = imp + _fisher_for(fisher, prefix, f"{l.name}.bias", l.module.bias)
    if l.bn is not None and l.bn.weight is not None:
        imp = imp + _fisher_for(fisher, prefix, f"{l.bn_name}.weight", l.bn.weight)
        imp = imp + _fisher_for(fisher, prefix, f"{l.bn_name}.bias", l.bn.bias)
    if idx + 1 < len(layers):
        nxt = layers[idx + 1]
        fw = _fisher_for(fisher, prefix, f"{nxt.name}.weight", nxt.module.weight)
        fw = fw.reshape(fw.shape[0], l.out_units, -1)  # (out_next, units, positions * kernel)
        imp = imp + fw.sum(dim=(0, 2))
    return imp


def _unit_map(importance: torch.Tensor, width: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
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


def _expand_columns(unit_map: torch.Tensor, share: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel maps -> flattened-feature maps (channel c, position p -> feature c * grid + p)."""
    if grid == 1:
        return unit_map, share
    pos = torch.arange(grid)
    cols = torch.where(unit_map[:, None] >= 0, unit_map[:, None] * grid + pos[None, :], -1).reshape(-1)
    return cols, share.repeat_interleave(grid)


def _similarity(t: _Layer, s_shape: tuple[int, ...]) -> float:
    tw = tuple(t.module.weight.shape)
    sim = min(tw[0], s_shape[0]) / max(tw[0], s_shape[0]) * min(tw[1], s_shape[1]) / max(tw[1], s_shape[1])
    return float(sim)


# ----------------------------------------------------------------------------- transfer


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
        raise ModuleMeshError(f"beta must be in [0, 1] (1 = keep the mapped weights, 0 = keep the random init), got {beta}")
    if tau is not None and top_q is not None:
        raise ModuleMeshError("pass either tau (Fisher threshold) or top_q (fraction to keep), not both")
    if tau is not None and tau < 0:
        raise ModuleMeshError(f"tau must be >= 0, got {tau}")
    if top_q is not None:
        if fisher is None:
            raise ModuleMeshError("top_q selection needs the source's Fisher; pass fisher=fisher_diagonal(source, ...)")
        tau = threshold_for_top_fraction(fisher, top_q)
    src_net, src_prefix = _unwrap(source)
    tgt_net, _ = _unwrap(target)
    src_layers = layer_chain(source, input_shape)
    tgt_layers = layer_chain(target, input_shape)
    gen = torch.Generator().manual_seed(int(seed))
    if src_layers is None or tgt_layers is None:
        return _transfer_by_name(src_net, tgt_net, fisher, src_prefix, beta, tau)
    return _transfer_chain(src_layers, tgt_layers, tgt_net, fisher, src_prefix, beta, tau, gen)


def _mix(mapped: torch.Tensor, random: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    mapped = mapped.to(random.dtype)
    return torch.where(mask, beta * mapped + (1.0 - beta) * random, random)


def _transfer_chain(src: list[_Layer], tgt: list[_Layer], tgt_net: nn.Module, fisher, prefix: str, beta: float, tau: Optional[float], gen) -> TransferReport:
    if src[-1].out_units != tgt[-1].out_units:
        raise ModuleMeshError(
            f"the old model has {src[-1].out_units} outputs and the new one {tgt[-1].out_units}; "
            "build the new model for the same classes (num_outputs) as the old one"
        )
    thr = -math.inf if tau is None else tau
    total_mass = 0.0
    layer_mass = []
    for i, s in enumerate(src):
        m = float(_fisher_for(fisher, prefix, f"{s.name}.weight", s.module.weight).sum())
        if s.module.bias is not None:
            m += float(_fisher_for(fisher, prefix, f"{s.name}.bias", s.module.bias).sum())
        if s.bn is not None and s.bn.weight is not None:
            m += float(_fisher_for(fisher, prefix, f"{s.bn_name}.weight", s.bn.weight).sum() + _fisher_for(fisher, prefix, f"{s.bn_name}.bias", s.bn.bias).sum())
        layer_mass.append(m)
        total_mass += m
    importance = [_unit_importance(src, i, fisher, prefix) for i in range(len(src))]

    # Pair target layers with source layers (index), the identity over a source layer's units, or nothing.
    s_conv = [i for i, l in enumerate(src) if l.section == "conv"]
    s_hidden = [i for i, l in enumerate(src) if l.section == "hidden"]
    pairs: list[tuple[str, Optional[int]]] = []
    n_conv = n_hidden = 0
    for t in tgt:
        if t.section == "conv":
            pairs.append(("copy", s_conv[n_conv]) if n_conv < len(s_conv) else (_NEW, None))
            n_conv += 1
        elif t.section == "hidden":
            if n_hidden < len(s_hidden):
                pairs.append(("copy", s_hidden[n_hidden]))
            elif s_hidden:
                pairs.append((_IDENTITY, s_hidden[-1]))
            else:
                pairs.append((_NEW, None))
            n_hidden += 1
        else:
            pairs.append(("copy", len(src) - 1))

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
    src_reads = [-1] + list(range(len(src) - 1))  # source layer i reads the units of layer i-1

    for ti, (t, (rel, si)) in enumerate(zip(tgt, pairs)):
        tw = t.module.weight
        t_shape = list(tw.shape)
        note = ""
        ok = rel != _NEW and in_space is not None
        s = src[si] if si is not None else None
        if rel == _NEW:
            note = "no source layer of this role; keeps its random init" + (" (conv layers are followed by pooling, so there is no identity to insert)" if t.kind == "conv" else "")
        elif in_space is None:
            note = "its inputs come from a layer that was not transferred, so its weights cannot be mapped"
        elif rel == "copy":
            expected = src_reads[si]
            if in_space != expected:
                ok = False
                got = "the raw input" if in_space == -1 else f"source layer {src[in_space].name}'s units"
                want = "the raw input" if expected == -1 else f"source layer {src[expected].name}'s units"
                note = f"reads {got} but the paired source layer {s.name} reads {want}; not mapped (the models differ in depth or layer types here)"
            elif t.kind != s.kind:
                ok = False
                note = f"cannot map a {s.kind} layer into a {t.kind} layer"
            elif t.kind == "conv" and (tw.shape[2:] != s.module.weight.shape[2:] or t.module.stride != s.module.stride or t.module.padding != s.module.padding or t.module.dilation != s.module.dilation):
                ok = False
                note = f"kernel/stride/padding differ ({tuple(s.module.weight.shape[2:])}, stride {s.module.stride} -> {tuple(tw.shape[2:])}, stride {t.module.stride}); not mapped"
            elif t.grid != s.grid:
                ok = False
                note = f"reads a flattened {t.grid}-position grid per channel but the source reads {s.grid}; not mapped (conv depth or input size differs)"
            elif in_space == -1 and t.in_shape != s.in_shape:
                ok = False
                note = f"input shape {t.in_shape} differs from the source's {s.in_shape}; not mapped"
        elif rel == _IDENTITY and (t.kind != "linear" or in_space != si):
            ok = False
            note = "no identity over the previous layer's units exists here; keeps its random init"

        if not ok:
            reports.append(LayerReport(t.name, t.kind, t_shape, s.name if s else None, list(s.module.weight.shape) if s else None,
                                       "new" if rel == _NEW else "unmapped", 0.0, None if s is None else 0.0, 0.0, None if s is None else 0.0, note))
            if rel != _NEW:
                warnings.append(f"layer {t.name}: {note}")
            in_space, in_map, in_share = None, None, None
            continue

        # Output-unit map of this target layer.
        if t.section == "output":
            out_map, out_share = torch.arange(t.out_units), torch.ones(t.out_units)
        else:
            out_map, out_share = _unit_map(importance[si], t.out_units, gen)
        # Input-column map from the previous layer's units.
        if in_space == -1:
            cols, share = torch.arange(t.in_units), torch.ones(t.in_units)
        else:
            cols, share = _expand_columns(in_map, in_share, t.grid)
        col_ok = cols >= 0
        colc = cols.clamp(min=0)
        extra_dims = (1,) * (tw.dim() - 2)
        col_scale = share.view(1, -1, *extra_dims)

        if rel == _IDENTITY:
            w_map = (out_map[:, None] == colc[None, :]).float() * col_scale
            f_map = torch.full(tw.shape, math.inf)
            src_w_shape = [s.out_units, s.out_units]
            b_map = torch.zeros(t.out_units)
            fb_map = torch.full((t.out_units,), math.inf)
        else:
            sw = s.module.weight.detach().float().cpu()
            w_map = sw[out_map][:, colc] * col_scale
            f_src = _fisher_for(fisher, prefix, f"{s.name}.weight", s.module.weight)
            f_map = f_src[out_map][:, colc]
            src_w_shape = list(sw.shape)
        mask_w = (f_map > thr) & col_ok.view(1, -1, *extra_dims)
        new_state[f"{t.name}.weight"] = _mix(w_map, new_state[f"{t.name}.weight"].cpu(), mask_w, beta).to(tw.device)
        transferred = int(mask_w.sum())
        used_mass = 0.0
        if rel != _IDENTITY:
            used = torch.zeros_like(f_src, dtype=torch.bool)
            idx = mask_w.nonzero(as_tuple=True)
            used[(out_map[idx[0]], colc[idx[1]], *idx[2:])] = True
            used_mass += float(f_src[used].sum())

        if t.module.bias is not None:
            if rel == _IDENTITY:
                bmask = fb_map > thr
                b_new = _mix(b_map, new_state[f"{t.name}.bias"].cpu(), bmask, beta)
            elif s.module.bias is not None:
                fb = _fisher_for(fisher, prefix, f"{s.name}.bias", s.module.bias)
                bmask = fb[out_map] > thr
                b_new = _mix(s.module.bias.detach().float().cpu()[out_map], new_state[f"{t.name}.bias"].cpu(), bmask, beta)
                used_mass += float(fb[torch.unique(out_map[bmask])].sum())
            else:
                bmask = torch.zeros(t.out_units, dtype=torch.bool)
                b_new = new_state[f"{t.name}.bias"].cpu()
            new_state[f"{t.name}.bias"] = b_new.to(tw.device)
            transferred += int(bmask.sum())

        if t.bn is not None:
            if rel != _IDENTITY and s.bn is not None and type(s.bn) is type(t.bn):
                for pname in ("weight", "bias"):
                    if getattr(t.bn, pname, None) is None or getattr(s.bn, pname, None) is None:
                        continue
                    fbn = _fisher_for(fisher, prefix, f"{s.bn_name}.{pname}", getattr(s.bn, pname))
                    m = fbn[out_map] > thr
                    key = f"{t.bn_name}.{pname}"
                    new_state[key] = _mix(getattr(s.bn, pname).detach().float().cpu()[out_map], new_state[key].cpu(), m, beta).to(tw.device)
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

        t_numel = sum(p.numel() for p in (t.module.weight, t.module.bias, getattr(t.bn, "weight", None), getattr(t.bn, "bias", None)) if p is not None)
        n_transferred += transferred
        if rel == _IDENTITY:
            relation, mass, sim, score = _IDENTITY, None, 1.0, None
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
            sim = _similarity(t, tuple(s.module.weight.shape))
            score = sim * (layer_mass[si] / total_mass if total_mass > 0 else 0.0)
        reports.append(LayerReport(t.name, t.kind, t_shape, s.name, src_w_shape, relation, transferred / max(t_numel, 1), mass, sim, score, note))
        in_space = in_space if rel == _IDENTITY else si
        in_map, in_share = out_map, out_share

    for i, s in enumerate(src):
        if i not in {si for rel, si in pairs if rel == "copy"}:
            warnings.append(f"source layer {s.name} ({'x'.join(map(str, s.module.weight.shape))}) has no counterpart in the new model; its knowledge is not transferred")
    tgt_net.load_state_dict(new_state)
    return TransferReport(reports, beta, tau, "chain", n_transferred / max(n_params, 1), carried_mass / total_mass if total_mass > 0 else 0.0, warnings)


def _transfer_by_name(src_net: nn.Module, tgt_net: nn.Module, fisher, prefix: str, beta: float, tau: Optional[float]) -> TransferReport:
    """Fallback for models that are not chains: copy tensors whose name and shape match."""
    thr = -math.inf if tau is None else tau
    src_state = src_net.state_dict()
    src_params = dict(src_net.named_parameters())
    new_state = {k: v.detach().clone() for k, v in tgt_net.state_dict().items()}
    param_names = {k for k, _ in tgt_net.named_parameters()}
    reports, warnings = [], []
    total_mass = sum(float(_fisher_for(fisher, prefix, k, v).sum()) for k, v in src_params.items())
    carried = 0.0
    n_transferred = 0
    for k, v in new_state.items():
        s = src_state.get(k)
        if s is None or s.shape != v.shape:
            why = "no tensor of this name in the old model" if s is None else f"shape {tuple(s.shape)} in the old model"
            if k in param_names:
                reports.append(LayerReport(k, "tensor", list(v.shape), k if s is not None else None, list(s.shape) if s is not None else None, "unmapped", 0.0, None, 0.0, None, why))
                warnings.append(f"{k}: {why}; keeps its random init (width changes of non-chain models are not mapped)")
            continue
        if k not in param_names:
            new_state[k] = s.detach().clone().to(v.device)  # buffers (BN statistics) are copied as they are
            continue
        f = _fisher_for(fisher, prefix, k, src_params[k])
        mask = f > thr
        new_state[k] = _mix(s.detach().float().cpu(), v.cpu(), mask, beta).to(v.device)
        n_transferred += int(mask.sum())
        used = float(f[mask].sum())
        carried += used
        fm = float(f.sum())
        reports.append(LayerReport(k, "tensor", list(v.shape), k, list(s.shape), "copied", float(mask.float().mean()), used / fm if fm > 0 else 0.0, 1.0, fm / total_mass if total_mass > 0 else 0.0))
    tgt_net.load_state_dict(new_state)
    n_params = sum(p.numel() for p in tgt_net.parameters())
    return TransferReport(reports, beta, tau, "by-name", n_transferred / max(n_params, 1), carried / total_mass if total_mass > 0 else 0.0, warnings)


@torch.no_grad()
def fit_output_layer(model: nn.Module, x: torch.Tensor, teacher_logits: torch.Tensor, ridge: float = 1e-3, batch_size: int = 2048) -> float:
    """Refit ``model``'s last Linear layer by ridge least squares so that ``model(x)`` matches the
    (per-row centred) ``teacher_logits``; returns the relative residual of the fit.

    For the case the Fisher mapping cannot cover: a shallower new model whose output layer reads
    different features than the old one's. This is data-driven (it uses the old model's outputs,
    not its output weights) and is an addition to the seeds' protocol, so ``upgrade`` only does it
    when ``transfer.fit_unmapped_output`` is set.
    """
    from ..data.scenarios import as_float

    net, _ = _unwrap(model)
    last = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ModuleMeshError("fit_output_layer needs a model whose last layer is nn.Linear")
    last = last[-1]
    if teacher_logits.shape != (x.shape[0], last.out_features):
        raise ModuleMeshError(f"teacher_logits must be ({x.shape[0]}, {last.out_features}), got {tuple(teacher_logits.shape)}")
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


__all__ = ["transfer", "fit_output_layer", "TransferReport", "LayerReport", "layer_chain"]
