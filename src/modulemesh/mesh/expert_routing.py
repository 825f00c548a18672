"""The part of a router's state that belongs to one expert, so an expert record can carry it.

An expert trained in one run can join a mesh built in another only if the router there can route
to it without retraining. The tensors come from ``Router.export_expert_state`` (one expert's slice:
the density router's PPCA mixture of that expert's own inputs, the oracle's task ids, a top-k
gate's output row; nothing for entropy and random routing); the record adds the router kind, so a
mesh built from records knows which experts a given router can route to.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ModuleMeshError
from .density import DensityRouter
from .routers import EntropyRouter, OracleRouter, RandomRouter, Router, TopKRouter

# Router kinds whose per-expert state alone routes among experts trained apart: a density is fit on
# the expert's own data; entropy routing needs no state. A top-k gate shares its body across experts.
COMPOSABLE = ("density", "entropy")


def router_kind(router: Router) -> str:
    for kind, cls in (
        ("density", DensityRouter),
        ("entropy", EntropyRouter),
        ("topk", TopKRouter),
        ("random", RandomRouter),
        ("oracle", OracleRouter),
    ):
        if isinstance(router, cls):
            return kind
    return type(router).__name__


def export_expert_state(router: Router, index: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-able description, tensors) of what ``router`` holds for expert ``index``."""
    state = router.export_expert_state(index)
    return {"type": router_kind(router), "fitted": bool(state)}, state


def import_expert_state(router: Router, index: int, info: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Give ``router`` (which already has slot ``index``) the state an expert record carries."""
    kind = router_kind(router)
    if kind == "entropy":
        return  # entropy routing reads only the experts' predictions
    if info.get("type") != kind:
        raise ModuleMeshError(
            f"an expert carries {info.get('type')!r} router state; a {kind} router cannot route to it"
        )
    if kind == "density" and not state:
        raise ModuleMeshError(
            "an expert has no fitted density (it was saved before its task ended); it cannot be density-routed"
        )
    router.import_expert_state(index, state)
