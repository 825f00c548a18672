"""Distillation losses shared by upgrade, m2mKD and the continual strategies.

* ``kd_loss(student_logits, teacher_logits, targets, alpha, T)``: Hinton et al. (2015),
  ``alpha * CE(student, targets) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T)`` with the KL
  averaged over the batch (``batchmean``); the T^2 keeps the soft-target gradients on the same scale
  as the hard-label ones when T changes. This is seed 001's ``alpha * L_task + (1 - alpha) * L_KL``.
* ``seed_distill_loss(student_logits, teacher_logits, params, lam, T)``: seed 000's
  ``KL(T(x) || M(x)) + lambda * Omega(theta)`` with Omega the squared L2 norm of the student's
  parameters (the seed sums over the data set; here the KL is a batch mean so ``lam`` does not
  depend on the batch size).
* ``teacher_logits(teacher, x, cache_dir=...)``: a teacher's logits for a whole input tensor,
  cached in a safetensors file whose name is a hash of the teacher's weights and the inputs, so
  a deprecated teacher runs once per data set.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError, ModuleMeshError


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ModuleMeshError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in shape; "
            "both must be (batch, classes) over the same classes in the same order"
        )
    if student_logits.dim() != 2:
        raise ModuleMeshError(f"logits must be (batch, classes), got shape {tuple(student_logits.shape)}")


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)), summed over classes, averaged over the batch."""
    _check_logits(student_logits, teacher_logits)
    if T <= 0:
        raise ModuleMeshError(f"temperature T must be > 0, got {T}")
    log_p_student = F.log_softmax(student_logits / T, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / T, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: Optional[torch.Tensor] = None,
    alpha: float = 0.5,
    T: float = 4.0,
) -> torch.Tensor:
    """Hinton KD: ``alpha * CE(student, targets) + (1 - alpha) * T^2 * KL(teacher^T || student^T)``.

    ``alpha=0`` distills from the teacher only (``targets`` may then be None); ``alpha=1`` is plain
    cross-entropy. The teacher logits are detached.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ModuleMeshError(f"alpha must be in [0, 1] (weight of the hard-label loss), got {alpha}")
    soft = kl_divergence(student_logits, teacher_logits, T) * (T * T)
    if alpha == 0.0:
        return soft
    if targets is None:
        raise ModuleMeshError("kd_loss with alpha > 0 needs the true labels (targets); pass them or set alpha=0")
    if targets.shape != student_logits.shape[:1]:
        raise ModuleMeshError(f"targets must be (batch,) = ({student_logits.shape[0]},), got {tuple(targets.shape)}")
    return alpha * F.cross_entropy(student_logits, targets) + (1.0 - alpha) * soft


def l2_penalty(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of squared entries of ``params`` (Omega in seed 000)."""
    total = None
    for p in params:
        term = p.pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ModuleMeshError("l2_penalty got no parameters")
    return total


def seed_distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    params: Optional[Iterable[torch.Tensor]] = None,
    lam: float = 0.0,
    T: float = 1.0,
) -> torch.Tensor:
    """Seed 000 §3.3B: ``KL(T(x) || M(x)) + lam * ||theta_M||^2`` (KL batch-mean at temperature T)."""
    if lam < 0:
        raise ModuleMeshError(f"lam (L2 weight) must be >= 0, got {lam}")
    loss = kl_divergence(student_logits, teacher_logits, T)
    if lam > 0:
        if params is None:
            raise ModuleMeshError("seed_distill_loss with lam > 0 needs the student's parameters (params=model.parameters())")
        loss = loss + lam * l2_penalty(params)
    return loss


# ----------------------------------------------------------------------------- teacher-logit cache


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

    from ..io import atomic_write_bytes
    from ..data.scenarios import as_float

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
        out = [teacher(as_float(x[i : i + batch_size].to(device))).float().cpu() for i in range(0, x.shape[0], batch_size)]
    finally:
        teacher.train(was_training)
    logits = torch.cat(out)
    if not torch.isfinite(logits).all():
        raise ModuleMeshError("the teacher produced NaN/inf logits; check its weights and the inputs' scale")
    if path is not None:
        atomic_write_bytes(path, st_save({"logits": logits.contiguous()}, metadata={"key": key}))
    return logits


__all__ = ["kd_loss", "kl_divergence", "seed_distill_loss", "l2_penalty", "teacher_logits", "teacher_cache_key", "teacher_cache_path"]
