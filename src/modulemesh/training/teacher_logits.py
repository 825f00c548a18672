"""A teacher's logits on a whole input tensor, cached on disk so a deprecated teacher runs once per data set.

The cache file's name is a hash of the teacher's weights and the inputs (safetensors), so a
changed teacher or data set never reuses stale logits.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import DataError, ModuleMeshError


def _hash_tensor(h: "hashlib._Hash", name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def teacher_cache_key(teacher: nn.Module, x: torch.Tensor) -> str:
    """sha256 over the teacher's state (names, dtypes, shapes, values) and the inputs."""
    h = hashlib.sha256(b"modulemesh.teacher_logits/1|")
    for name, t in sorted(teacher.state_dict().items()):
        _hash_tensor(h, name, t)
    _hash_tensor(h, "__inputs__", x)
    return h.hexdigest()


def _cache_file(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / f"teacher_logits_{key[:24]}.safetensors"


def teacher_cache_path(teacher: nn.Module, x: torch.Tensor, cache_dir: str | os.PathLike) -> Path:
    """Where ``teacher_logits(teacher, x, cache_dir)`` stores its result."""
    return _cache_file(cache_dir, teacher_cache_key(teacher, x))


@torch.no_grad()
def teacher_logits(
    teacher: nn.Module,
    x: torch.Tensor,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The teacher's logits on every row of ``x`` (eval mode, CPU float32 result).

    With ``cache_dir`` the logits are read from / written to
    ``cache_dir/teacher_logits_<hash>.safetensors``; the hash covers the teacher's weights and ``x``,
    so a changed teacher or data set never reuses stale logits. uint8 inputs are scaled to [0, 1].
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from ..data.scenarios import as_float
    from ..io import atomic_write_bytes

    if not isinstance(x, torch.Tensor) or x.shape[0] == 0:
        raise DataError("teacher_logits needs a non-empty input tensor")
    path = key = None
    if cache_dir is not None:
        key = teacher_cache_key(teacher, x)
        path = _cache_file(cache_dir, key)
        if path.exists():
            try:
                stored = st_load(path.read_bytes())
                logits = stored["logits"]
                if logits.shape[0] == x.shape[0]:
                    return logits
            except (SafetensorError, KeyError, ValueError):
                pass  # a corrupt cache file is recomputed and overwritten
    if device is None:
        p = next(teacher.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = teacher.training
    teacher.eval()
    try:
        out = [
            teacher(as_float(x[i : i + batch_size].to(device))).float().cpu() for i in range(0, x.shape[0], batch_size)
        ]
    finally:
        teacher.train(was_training)
    logits = torch.cat(out)
    if not torch.isfinite(logits).all():
        raise ModuleMeshError("the teacher produced NaN/inf logits; check its weights and the inputs' scale")
    if path is not None:
        atomic_write_bytes(path, st_save({"logits": logits.contiguous()}, metadata={"key": key}))
    return logits


__all__ = ["teacher_logits", "teacher_cache_key", "teacher_cache_path"]
