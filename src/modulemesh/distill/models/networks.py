"""Token networks: patch embedding, transformer blocks (dense or mixture-of-experts MLP), head."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...mesh.routers import topk_mask
from .spec import resolve_spec

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
