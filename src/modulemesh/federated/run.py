"""One ``modulemesh federate`` run: validate, load the split, run an engine, write the results and the mesh.

``run_federate(exp, out)`` is what the command calls (the command only parses and prints).
Outputs in ``out`` (every file atomic): ``config.yaml``, ``results.json`` (per-round records and
summary), ``rounds.csv``, three plots, ``state.safetensors``/``state.json`` (the sim engine's
resumable tensors; hivemind: each peer's modules), and ``mesh/`` - the trained model as a
``ModuleMesh`` (``ModuleMesh.save``): in ``modules`` mode every expert module averaged over its
holders under the library's EntropyRouter; in ``fedavg`` / ``central`` / ``distill`` mode the
global model / student as a one-expert mesh (``local`` trains no single model and writes none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import mesh_modules as mm
from . import results as res
from . import weights as wmod

MESH_DIR = "mesh"


@dataclass
class Outcome:
    summary: dict[str, Any]
    out: Path
    resumed_after: int = 0  # rounds already on disk when this run started
    already_done: bool = False
    notes: list[str] = field(default_factory=list)


def check_engine(fc) -> None:
    """Refuse what the chosen engine cannot run, before any data is loaded or process started."""
    if fc.engine == "hivemind":
        from .hivemind.config import check_config

        check_config(fc)
    elif fc.engine == "flower":
        from .flower.app import check_config

        check_config(fc)


def federation_mesh(exp, data, modules: wmod.ModuleStates, engine: str, rounds: int):
    """The run's trained model as a ModuleMesh (None for the local baseline)."""
    fc = exp.federation
    if not modules:
        return None
    if fc.mode == "modules":
        holders, examples = mm.holders_of(mm.hosting_plan(fc), data.counts)
        meta = mm.provenance(engine, rounds, holders, examples)
        return mm.mesh_of(fc, modules, data.input_shape, data.num_classes, "cpu", meta)
    spec = fc.distill.student_backbone or fc.backbone if fc.mode == "distill" else fc.backbone
    meta = {
        name: {
            "trained_by": f"modulemesh federate --mode {fc.mode}",
            "engine": engine,
            "rounds": rounds,
            "examples": int(sum(data.counts)),
        }
        for name in modules
    }
    return mm.mesh_of(fc, modules, data.input_shape, data.num_classes, "cpu", meta, spec=spec)


def write_results(
    out: Path,
    exp,
    history: list[dict],
    data=None,
    runner=None,
    modules: Optional[wmod.ModuleStates] = None,
    engine: str = "sim",
) -> dict:
    """results.json, rounds.csv, plots and, when a model was trained, ``mesh/``.

    The mesh is written before results.json: a complete results.json marks a finished run (a rerun only
    redraws it), so everything it names must already be on disk.
    """
    from ..config import to_dict

    cfg = to_dict(exp)
    extra = {}
    if data is not None and modules:
        mesh = federation_mesh(exp, data, modules, engine, len(history))
        mm.write_mesh(mesh, out / MESH_DIR)
        extra = {"mesh": MESH_DIR, "mesh_accuracy": mm.mesh_accuracy(mesh, data.x_test.cpu(), data.y_test.cpu())}
    return res.write_outputs(out, cfg, history, final=True, data=data, runner=runner, extra=extra)


def run_federate(exp, out: Path, overwrite: bool = False, progress: bool = True) -> Outcome:
    from ..config import to_dict
    from ..utils import resolve_device, seed_everything
    from .sim.data import fed_data_from_experiment

    fc = exp.federation
    check_engine(fc)
    cfg = to_dict(exp)
    history, state = res.resume_point(out, cfg, overwrite=overwrite)
    # Every round done: a finished run is only redrawn; one killed while writing its results (the
    # membership audit, the mesh) resumes from its last state and computes them (sim engine).
    if len(history) >= fc.rounds and (state is None or fc.engine != "sim"):
        return Outcome(res.rewrite_finished(out, cfg, history), out, len(history), already_done=True)
    device = resolve_device(exp.device)
    seed_everything(exp.seed)
    data = fed_data_from_experiment(exp, device)
    label = f"{fc.engine} {fc.mode} K={fc.clients} alpha={fc.alpha} {fc.partition}"
    if fc.engine == "flower":
        from .flower import run_flower_simulation

        history, modules = run_flower_simulation(exp, data, progress=progress)
        return Outcome(write_results(out, exp, history, data, modules=modules, engine="flower"), out)
    if fc.engine == "hivemind":
        from .hivemind import run_hivemind

        with res.Progress(fc.rounds, 0, label, enabled=progress) as bar:
            history, state, modules = run_hivemind(exp, data, on_round=bar.update)
        res.save_round(out, cfg, history, state)
        return Outcome(write_results(out, exp, history, data, modules=modules, engine="hivemind"), out)
    return _run_sim(exp, cfg, out, data, history, state, progress, label)


def _run_sim(exp, cfg: dict, out: Path, data, history: list[dict], state, progress: bool, label: str) -> Outcome:
    from .sim import make_runner, simulate

    fc = exp.federation
    runner = make_runner(fc, data, exp.seed)
    if state is not None:
        runner.load_state(state)
        if fc.failure_mode == "permanent":
            runner.dead = {i for rec in history for i in rec["failed"]}
    start = len(history)

    def on_round(rec: dict) -> None:
        history.append(rec)
        res.save_round(out, cfg, history, runner.state())
        bar.update(rec)

    with res.Progress(fc.rounds, start, label, enabled=progress) as bar:
        simulate(
            fc,
            data,
            exp.seed,
            runner=runner,
            start_round=start,
            on_round=on_round,
            bytes_before=history[-1]["bytes_cumulative"] if history else 0,
        )
    modules = runner.consensus_modules() if fc.mode == "modules" else getattr(runner, "modules", dict)()
    return Outcome(write_results(out, exp, history, data, runner=runner, modules=modules), out, start)
