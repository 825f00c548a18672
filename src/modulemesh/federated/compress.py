"""Message codecs for weights and logits, with the exact bytes that would go on the wire.

``encode(x, codec) -> bytes`` and ``decode(bytes) -> tensor`` round-trip one tensor;
``encode_state`` / ``decode_state`` do the same for a ``{name: tensor}`` dict. The byte count of
a message is ``len()`` of the encoding - header, shape and codec parameters included - so the
communication numbers in benchmarks are what a real transport would carry (before any
transport framing such as gRPC/TLS, which adds a few dozen bytes per message).

Codecs (a string, optionally with a parameter after a colon):

* ``fp32`` - raw float32 (4 bytes per value).
* ``fp16`` - IEEE half precision (2 bytes per value).
* ``int8`` - per-tensor affine quantization: ``q = round((x - min) / s)``, ``s = (max - min) / 255``;
  1 byte per value + 8 bytes (min, s); the error is at most s/2 per value.
* ``topk:K`` - for logits ``(N, C)``: per row the K largest log-probabilities (fp16) and their class
  indices (uint8 when C <= 256); the decoder spreads the remaining probability mass evenly over
  the other classes and returns log-probabilities, which are valid logits for a softmax.
* ``lowrank:R`` - a matrix (any tensor viewed as ``(shape[0], -1)``) as rank-R factors
  ``U diag(S)`` and ``V^T`` from a truncated SVD, both fp16. In ``encode_state`` tensors that
  are 1-D, or for which the factors would not be smaller, are sent as fp32 instead.
"""

from __future__ import annotations

import struct
from typing import Mapping

import numpy as np
import torch

from ..errors import ConfigError, DataError

_CODECS = {"raw": 0, "fp32": 1, "fp16": 2, "int8": 3, "topk": 4, "lowrank": 5}
_CODEC_NAMES = {v: k for k, v in _CODECS.items()}
_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.int8,
    torch.bool,
    torch.int16,
]
_NP = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.float64: np.float64,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.uint8: np.uint8,
    torch.int8: np.int8,
    torch.bool: np.bool_,
    torch.int16: np.int16,
}
CODECS = ("fp32", "fp16", "int8", "topk:K", "lowrank:R")


def parse_codec(codec: str) -> tuple[str, int]:
    """``"topk:3"`` -> ``("topk", 3)``; ``"int8"`` -> ``("int8", 0)``."""
    name, _, arg = str(codec).partition(":")
    name = name.strip().lower()
    if name not in _CODECS or name == "raw":
        raise ConfigError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    if name in ("topk", "lowrank"):
        try:
            k = int(arg)
        except ValueError:
            raise ConfigError(
                f"codec {name} needs a positive integer parameter, e.g. {name}:4; got {codec!r}"
            ) from None
        if k < 1:
            raise ConfigError(f"codec {codec!r}: the parameter must be >= 1")
        return name, k
    if arg:
        raise ConfigError(f"codec {name} takes no parameter; got {codec!r}")
    return name, 0


