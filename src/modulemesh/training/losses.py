"""The one module of distillation losses: upgrades, m2mKD, LwF, ModuleMesh and the federated engines.

* ``kl_divergence(student_logits, teacher_logits, T)``: ``KL(p_teacher^T || p_student^T)``, batch
  mean, no T^2 factor (LwF and ModuleMesh's update distillation use it as is, as Mammoth does).
* ``soft_target_loss(student_logits, teacher_logits, T)``: the same KL times T^2, the soft half
  of Hinton's loss (federated distillation towards aggregated soft labels).
* ``soft_cross_entropy(logits, target_probs)``: cross-entropy against a distribution (soft labels).

* ``kd_loss(student_logits, teacher_logits, targets, alpha, T)``: Hinton et al. (2015),
  ``alpha * CE(student, targets) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T)`` with the KL
  averaged over the batch (``batchmean``); the T^2 keeps the soft-target gradients on the same scale
  as the hard-label ones when T changes. This is seed 001's ``alpha * L_task + (1 - alpha) * L_KL``.
* ``seed_distill_loss(student_logits, teacher_logits, params, lam, T)``: seed 000's
  ``KL(T(x) || M(x)) + lambda * Omega(theta)`` with Omega the squared L2 norm of the student's
  parameters (the seed sums over the data set; here the KL is a batch mean so ``lam`` does not
  depend on the batch size).

The cached logits of a whole teacher on a data set live in ``training/teacher_logits.py``.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from ..errors import ModuleMeshError


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ModuleMeshError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in "
            "shape; "
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


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``: the T^2 keeps the soft targets'
    gradients on the scale of the hard-label ones when T changes (Hinton et al. 2015)."""
    return kl_divergence(student_logits, teacher_logits, T) * (T * T)


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` against a target distribution per row (soft labels), batch mean."""
    if logits.shape != target_probs.shape:
        raise ModuleMeshError(
            f"logits {tuple(logits.shape)} and target probabilities {tuple(target_probs.shape)} differ in shape"
        )
    return -(target_probs.detach() * F.log_softmax(logits, dim=-1)).sum(-1).mean()


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
    soft = soft_target_loss(student_logits, teacher_logits, T)
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
            raise ModuleMeshError(
                "seed_distill_loss with lam > 0 needs the student's parameters (params=model.parameters())"
            )
        loss = loss + lam * l2_penalty(params)
    return loss


__all__ = ["kd_loss", "kl_divergence", "soft_target_loss", "soft_cross_entropy", "seed_distill_loss", "l2_penalty"]
