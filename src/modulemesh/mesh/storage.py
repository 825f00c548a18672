"""Stored precision of finished state: frozen experts and fitted densities kept in fp32, fp16 or int8.

Why: a finished expert never trains again and a density is fit once, so what a mesh keeps of them can be
rounded once, when they are finished, and read back as fp32 for every later computation. The packed form
(``pack``) is what a saved mesh holds and what its bytes count; ``unpack`` gives the fp32 tensor the mesh
computes with. ``unpack(pack(t))`` is deterministic, so a mesh computes the same before and after a
save/load round trip, bit for bit.

int8 is symmetric, one scale per row (per output channel of a weight, per direction of a density):
q = round(t / s) with s = max|row| / 127, t ~ q * s. A 1-d tensor is one row. 1-d tensors with fewer than
``MIN_INT8`` elements (biases, norms' scales, variances) stay fp32: they cost next to nothing and a
bias rounded to a 127th of its largest entry can move every output.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import ModuleMeshError

STORAGES = ("fp32", "fp16", "int8")
SCALE = ".scale"  # suffix of an int8 tensor's per-row scales in the packed form
MIN_INT8 = 256


def check_storage(storage: str) -> str:
    if storage not in STORAGES:
        raise ModuleMeshError(f"unknown storage {storage!r}; choose one of {', '.join(STORAGES)}")
    return storage


def pack_tensor(t: torch.Tensor, storage: str) -> dict[str, torch.Tensor]:
    """{'': stored tensor} plus, for int8, {'.scale': fp32 per-row scales}; non-float tensors are kept as they are."""
    check_storage(storage)
    if not t.is_floating_point() or storage == "fp32":
        return {"": t.detach().clone()}
    if storage == "fp16" or (t.ndim < 2 and t.numel() < MIN_INT8):
        return {"": t.detach().to(torch.float16 if storage == "fp16" else torch.float32).clone()}
    rows = t.detach().float().reshape(t.shape[0] if t.ndim > 1 else 1, -1)
    scale = rows.abs().amax(1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = torch.round(rows / scale).clamp_(-127, 127).to(torch.int8).reshape(t.shape)
    return {"": q, SCALE: scale.reshape(-1)}


def unpack_tensor(stored: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The fp32 tensor a packed one stands for (non-float tensors come back unchanged)."""
    t = stored[""]
    if SCALE in stored:
        rows = t.float().reshape(stored[SCALE].numel(), -1) * stored[SCALE].float().reshape(-1, 1)
        return rows.reshape(t.shape)
    return t.float() if t.is_floating_point() else t


def pack_state(state: Mapping[str, torch.Tensor], storage: str) -> dict[str, torch.Tensor]:
    """A flat state dict in its stored form: key -> stored tensor, key + '.scale' -> int8 scales."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key.endswith(SCALE):
            raise ModuleMeshError(f"state key {key!r} ends with {SCALE!r}, which the packed form reserves")
        out.update({key + suffix: v for suffix, v in pack_tensor(t, storage).items()})
    return out


def unpack_state(stored: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``pack_state``: every tensor back as the fp32 (or integer) tensor it stands for."""
    out = {}
    for key, t in stored.items():
        if key.endswith(SCALE):
            if key[: -len(SCALE)] not in stored:
                raise ModuleMeshError(f"stored state has scales {key!r} but no tensor {key[: -len(SCALE)]!r}")
            continue
        part = {"": t}
        if key + SCALE in stored:
            part[SCALE] = stored[key + SCALE]
        out[key] = unpack_tensor(part)
    return out


def nbytes(tensors) -> int:
    """Bytes of the tensors' data (what a safetensors file holds besides its small header)."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