def _header(codec: str, dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    if dtype not in _DTYPES:
        raise DataError(f"cannot encode tensors of dtype {dtype}")
    return struct.pack(f"<BBB{len(shape)}I", _CODECS[codec], _DTYPES.index(dtype), len(shape), *shape)


def _np_bytes(t: torch.Tensor, dtype: torch.dtype) -> bytes:
    return t.detach().to("cpu", dtype).contiguous().numpy().tobytes()


def encode(x: torch.Tensor, codec: str = "fp32") -> bytes:
    """Encode one tensor; ``len()`` of the result is the exact message size in bytes."""
    name, k = parse_codec(codec)
    x = x.detach().to("cpu")
    shape = tuple(int(s) for s in x.shape)
    if not x.is_floating_point():
        return _header("raw", x.dtype, shape) + x.contiguous().numpy().tobytes()
    if name == "fp32":
        return _header(name, x.dtype, shape) + _np_bytes(x, torch.float32)
    if name == "fp16":
        return _header(name, x.dtype, shape) + _np_bytes(x.clamp(-65504, 65504), torch.float16)
    if name == "int8":
        xf = x.to(torch.float32)
        lo = float(xf.min()) if xf.numel() else 0.0
        hi = float(xf.max()) if xf.numel() else 0.0
        s = (hi - lo) / 255.0 if hi > lo else 1.0
        q = torch.round((xf - lo) / s).clamp(0, 255).to(torch.uint8)
        return _header(name, x.dtype, shape) + struct.pack("<ff", lo, s) + q.numpy().tobytes()
    if name == "topk":
        if x.dim() != 2:
            raise ConfigError(f"codec topk is for logits of shape (N, C); got a tensor of shape {shape}")
        c = shape[1]
        k = min(k, c)
        logp = torch.log_softmax(x.to(torch.float32), dim=1)
        vals, idx = logp.topk(k, dim=1)
        idx_dtype = torch.uint8 if c <= 256 else (torch.int16 if c <= 32767 else torch.int32)
        return (
            _header(name, x.dtype, shape)
            + struct.pack("<H", k)
            + _np_bytes(vals, torch.float16)
            + _np_bytes(idx, idx_dtype)
        )
    # lowrank
    if x.dim() < 1:
        raise ConfigError("codec lowrank needs a tensor with at least one dimension")
    m = x.reshape(shape[0], -1).to(torch.float32)
    r = min(k, *m.shape)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    us = u[:, :r] * s[:r]
    return (
        _header(name, x.dtype, shape)
        + struct.pack("<H", r)
        + _np_bytes(us, torch.float16)
        + _np_bytes(vh[:r], torch.float16)
    )


def _take(buf: memoryview, pos: int, n: int) -> tuple[memoryview, int]:
    if pos + n > len(buf):
        raise DataError("truncated message: the encoded tensor is shorter than its header says")
    return buf[pos : pos + n], pos + n


def _decode_at(buf: memoryview, pos: int) -> tuple[torch.Tensor, int]:
    head, pos = _take(buf, pos, 3)
    code, dcode, ndim = struct.unpack("<BBB", head)
    if code not in _CODEC_NAMES or dcode >= len(_DTYPES):
        raise DataError(f"not a modulemesh tensor message (codec byte {code}, dtype byte {dcode})")
    raw, pos = _take(buf, pos, 4 * ndim)
    shape = struct.unpack(f"<{ndim}I", raw)
    dtype = _DTYPES[dcode]
    numel = int(np.prod(shape)) if shape else 1
    name = _CODEC_NAMES[code]

    def arr(np_dtype, count: int, p: int) -> tuple[torch.Tensor, int]:
        item = np.dtype(np_dtype).itemsize
        chunk, p = _take(buf, p, item * count)
        return torch.from_numpy(np.frombuffer(chunk, dtype=np_dtype).copy()), p

    if name == "raw":
        t, pos = arr(_NP[dtype], numel, pos)
        return t.reshape(shape), pos
    if name in ("fp32", "fp16"):
        t, pos = arr(np.float32 if name == "fp32" else np.float16, numel, pos)
        return t.reshape(shape).to(dtype), pos
    if name == "int8":
        p, pos = _take(buf, pos, 8)
        lo, s = struct.unpack("<ff", p)
        q, pos = arr(np.uint8, numel, pos)
        return (q.to(torch.float32) * s + lo).reshape(shape).to(dtype), pos
    if name == "topk":
        p, pos = _take(buf, pos, 2)
        (k,) = struct.unpack("<H", p)
        n, c = shape
        vals, pos = arr(np.float16, n * k, pos)
        idx_np = np.uint8 if c <= 256 else (np.int16 if c <= 32767 else np.int32)
        idx, pos = arr(idx_np, n * k, pos)
        vals = vals.reshape(n, k).to(torch.float32)
        idx = idx.reshape(n, k).to(torch.int64)
        if k < c:
            rest = (1.0 - vals.exp().sum(1, keepdim=True)).clamp_min(1e-6) / (c - k)
            out = rest.log().expand(n, c).clone()
        else:
            out = torch.zeros(n, c)
        out.scatter_(1, idx, vals)
        return out.to(dtype), pos
    # lowrank
    p, pos = _take(buf, pos, 2)
    (r,) = struct.unpack("<H", p)
    rows = shape[0]
    cols = numel // rows if rows else 0
    us, pos = arr(np.float16, rows * r, pos)
    vh, pos = arr(np.float16, r * cols, pos)
    m = us.reshape(rows, r).to(torch.float32) @ vh.reshape(r, cols).to(torch.float32)
    return m.reshape(shape).to(dtype), pos


def decode(blob: bytes) -> torch.Tensor:
    buf = memoryview(blob)
    t, pos = _decode_at(buf, 0)
    if pos != len(buf):
        raise DataError(f"message has {len(buf) - pos} trailing bytes after the tensor; it is corrupt")
    return t


def encode_state(state: Mapping[str, torch.Tensor], codec: str = "fp32") -> bytes:
    """Encode a ``{name: tensor}`` dict: count, then (name length, name, tensor) per entry."""
    name, k = parse_codec(codec)
    if name == "topk":
        raise ConfigError("codec topk is for logits, not weights; use fp32, fp16, int8 or lowrank:R for modules")
    parts = [struct.pack("<I", len(state))]
    for key, t in state.items():
        kb = key.encode("utf-8")
        c = codec
        if name == "lowrank":
            rows = t.shape[0] if t.dim() else 1
            cols = t.numel() // max(rows, 1)
            r = min(k, rows, cols)
            if t.dim() < 2 or 2 * r * (rows + cols) >= 4 * t.numel():
                c = "fp32"
        parts += [struct.pack("<H", len(kb)), kb, encode(t, c)]
    return b"".join(parts)


def decode_state(blob: bytes) -> dict[str, torch.Tensor]:
    buf = memoryview(blob)
    head, pos = _take(buf, 0, 4)
    (n,) = struct.unpack("<I", head)
    out: dict[str, torch.Tensor] = {}
    for _ in range(n):
        p, pos = _take(buf, pos, 2)
        (ln,) = struct.unpack("<H", p)
        kb, pos = _take(buf, pos, ln)
        out[bytes(kb).decode("utf-8")], pos = _decode_at(buf, pos)
    if pos != len(buf):
        raise DataError(f"message has {len(buf) - pos} trailing bytes after the last tensor; it is corrupt")
    return out


def nbytes(x: torch.Tensor, codec: str = "fp32") -> int:
    return len(encode(x, codec))


def roundtrip(x: torch.Tensor, codec: str = "fp32") -> tuple[torch.Tensor, int]:
    """What the receiver sees and how many bytes it cost: ``(decode(encode(x)), len(encode(x)))``."""
    blob = encode(x, codec)
    return decode(blob), len(blob)


def roundtrip_state(state: Mapping[str, torch.Tensor], codec: str = "fp32") -> tuple[dict[str, torch.Tensor], int]:
    blob = encode_state(state, codec)
    return decode_state(blob), len(blob)
