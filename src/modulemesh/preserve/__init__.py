"""Knowledge preservation across model generations (seed 000 §3.3B, seed 001 §2.4).

* ``fisher``: diagonal Fisher (empirical / true, optionally p(y|x)-weighted as EWC uses it) from per-sample
  gradients; importance selection. The project's one Fisher estimator.
* ``mapping``: carry an old model's parameters into a new architecture (``transfer``), built from
  ``layer_chain``, ``pairing``, ``units``, ``layer_map`` and ``transfer_report``.
* ``merge``: Fisher-weighted merging and plain averaging of same-architecture modules.
* ``train`` / ``upgrade``: save/load models, step-budget training (``training.fit``), the ``modulemesh upgrade``
  pipeline.
"""

from .fisher import (
    fisher_diagonal,
    select_threshold,
    select_top_fraction,
    threshold_for_top_fraction,
)
from .mapping import LayerReport, TransferReport, transfer
from .merge import average_states, fisher_merge

__all__ = [
    "fisher_diagonal",
    "select_threshold",
    "select_top_fraction",
    "threshold_for_top_fraction",
    "transfer",
    "TransferReport",
    "LayerReport",
    "average_states",
    "fisher_merge",
]
