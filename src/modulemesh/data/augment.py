"""Training-time augmentation as batched tensor operations on the device (no per-sample Python).

The protocol behind the published CIFAR-100 / Tiny ImageNet continual-learning numbers (DER,
Buzzega et al. 2020; Mammoth's `seq-cifar100`): a random crop with 4 pixels of zero padding and a
random horizontal flip, per image, on every training batch (replayed rows too). Here both are one
padded copy, one gather and one ``where`` for the whole batch, so a 32x32 batch of 128 images costs
a few kernel launches whatever its size. Normalization is not here: it belongs to the model
(``expert.backbone.normalize``), so training, evaluation, routing and a shared expert all see the
same inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Each image of (N, C, H, W) cropped back to H x W from its zero-padded copy at a random offset."""
    if padding <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    # Offsets are drawn on the CPU generator (seeded, device-independent), then moved.
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (N,1,H,1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (N,1,1,W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Each image mirrored left-right with probability p."""
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class BatchAugment:
    """``train.augment``: crop padding and flip for image batches; identity when both are off."""

    def __init__(self, crop_padding: int = 0, flip: bool = False):
        self.crop_padding, self.flip = int(crop_padding), bool(flip)

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.flip

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not self.active:
            return x
        if x.dim() != 4:
            raise ValueError(f"train.augment needs image batches (N, C, H, W); got shape {tuple(x.shape)}")
        x = random_crop(x, self.crop_padding, generator)
        return random_flip(x, generator) if self.flip else x
