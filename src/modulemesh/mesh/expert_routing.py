"""The part of a router's state that belongs to one expert, so an expert record can carry it.

An expert trained in one run can join a mesh built in another only if the router there can route
to it without retraining. The density router's state is per expert by construction (each expert's
PPCA mixture of its own training inputs); the entropy and random routers have none; the oracle
router maps task ids to experts. A learned top-k gate shares its body across experts, so its slice
(one output row) is kept for the record but cannot route among experts trained apart.

``export_expert_state`` / ``import_expert_state`` use the router's own methods of those names when
it has them (Router API of the routing work), and otherwise read the known state layouts.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ModuleMeshError
from .density import DensityRouter
from .routers import EntropyRouter, OracleRouter, RandomRouter, Router, TopKRouter

# Router kinds whose per-expert state alone routes among experts trained apart.
COMPOSABLE = ("density", "entropy")


def router_kind(router: Router) -> str:
    for kind, cls in (("density", DensityRouter), ("entropy", EntropyRouter), ("topk", TopKRouter),
                      ("random", RandomRouter), ("oracle", OracleRouter)):
        if isinstance(router, cls):
            return kind
    return type(router).__name__


def export_expert_state(router: Router, index: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-able description, tensors) of what ``router`` holds for expert ``index``."""
    info: dict[str, Any] = {"type": router_kind(router)}
    if hasattr(router, "export_expert_state"):
        state = router.export_expert_state(index)
        return info, {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if isinstance(router, DensityRouter):
        prefix = f"expert{index}."
        info.update(components=router.components, fitted=router.densities[index] is not None)
        return info, {k[len(prefix):]: v for k, v in router.export_state().items() if k.startswith(prefix)}
    if isinstance(router, OracleRouter):
        info["tasks"] = sorted(t for t, e in router.task_to_expert.items() if e == index)
        return info, {}
    if isinstance(router, TopKRouter):
        return info, {"head.weight": router.head.weight[index].detach(), "head.bias": router.head.bias[index:index + 1].detach()}
    return info, {}


def import_expert_state(router: Router, index: int, info: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Give ``router`` the state expert ``index`` carries (the router already has a slot for it)."""
    kind = router_kind(router)
    if info.get("type") != kind and kind != "entropy":
        raise ModuleMeshError(f"expert {index} carries {info.get('type')!r} router state; it cannot be routed by a {kind} router")
    if hasattr(router, "import_expert_state"):
        router.import_expert_state(index, state)
        return
    if isinstance(router, DensityRouter):
        if not state:
            raise ModuleMeshError(f"expert {index} has no fitted density; it was saved before its task ended")
        comps: list[dict[str, torch.Tensor]] = []
        for key, t in state.items():
            if key == "counts":
                continue
            c, name = key.split(".", 1)
            c = int(c[len("class"):])
            while len(comps) <= c:
                comps.append({})
            comps[c][name] = t
        router.densities[index] = comps
        router.counts[index] = state["counts"]
    elif isinstance(router, OracleRouter):
        for t in info.get("tasks", []):
            router.assign(int(t), index)
