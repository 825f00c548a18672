"""Out-of-distribution test sets: shifted copies (rotated, shifted, noisy) of the test images."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import ConfigError, DataError


def parse_ood(name: str) -> tuple[str, float]:
    kind, _, arg = str(name).partition(":")
    kinds = {"rotate": 30.0, "noise": 0.5, "shift": 3.0}
    if kind not in kinds:
        raise ConfigError(f"unknown OOD transform {name!r}; use rotate:DEGREES, noise:STD or shift:PIXELS")
    try:
        value = float(arg) if arg else kinds[kind]
    except ValueError:
        raise ConfigError(f"OOD transform {name!r}: {arg!r} is not a number") from None
    if value < 0:
        raise ConfigError(f"OOD transform {name!r}: the amount must be >= 0")
    return kind, value


def ood_transform(x: torch.Tensor, name: str, seed: int = 0) -> torch.Tensor:
    """A shifted copy of uint8 images (N, C, H, W): ``rotate:D`` (+D / -D alternately), ``noise:S``
    (Gaussian noise of std S on [0, 1] pixels) or ``shift:P`` (translated by P pixels, alternating
    directions: +P right and down for even rows of the batch). Deterministic for a given seed; the result is uint8 again."""
    kind, amount = parse_ood(name)
    if x.dim() != 4:
        raise DataError(f"OOD transform {name!r} needs image data (N, C, H, W); got shape {tuple(x.shape)}")
    xf = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    n = x.shape[0]
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    if kind == "noise":
        g = torch.Generator().manual_seed(seed)
        out = xf + amount * torch.randn(xf.shape, generator=g)
    else:
        theta = torch.zeros(n, 2, 3)
        if kind == "rotate":
            a = torch.deg2rad(torch.tensor(amount)) * sign
            theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
        else:
            theta[:, 0, 0] = theta[:, 1, 1] = 1.0
            theta[:, 0, 2] = -sign * 2.0 * amount / x.shape[-1]  # the grid says where to sample from: -shift
            theta[:, 1, 2] = -sign * 2.0 * amount / x.shape[-2]
        grid = F.affine_grid(theta, list(xf.shape), align_corners=False)
        out = F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out.clamp(0, 1) * 255.0).round().to(torch.uint8)
