"""``run --from MESH`` and ``run --tasks``: start a run from a saved mesh, or train only some tasks.

A run that continues a mesh (saved by ``run``, pulled from a hub or composed) loads it, freezes
every expert in it and trains only the scenario's tasks whose classes the mesh does not cover yet;
the loaded mesh's router routes among old and new experts. ``--tasks 2`` trains only task 2 of
the scenario: how one expert of a shared mesh is trained on its own machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..mesh import ModuleMesh


def start_record(from_mesh: str | None, tasks: Sequence[int] | None, n_tasks: int) -> dict[str, Any] | None:
    """What the run starts from, stored in its config.yaml (a resume must start from the same mesh);
    checked before the run writes anything."""
    if from_mesh is None and tasks is None:
        return None
    if tasks is not None:
        check_tasks(tasks, n_tasks)
    root = ModuleMesh.read_manifest(from_mesh)["seal"] if from_mesh is not None else None
    return {
        "from": str(from_mesh) if from_mesh else None,
        "from_root": root,
        "tasks": list(tasks) if tasks is not None else None,
    }


def check_tasks(tasks: Sequence[int], n_tasks: int) -> None:
    if not tasks or set(tasks) - set(range(n_tasks)):
        raise ConfigError(f"--tasks {','.join(map(str, tasks))}: the scenario has tasks 0..{n_tasks - 1}")


def continue_from(scenario, mesh: ModuleMesh, from_mesh: str | Path | None, tasks: Sequence[int] | None) -> ModuleMesh:
    """Restrict ``scenario`` (in place) to the tasks to train and return the mesh to start from."""
    if tasks is not None:
        check_tasks(tasks, len(scenario))
        scenario.tasks = [t for t in scenario.tasks if t.id in set(tasks)]
    if from_mesh is None:
        return mesh
    loaded = ModuleMesh.load(from_mesh)
    if loaded.num_classes > scenario.num_classes or tuple(loaded.input_shape) != tuple(scenario.input_shape):
        raise ConfigError(
            f"mesh {from_mesh} predicts {loaded.num_classes} classes of inputs {tuple(loaded.input_shape)}, "
            f"the config's data has {scenario.num_classes} classes of inputs {tuple(scenario.input_shape)}; "
            "continue it with data of the same kind"
        )
    # A composed mesh's label space ends at the largest class its experts cover; new tasks widen it.
    loaded.num_classes = scenario.num_classes
    for expert in loaded.experts:
        expert.freeze()
    covered = loaded.covered_classes()
    if scenario.kind != "domain_incremental":
        scenario.tasks = [t for t in scenario.tasks if not set(t.classes) <= covered]
    if not scenario.tasks:
        raise ConfigError(
            f"mesh {from_mesh} already covers every class of the config's tasks; "
            "continue it with a scenario that brings new classes"
        )
    return loaded
