"""Networks for module-to-module distillation: token models that can be cut into modules.

Every model here is a *token network*: ``embed`` (patch embedding + position) -> ``blocks``
(transformer blocks over the token sequence) -> ``head`` (LayerNorm, mean over tokens, Linear).
Specs are plain dicts so they live in YAML configs and module manifests:

    {"type": "vit", "dim": 64, "depth": 4, "heads": 4, "mlp_ratio": 2.0, "patch": 7}
    {"type": "moe_vit", "dim": 48, "depth": 4, "heads": 4, "experts": 4, "k": 2, "moe_every": 1}

``moe_vit`` replaces the MLP of every ``moe_every``-th block by a token-level mixture of experts:
a linear gate, softmax, the top-k mask of ``modulemesh.mesh.routers.topk_mask`` and sparse dispatch
(only the selected experts run on a token), plus the Switch-Transformer load-balancing loss.

Cutting (``cut``) splits the blocks into K consecutive groups, the first group keeping the embedding
and the last the head (as in Deep Incubation), so module 0 reads images and module K-1 writes
logits. The pieces share the network's parameters: running them in order *is* the network.
``Stitch`` (LayerNorm + Linear) adapts widths where a module meets a model of another width;
``Hybrid`` runs ``meta[:i] + module_i + meta[i+1:]``; ``ModularNet`` is the assembled student.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..mesh.routers import topk_mask

MODEL_TYPES = ("vit", "moe_vit")
_COMMON = {"type", "dim", "depth", "heads", "mlp_ratio", "patch"}
_MOE = {"experts", "k", "moe_every", "expert_ratio"}
_KEYS = {"vit": _COMMON, "moe_vit": _COMMON | _MOE}
_INT_KEYS = {"dim", "depth", "heads", "patch", "experts", "k", "moe_every"}
_FLOAT_KEYS = {"mlp_ratio", "expert_ratio"}


# ----------------------------------------------------------------------------- specs


def parse_spec(text: str | Mapping[str, Any]) -> dict[str, Any]:
    """``"vit:dim=64,depth=4"``, a YAML mapping ``"{type: vit, dim: 64}"`` or a dict -> checked spec dict."""
    import yaml

    if isinstance(text, Mapping):
        raw: dict[str, Any] = dict(text)
    else:
        s = str(text).strip()
        if s.startswith("{"):
            try:
                raw = yaml.safe_load(s)
            except yaml.YAMLError as e:
                raise ConfigError(f"model spec {s!r} is not a valid YAML mapping ({str(e).splitlines()[0]})") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"model spec {s!r} must be a mapping like {{type: vit, dim: 64}}")
        else:
            kind, _, rest = s.partition(":")
            raw = {"type": kind.strip()}
            for item in filter(None, (p.strip() for p in rest.split(","))):
                key, eq, value = item.partition("=")
                if not eq or not key.strip():
                    raise ConfigError(f"model spec {s!r}: expected key=value after the type, e.g. vit:dim=64,depth=4; got {item!r}")
                try:
                    raw[key.strip()] = yaml.safe_load(value)
                except yaml.YAMLError:
                    raw[key.strip()] = value
    return check_spec(raw)


def looks_like_spec(text: str) -> bool:
    """True when ``text`` names a model spec (``vit``, ``moe_vit:...``, ``{type: ...}``) rather than a path."""
    s = str(text).strip()
    return s.startswith("{") or s.split(":", 1)[0].strip() in MODEL_TYPES


def check_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    kind = spec.get("type")
    if kind not in _KEYS:
        raise ConfigError(f"unknown model type {kind!r}; choose one of {', '.join(MODEL_TYPES)} (e.g. vit:dim=64,depth=4)")
    unknown = sorted(set(spec) - _KEYS[kind])
    if unknown:
        raise ConfigError(f"model spec for {kind!r} has unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(_KEYS[kind]))}")
    out: dict[str, Any] = {"type": kind, "dim": 64, "depth": 4, "heads": 4, "mlp_ratio": 2.0, "patch": None}
    if kind == "moe_vit":
        out.update(experts=4, k=2, moe_every=1, expert_ratio=None)
    out.update(spec)
    for key in _INT_KEYS & set(out):
        v = out[key]
        if v is None and key == "patch":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"model spec {kind}: {key} must be a positive integer, got {v!r}")
    for key in _FLOAT_KEYS & set(out):
        v = out[key]
        if v is None and key == "expert_ratio":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ConfigError(f"model spec {kind}: {key} must be a positive number, got {v!r}")
        out[key] = float(v)
    if out["dim"] % out["heads"]:
        raise ConfigError(f"model spec {kind}: dim {out['dim']} is not divisible by heads {out['heads']}")
    if kind == "moe_vit" and out["k"] > out["experts"]:
        raise ConfigError(f"model spec moe_vit: k={out['k']} is larger than experts={out['experts']}")
    return out


def auto_patch(input_shape: Sequence[int]) -> int:
    """About a 4x4 grid of patches: 7 for 28x28, 8 for 32x32, 2 for 8x8."""
    return max(1, math.ceil(min(input_shape[-2:]) / 4))


def resolve_spec(spec: Mapping[str, Any], input_shape: Sequence[int]) -> dict[str, Any]:
    """Fill ``patch`` (auto) for ``input_shape``; image inputs (C, H, W) are required."""
    spec = check_spec(spec)
    if len(input_shape) != 3:
        raise ConfigError(f"{spec['type']} needs image inputs (channels, height, width); the data has samples of shape {tuple(input_shape)}")
    if spec["patch"] is None:
        spec["patch"] = auto_patch(input_shape)
    return spec


def token_grid(spec: Mapping[str, Any], input_shape: Sequence[int]) -> tuple[int, int]:
    p = spec["patch"] or auto_patch(input_shape)
    return math.ceil(input_shape[-2] / p), math.ceil(input_shape[-1] / p)


# ----------------------------------------------------------------------------- layers


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens (B, T, dim): a learned position embedding, then LayerNorm.

    Images whose side is not a multiple of the patch are zero-padded on the bottom/right. (The
    LayerNorm and PyTorch's default Linear init made small ViTs learn MNIST about twice as fast
    in short runs as the usual truncated-normal(0.02) init without it.)
    """

    def __init__(self, input_shape: Sequence[int], dim: int, patch: int):
        super().__init__()
        c, h, w = input_shape
        self.input_shape, self.patch = tuple(input_shape), patch
        self.grid = (math.ceil(h / patch), math.ceil(w / patch))
        self.proj = nn.Conv2d(c, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, self.grid[0] * self.grid[1], dim) * 0.02)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], *self.input_shape)
        ph, pw = self.grid[0] * self.patch - x.shape[-2], self.grid[1] * self.patch - x.shape[-1]
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        return self.norm(self.proj(x).flatten(2).transpose(1, 2) + self.pos)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class MoEFeedForward(nn.Module):
    """Token-level top-k mixture of ``experts`` feed-forward experts.

    Gate probabilities ``softmax(W x)`` are masked to the top k with ``topk_mask`` (renormalized for
    k > 1; at k = 1 the kept weight is the raw probability, as in Switch, so the gate still learns);
    each expert runs only on the tokens routed to it. ``aux_loss`` holds the load-balancing term
    ``E * sum_e f_e * P_e`` of the last forward (f: share of routed tokens, P: mean gate probability).
    """

    def __init__(self, dim: int, hidden: int, experts: int, k: int):
        super().__init__()
        self.k = k
        self.gate = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(dim, hidden) for _ in range(experts))
        self.aux_loss: Optional[torch.Tensor] = None
        self.last_load: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(flat), dim=-1)
        weights = topk_mask(probs, self.k, renormalize=self.k > 1)
        routed = weights > 0
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            idx = routed[:, e].nonzero().squeeze(1)
            if idx.numel():
                out.index_add_(0, idx, expert(flat[idx]) * weights[idx, e : e + 1])
        load = routed.float().mean(0) / self.k
        self.last_load = load.detach()
        self.aux_loss = len(self.experts) * (load * probs.mean(0)).sum()
        return out.view(shape)


