"""Cutting a token network into K modules, stitches between widths, hybrids and the assembled modular student."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ...errors import ConfigError
from .networks import TokenNet, build_net

# ----------------------------------------------------------------------------- cutting


def block_ranges(depth: int, k: int, what: str = "the model") -> list[tuple[int, int]]:
    """Split ``depth`` blocks into ``k`` consecutive groups (sizes differ by at most one, earlier larger)."""
    if k < 1:
        raise ConfigError(f"the number of modules must be >= 1, got {k}")
    if k > depth:
        raise ConfigError(
            f"cannot cut {what} into {k} modules: it has only {depth} transformer blocks; use --modules "
            f"{depth} or fewer"
        )
    base, extra = divmod(depth, k)
    out, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        out.append((start, start + size))
        start += size
    return out


class Segment(nn.Module):
    """Consecutive blocks of a TokenNet; the first segment has the embedding, the last the head."""

    def __init__(
        self, blocks: Sequence[nn.Module], embed: Optional[nn.Module] = None, head: Optional[nn.Module] = None
    ):
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
    return [
        Segment([net.blocks[j] for j in range(a, b)], net.embed if i == 0 else None, net.head if i == k - 1 else None)
        for i, (a, b) in enumerate(ranges)
    ]


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


def stitch_module(
    body: Segment, index: int, k: int, width: int, outer_width: int, always: bool = False
) -> StitchedModule:
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


def build_modular(
    spec: Mapping[str, Any],
    input_shape: Sequence[int],
    num_classes: int,
    k: int,
    outer_width: int,
    layout: str = "keep",
) -> ModularNet:
    """A fresh (randomly initialized) student of ``spec`` cut into ``k`` modules for a meta model of width
    ``outer_width``.

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
