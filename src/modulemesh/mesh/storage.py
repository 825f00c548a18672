"""Stored precision of finished state: frozen experts and fitted densities kept in fp32, fp16, int8 or int4.

Why: a finished expert never trains again and a density is fit once, so what a mesh keeps of them can be
rounded once, when they are finished, and read back as fp32 for every later computation. The packed form
(``pack``) is what a saved mesh holds and what its bytes count; ``unpack`` gives the fp32 tensor the mesh
computes with. ``unpack(pack(t))`` is deterministic, so a mesh computes the same before and after a
save/load round trip, bit for bit.

int8 is symmetric, one scale per row (per output channel of a weight, per direction of a density):
q = round(t / s) with s = max|row| / 127, t ~ q * s. A 1-d tensor is one row. 1-d tensors with fewer than
``MIN_INT8`` elements (biases, norms' scales, variances) stay fp32: they cost next to nothing and a
bias rounded to a 127th of its largest entry can move every output.

int4 (experts only) is the same rule with 7 levels a side: every matrix or kernel is rounded to q in -7..7
with one fp32 scale per row and packed two values to a byte (``.nibbles`` keeps the tensor's shape, as an
int64 vector); larger 1-d tensors go to int8, small ones stay fp32, and the keys in ``fine`` (an expert's
output layer) go to int8: its rows carry the logits directly, a closed-form (LDA) head's entries span a
wide range that 7 levels round coarsely, and it is small (10 x 200 values: 2 KB in int8). With it in int8,
int4 experts score 0.06-0.47 points below int8 ones of the same width on Permuted-MNIST's validation split
(benchmarks/results/routing_bytes_int4_permuted_mnist.md).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch

from ..errors import ModuleMeshError

STORAGES = ("fp32", "fp16", "int8", "int4")
SCALE = ".scale"  # suffix of an int8 / int4 tensor's per-row scales in the packed form
NIBBLES = ".nibbles"  # suffix of an int4 tensor's shape; the tensor itself is uint8, two values a byte
RESERVED = (SCALE, NIBBLES)
MIN_INT8 = 256


def check_storage(storage: str) -> str:
    if storage not in STORAGES:
        raise ModuleMeshError(f"unknown storage {storage!r}; choose one of {', '.join(STORAGES)}")
    return storage


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().reshape(t.shape[0] if t.ndim > 1 else 1, -1)


def _quantize(t: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row rounding to -levels..levels: (integer values as int8, fp32 scale per row)."""
    rows = _rows(t)
    scale = rows.abs().amax(1, keepdim=True) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    return torch.round(rows / scale).clamp_(-levels, levels).to(torch.int8), scale.reshape(-1)


def pack_tensor(t: torch.Tensor, storage: str) -> dict[str, torch.Tensor]:
    """{'': stored tensor} plus, for int8, {'.scale': fp32 per-row scales} and, for int4, the scales and
    {'.nibbles': shape}; non-float tensors are kept as they are."""
    check_storage(storage)
    if not t.is_floating_point() or storage == "fp32":
        return {"": t.detach().clone()}
    if storage == "fp16" or (t.ndim < 2 and t.numel() < MIN_INT8):
        return {"": t.detach().to(torch.float16 if storage == "fp16" else torch.float32).clone()}
    if storage == "int8" or t.ndim < 2:
        q, scale = _quantize(t, 127)
        return {"": q.reshape(t.shape), SCALE: scale}
    q, scale = _quantize(t, 7)
    flat = (q.reshape(-1) + 8).to(torch.uint8)  # 1..15: the low nibble holds even positions, the high one odd
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    packed = flat[0::2] | (flat[1::2] << 4)
    return {"": packed, SCALE: scale, NIBBLES: torch.tensor(list(t.shape), dtype=torch.int64)}


def _unnibble(stored: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The int4 values of a packed tensor, checked against its recorded shape (a file is not trusted)."""
    t, shape = stored[""], stored[NIBBLES]
    if t.dtype != torch.uint8 or t.ndim != 1 or shape.dtype != torch.int64 or shape.ndim != 1 or len(shape) < 2:
        raise ModuleMeshError("an int4 tensor must be a uint8 vector with an int64 shape of at least 2 dims")
    dims = [int(d) for d in shape.tolist()]
    n = 1
    for d in dims:
        n *= d
    if min(dims) < 1 or t.numel() != (n + 1) // 2 or stored[SCALE].numel() != dims[0]:
        raise ModuleMeshError(f"an int4 tensor of shape {dims} needs {(n + 1) // 2} bytes and {dims[0]} scales")
    both = torch.stack([t & 15, t >> 4], 1).reshape(-1)[:n]
    return (both.to(torch.int8) - 8).reshape(dims)


def unpack_tensor(stored: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The fp32 tensor a packed one stands for (non-float tensors come back unchanged)."""
    t = stored[""]
    if NIBBLES in stored:
        if SCALE not in stored:
            raise ModuleMeshError("an int4 tensor has no scales")
        t = _unnibble(stored)
    if SCALE in stored:
        rows = t.float().reshape(stored[SCALE].numel(), -1) * stored[SCALE].float().reshape(-1, 1)
        return rows.reshape(t.shape)
    return t.float() if t.is_floating_point() else t


def pack_state(state: Mapping[str, torch.Tensor], storage: str, fine: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """A flat state dict in its stored form: key -> stored tensor, key + '.scale' -> int8 / int4 scales, key +
    '.nibbles' -> int4 shape. With int4, the keys in ``fine`` are kept in int8 (see the module's note)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key.endswith(RESERVED):
            reserved = " or ".join(RESERVED)
            raise ModuleMeshError(f"state key {key!r} ends with {reserved}, which the packed form reserves")
        precision = "int8" if storage == "int4" and key in fine else storage
        out.update({key + suffix: v for suffix, v in pack_tensor(t, precision).items()})
    return out


def unpack_state(stored: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``pack_state``: every tensor back as the fp32 (or integer) tensor it stands for."""
    out = {}
    for key, t in stored.items():
        suffix = next((s for s in RESERVED if key.endswith(s)), None)
        if suffix is not None:
            if key[: -len(suffix)] not in stored:
                raise ModuleMeshError(f"stored state has {key!r} but no tensor {key[: -len(suffix)]!r}")
            continue
        part = {"": t}
        for s in RESERVED:
            if key + s in stored:
                part[s] = stored[key + s]
        out[key] = unpack_tensor(part)
    return out


def nbytes(tensors) -> int:
    """Bytes of the tensors' data (what a safetensors file holds besides its small header)."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
