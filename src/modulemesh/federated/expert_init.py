"""Seeded construction of the mesh ``Expert``s that federated runs train (every engine starts alike)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch.func import replace_all_batch_norm_modules_

from ..mesh.expert import Expert


def new_expert(
    name: str, spec: dict, input_shape: Sequence[int], num_classes: int, seed: int, device: str | torch.device = "cpu"
) -> Expert:
    """A mesh ``Expert`` over all ``num_classes`` classes, seeded; BatchNorm uses batch statistics.

    vmap cannot update BatchNorm running statistics in place, so the stacked copies normalise
    with the statistics of each batch, in training and evaluation alike.
    """
    with torch.random.fork_rng(devices=[]):  # seeded init without moving the caller's random stream
        torch.manual_seed(seed)
        e = Expert(name, list(range(num_classes)), spec, input_shape)
    replace_all_batch_norm_modules_(e)
    return e.to(device)


def has_batchnorm(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())
