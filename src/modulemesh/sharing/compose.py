"""``compose``: one mesh from experts trained apart, routed with no retraining.

Each expert record carries its own router state (see ``mesh.expert_routing``). With the density
router every expert brings the input density of its own training data, so the composed mesh routes
by the posterior over experts exactly as a mesh grown task by task would; the entropy router needs
no state at all. Experts must take the same input shape and cover disjoint classes (duplicates of
one module are merged with ``merge`` instead); the mesh predicts over the union of their classes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional, Sequence

from ..errors import CheckpointError, ModuleMeshError
from ..mesh import DensityRouter, EntropyRouter, Expert, ModuleMesh
from ..mesh.expert_routing import import_expert_state

RouterChoice = Literal["auto", "density", "entropy"]


def load_experts(paths: Sequence[str | os.PathLike]) -> list[tuple[str, Expert]]:
    """(source, expert) for every expert record or every expert of every mesh directory given."""
    found: list[tuple[str, Expert]] = []
    for p in map(Path, paths):
        if p.is_dir() and (p / "mesh.json").exists():
            found += [(f"{p}:{e.name}", e) for e in ModuleMesh.load(p).experts]
        elif p.is_dir():
            raise CheckpointError(
                f"{p} is a directory without mesh.json; name a mesh directory or an expert record (NAME.json)"
            )
        elif p.exists() or p.with_name(p.name + ".json").exists() or p.with_suffix(".json").exists():
            found.append((str(p), Expert.load(p)))
        else:
            raise CheckpointError(f"unknown expert {str(p)!r}: no expert record or mesh directory there")
    if not found:
        raise ModuleMeshError("nothing to compose: give at least one expert or mesh")
    return found


def check_composable(found: Sequence[tuple[str, Expert]]) -> None:
    shape = tuple(found[0][1].input_shape)
    owner: dict[int, str] = {}
    for source, e in found:
        if tuple(e.input_shape) != shape:
            raise ModuleMeshError(
                f"incompatible input shapes: {found[0][0]} takes {shape}, {source} takes "
                f"{tuple(e.input_shape)}; compose experts trained on the same kind of data"
            )
        for c in e.classes:
            if c in owner:
                raise ModuleMeshError(
                    f"class clash: class {c} is covered by both {owner[c]} and {source}; compose experts with "
                    "disjoint classes (merge copies of one module with `modulemesh merge`)"
                )
            owner[c] = source


def compose(
    found: Sequence[tuple[str, Expert]],
    router: RouterChoice = "auto",
    num_classes: Optional[int] = None,
    temperature: float = 1.0,
) -> ModuleMesh:
    check_composable(found)
    experts = [e for _, e in found]
    fitted = [e.router_state[0].get("type") == "density" and bool(e.router_state[1]) for e in experts]
    if router == "auto":
        router = "density" if all(fitted) else "entropy"
    if router == "density" and not all(fitted):
        missing = [src for (src, _), ok in zip(found, fitted) if not ok]
        raise ModuleMeshError(
            f"--router density needs every expert's input density; {', '.join(missing)} carries none "
            "(use --router entropy, or retrain them with router.type=density)"
        )
    top = max(c for e in experts for c in e.classes) + 1
    if num_classes is not None and num_classes < top:
        raise ModuleMeshError(f"--num-classes {num_classes} is below the largest class covered ({top - 1})")
    mesh = ModuleMesh(
        num_classes or top,
        tuple(experts[0].input_shape),
        DensityRouter(temperature=temperature) if router == "density" else EntropyRouter(temperature=temperature),
    )
    taken: set[str] = set()
    for expert in experts:
        name, n = expert.name, 2
        while name in taken:
            name, n = f"{expert.name}_{n}", n + 1
        taken.add(name)
        expert.name = name
        mesh.add_expert(expert.freeze())
        import_expert_state(mesh.router, len(mesh.experts) - 1, *expert.router_state)
    return mesh
