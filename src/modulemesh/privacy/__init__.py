"""Membership inference: how much does a model give away about who was in its training set?"""

from .attacks import (
    calibrated_scores,
    log_confidence,
    loss_scores,
    membership_auc,
    reference_confidences,
    train_reference_models,
)

__all__ = [
    "calibrated_scores",
    "log_confidence",
    "loss_scores",
    "membership_auc",
    "reference_confidences",
    "train_reference_models",
]
