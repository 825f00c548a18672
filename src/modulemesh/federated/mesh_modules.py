"""The modules mode on the library's mesh: experts are ``mesh.Expert``, routing is ``mesh.EntropyRouter``.

Module ``m<j>`` is an ``Expert`` over all classes, built from ``federation.modules.expert`` with
seed ``seed * 7919 + j`` (every engine starts from the same weights). A peer's model is a
``ModuleMesh`` of the experts it hosts under an ``EntropyRouter`` (seed 000 §3.3C), and the
whole federation's model is the mesh of all M modules, each averaged over its holders. That mesh
is what ``write_mesh`` saves (``ModuleMesh.save``) for ``ModuleMesh.load`` and the other commands.

For vmapped training the sim engine runs one template mesh whose h experts are slots ``s0..``;
``slot_params`` maps a peer's hosted module states onto those slots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import ConfigError
from ..mesh.mesh import ModuleMesh
from ..mesh.pool import ExpertPool
from ..mesh.routers import EntropyRouter
from ..training.evaluate import count_correct
from .expert_init import has_batchnorm, new_expert
from .weights import State, module_names

SLOT = "s"


def module_assignment(num_peers: int, num_modules: int, per_peer: int) -> list[list[int]]:
    """Peer p hosts modules ``(p + j) mod M`` for j < per_peer: on a ring, holders are neighbours."""
    if per_peer > num_modules:
        raise ConfigError(f"modules_per_peer={per_peer} exceeds num_modules={num_modules}")
    return [[(p + j) % num_modules for j in range(per_peer)] for p in range(num_peers)]


def num_modules(fc) -> int:
    return fc.modules.num_modules or fc.clients


def hosting_plan(fc) -> list[list[str]]:
    """Names of the modules each peer hosts."""
    names = module_names(num_modules(fc))
    return [
        [names[j] for j in mods] for mods in module_assignment(fc.clients, num_modules(fc), fc.modules.modules_per_peer)
    ]


def initial_module(
    fc, input_shape: Sequence[int], num_classes: int, seed: int, name: str, device: str | torch.device = "cpu"
) -> State:
    """Module ``name``'s seeded initial weights (the same on every engine and peer)."""
    j = int(name[1:])
    e = new_expert(name, fc.modules.expert, input_shape, num_classes, seed * 7919 + j, device)
    return {n: p.detach().clone() for n, p in e.named_parameters()}


def make_mesh(
    fc,
    input_shape: Sequence[int],
    num_classes: int,
    names: Sequence[str],
    device: str | torch.device = "cpu",
    spec: Mapping[str, Any] | None = None,
) -> ModuleMesh:
    """A mesh of experts called ``names`` (weights to be loaded), routed by the library's EntropyRouter.

    ``spec`` is the experts' backbone (default: the modules mode's ``federation.modules.expert``).
    """
    pool = ExpertPool()
    for name in names:
        pool.add(new_expert(name, dict(spec or fc.modules.expert), input_shape, num_classes, 0, device))
    mesh = ModuleMesh(num_classes, tuple(input_shape), EntropyRouter(temperature=fc.modules.router_temperature), pool)
    return mesh.to(device).requires_grad_(False)


def peer_template(
    fc, input_shape: Sequence[int], num_classes: int, hosted: int, device: str | torch.device = "cpu"
) -> ModuleMesh:
    """The mesh every peer runs, with its ``hosted`` experts as slots ``s0..s{h-1}``."""
    return make_mesh(fc, input_shape, num_classes, [f"{SLOT}{j}" for j in range(hosted)], device)


def expert_prefix(name: str) -> str:
    return f"pool.experts.{name}."


def slot_key(j: int, param: str) -> str:
    """Template-mesh parameter name of ``param`` of slot j."""
    return expert_prefix(f"{SLOT}{j}") + param


def slot_params(states: Sequence[Mapping[str, torch.Tensor]]) -> State:
    """A peer's hosted module states, in hosting order, as the template mesh's parameters."""
    return {slot_key(j, n): v for j, s in enumerate(states) for n, v in s.items()}


def _natural(name: str) -> tuple[str, int]:
    stem = name.rstrip("0123456789")
    return stem, int(name[len(stem) :] or 0)


def mesh_of(
    fc,
    states: Mapping[str, Mapping[str, torch.Tensor]],
    input_shape: Sequence[int],
    num_classes: int,
    device: str | torch.device = "cpu",
    metadata: Mapping[str, Mapping[str, Any]] | None = None,
    spec: Mapping[str, Any] | None = None,
) -> ModuleMesh:
    """The mesh of the given modules (m0, m1, ... in order), weights loaded, ready to evaluate or save."""
    names = sorted(states, key=_natural)
    mesh = make_mesh(fc, input_shape, num_classes, names, device, spec)
    for e in mesh.experts:
        e.load_state_dict({n: v.to(device) for n, v in states[e.name].items()}, strict=True)
        e.metadata.update((metadata or {}).get(e.name, {}))
    return mesh


@torch.no_grad()
def mesh_accuracy(mesh: ModuleMesh, x: torch.Tensor, y: torch.Tensor, batch: int = 2048) -> float:
    """Fraction of ``x`` the mesh classifies right (the training toolkit's evaluate loop)."""
    return count_correct(lambda xb: mesh(xb).log_probs, x, y, batch) / max(len(x), 1)


def write_mesh(mesh: ModuleMesh, directory: Path) -> Path:
    """Save with ``ModuleMesh.save``; refuses experts ``ModuleMesh.load`` could not rebuild."""
    if any(has_batchnorm(e) for e in mesh.experts):
        raise ConfigError(
            "federated experts normalise with batch statistics (no running BatchNorm statistics to save); "
            "use an expert backbone without BatchNorm (e.g. type mlp) to write a mesh"
        )
    return mesh.cpu().save(directory)


def provenance(engine: str, rounds: int, holders: Mapping[str, Sequence[int]], examples: Mapping[str, int]) -> dict:
    """Manifest metadata of each federated module: who held it and how many examples trained it."""
    return {
        m: {
            "trained_by": "modulemesh federate --mode modules",
            "engine": engine,
            "rounds": rounds,
            "holders": list(holders[m]),
            "examples": int(examples[m]),
        }
        for m in holders
    }


def holders_of(plan: Sequence[Sequence[str]], counts: Sequence[int]) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Per module: the peers hosting it and their total examples."""
    holders: dict[str, list[int]] = {}
    for p, mods in enumerate(plan):
        for m in mods:
            holders.setdefault(m, []).append(p)
    return holders, {m: sum(counts[p] for p in ps) for m, ps in holders.items()}