class Block(nn.Module):
    """Pre-norm transformer block; ``ffn`` is an MLP or a mixture of experts."""

    def __init__(self, dim: int, heads: int, ffn: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class Head(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x).mean(1))


class TokenNet(nn.Module):
    """``head(blocks(embed(x)))``; built by :func:`build_net` from a spec."""

    def __init__(self, spec: Mapping[str, Any], input_shape: Sequence[int], num_classes: int):
        super().__init__()
        spec = resolve_spec(spec, input_shape)
        self.spec, self.input_shape, self.num_classes = spec, tuple(input_shape), num_classes
        dim, hidden = spec["dim"], max(1, round(spec["dim"] * spec["mlp_ratio"]))
        self.embed = PatchEmbed(input_shape, dim, spec["patch"])
        blocks = []
        for j in range(spec["depth"]):
            if spec["type"] == "moe_vit" and j % spec["moe_every"] == spec["moe_every"] - 1:
                ratio = spec["expert_ratio"] or spec["mlp_ratio"]
                ffn: nn.Module = MoEFeedForward(dim, max(1, round(dim * ratio)), spec["experts"], spec["k"])
            else:
                ffn = FeedForward(dim, hidden)
            blocks.append(Block(dim, spec["heads"], ffn))
        self.blocks = nn.ModuleList(blocks)
        self.head = Head(dim, num_classes)

    @property
    def dim(self) -> int:
        return int(self.spec["dim"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def build_net(spec: Mapping[str, Any], input_shape: Sequence[int], num_classes: int) -> TokenNet:
    return TokenNet(spec, input_shape, num_classes)


# ----------------------------------------------------------------------------- cutting


def block_ranges(depth: int, k: int, what: str = "the model") -> list[tuple[int, int]]:
    """Split ``depth`` blocks into ``k`` consecutive groups (sizes differ by at most one, earlier larger)."""
    if k < 1:
        raise ConfigError(f"the number of modules must be >= 1, got {k}")
    if k > depth:
        raise ConfigError(f"cannot cut {what} into {k} modules: it has only {depth} transformer blocks; use --modules {depth} or fewer")
    base, extra = divmod(depth, k)
    out, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        out.append((start, start + size))
        start += size
    return out


class Segment(nn.Module):
    """Consecutive blocks of a TokenNet; the first segment has the embedding, the last the head."""

    def __init__(self, blocks: Sequence[nn.Module], embed: Optional[nn.Module] = None, head: Optional[nn.Module] = None):
        super().__init__()
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x) if self.head is not None else x


def cut(net: TokenNet, k: int) -> list[Segment]:
    """Cut ``net`` into ``k`` segments that share its parameters; running them in order equals ``net``."""
    ranges = block_ranges(len(net.blocks), k, f"the {net.spec['type']} model")
    return [Segment([net.blocks[j] for j in range(a, b)], net.embed if i == 0 else None, net.head if i == k - 1 else None)
            for i, (a, b) in enumerate(ranges)]


class Stitch(nn.Module):
    """LayerNorm + Linear from one token width to another (identity-initialized when square)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
        self.proj = nn.Linear(d_in, d_out)
        if d_in == d_out:
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(d_in))
                self.proj.bias.zero_()
        else:
            with torch.no_grad():  # unit-variance outputs from the normalized input
                nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(d_in))
                self.proj.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


class StitchedModule(nn.Module):
    """``stitch_out(body(stitch_in(x)))``; either stitch may be absent."""

    def __init__(self, body: Segment, stitch_in: Optional[Stitch] = None, stitch_out: Optional[Stitch] = None):
        super().__init__()
        self.stitch_in = stitch_in
        self.body = body
        self.stitch_out = stitch_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stitch_in is not None:
            x = self.stitch_in(x)
        x = self.body(x)
        return self.stitch_out(x) if self.stitch_out is not None else x


def stitch_module(body: Segment, index: int, k: int, width: int, outer_width: int, always: bool = False) -> StitchedModule:
    """Wrap module ``index`` of ``k`` (token width ``width``) to plug into a model of width ``outer_width``.

    A stitch goes in front of every module but the first (which reads images) and behind every
    module but the last (which writes logits), where the widths differ or ``always`` is set.
    """
    need = always or width != outer_width
    s_in = Stitch(outer_width, width) if (index > 0 and need) else None
    s_out = Stitch(width, outer_width) if (index < k - 1 and need) else None
    return StitchedModule(body, s_in, s_out)


class Hybrid(nn.Module):
    """``meta[:i] + module + meta[i+1:]``: one module run inside the (frozen) meta model.

    ``forward(x, boundary=True)`` also returns the module's output (the tokens handed to
    ``meta[i+1]``), for a feature loss at the module boundary; None for the last module.
    """

    def __init__(self, meta_segments: Sequence[Segment], index: int, module: nn.Module):
        super().__init__()
        self.before = nn.ModuleList(meta_segments[:index])
        self.module = module
        self.after = nn.ModuleList(meta_segments[index + 1 :])

    def forward(self, x: torch.Tensor, boundary: bool = False):
        for s in self.before:
            x = s(x)
        x = self.module(x)
        mid = x if len(self.after) else None
        for s in self.after:
            x = s(x)
        return (x, mid) if boundary else x


class ModularNet(nn.Module):
    """The assembled student: modules run in order, with optional ``links`` (Linear) between them.

    ``links[i]`` (``fold`` layout) replaces the stitch pair between module i and i+1 by one Linear.
    """

    def __init__(self, modules: Sequence[nn.Module], links: Optional[Sequence[nn.Module]] = None):
        super().__init__()
        self.parts = nn.ModuleList(modules)
        self.links = nn.ModuleList(links) if links is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, m in enumerate(self.parts):
            x = m(x)
            if self.links is not None and i < len(self.parts) - 1:
                x = self.links[i](x)
        return x


def build_modular(spec: Mapping[str, Any], input_shape: Sequence[int], num_classes: int, k: int, outer_width: int,
                  layout: str = "keep") -> ModularNet:
    """A fresh (randomly initialized) student of ``spec`` cut into ``k`` modules for a meta model of width ``outer_width``.

    ``keep``: each module keeps its stitches (stitch_out of i, then stitch_in of i+1, where widths differ).
    ``fold``: no stitches; one identity-initialized Linear(width, width) between modules where widths differ.
    Built the same way for the m2mKD student and its baselines, so all arms are the same network.
    """
    net = build_net(spec, input_shape, num_classes)
    segs = cut(net, k)
    if layout == "keep":
        return ModularNet([stitch_module(s, i, k, net.dim, outer_width) for i, s in enumerate(segs)])
    if layout == "fold":
        links = None
        if net.dim != outer_width and k > 1:
            links = []
            for _ in range(k - 1):
                lin = nn.Linear(net.dim, net.dim)
                with torch.no_grad():
                    lin.weight.copy_(torch.eye(net.dim))
                    lin.bias.zero_()
                links.append(lin)
        return ModularNet([StitchedModule(s) for s in segs], links)
    raise ConfigError(f"unknown stitch layout {layout!r}; use keep or fold")


def moe_aux_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """Sum of the load-balancing losses of the MoE layers that ran in ``model``'s last forward."""
    total = None
    for m in model.modules():
        if isinstance(m, MoEFeedForward) and m.aux_loss is not None:
            total = m.aux_loss if total is None else total + m.aux_loss
    return total


def reset_aux(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, MoEFeedForward):
            m.aux_loss = None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "MODEL_TYPES", "parse_spec", "check_spec", "looks_like_spec", "resolve_spec", "token_grid", "auto_patch", "TokenNet", "build_net",
    "block_ranges", "Segment", "cut", "Stitch", "StitchedModule", "stitch_module", "Hybrid", "ModularNet", "build_modular",
    "MoEFeedForward", "moe_aux_loss", "reset_aux", "count_parameters",
]
