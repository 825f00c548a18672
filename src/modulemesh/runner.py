"""Run one continual experiment end to end: data -> scenario -> strategy -> mesh -> metrics -> files.

The run is resumable: after every task the mesh, the strategy's state (e.g. its replay buffer),
the RNG states and the accuracy rows so far are checkpointed under ``OUT/checkpoint``; running the
same config with the same ``--out`` again continues after the last finished task and gives the
same numbers as an uninterrupted run.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from .checkpoint import load_module, save_module
from .config import ExperimentConfig, to_dict
from .data.datasets import load_dataset
from .data.scenarios import Scenario, as_float, build_scenario
from .decomposition import routing_decomposition, total_bytes
from .errors import CheckpointError, ConfigError
from .io import atomic_write_json, atomic_write_yaml, check_output_path, read_json_file, set_aside
from .mesh import Expert, ModuleMesh, OracleRouter, build_router
from .mesh.adaptive import inference_costs
from .mesh.provenance import stamp_trained
from .mesh.regularizers import specialization_scores
from .metrics import summarize
from .plots import accuracy_matrix_plot, routing_plot, task_accuracy_plot
from .sharing.continuation import continue_from, start_record
from .strategies import build_strategy
from .training.evaluate import evaluate_task as evaluate
from .training.loggers import RunLog
from .training.loop import Trainer, router_state
from .utils import resolve_device, seed_everything


class Callbacks:
    """Progress hooks for a front end (the CLI draws rich progress bars with them)."""

    def task_start(self, task_index: int, num_tasks: int, total_steps: int) -> None: ...
    def step(self, step: int, total: int) -> None: ...
    def task_end(self, task_index: int, accuracies: list[float]) -> None: ...


def build_experiment(cfg: ExperimentConfig) -> tuple[Scenario, ModuleMesh, Any]:
    """The scenario, an empty mesh with its router, and the strategy that will grow it."""
    if cfg.router.type == "oracle" and cfg.scenario.kind != "task_incremental":
        raise ConfigError(
            "router.type=oracle needs task ids at test time; use scenario.kind=task_incremental or another router"
        )
    dataset = load_dataset(cfg.data.name, cfg.data.root, **cfg.data.options)
    sc = cfg.scenario
    scenario = build_scenario(
        dataset,
        sc.kind,
        sc.n_tasks,
        sc.class_order,
        sc.shuffle_classes,
        sc.transform,
        sc.val_fraction,
        cfg.seed,
        sc.max_train_per_task,
        sc.max_test_per_task,
        sc.test_groups,
    )
    r = cfg.router
    router = build_router(
        r.type,
        scenario.input_shape,
        k=r.k,
        temperature=r.temperature,
        hidden=r.hidden,
        renormalize=r.renormalize,
        components=r.components,
        seed=cfg.seed,
        clusters=r.clusters,
        state_dtype=r.state_dtype,
        features=r.features,
        features_backbone=r.features_backbone,
        features_expert=r.features_expert,
        expert_weight=r.expert_weight,
        probe_weight=r.probe_weight,
        threshold=r.threshold,
    )
    mesh = ModuleMesh(scenario.num_classes, scenario.input_shape, router)
    return scenario, mesh, build_strategy(cfg, scenario)


def reference_accuracies(cfg: ExperimentConfig, scenario: Scenario, device: torch.device) -> list[float]:
    """Accuracy of a randomly initialized expert over all classes on each task (FWT's b_j)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 10_007)
        expert = Expert("random_init", list(range(scenario.num_classes)), cfg.expert.backbone, scenario.input_shape)
        ref = ModuleMesh(scenario.num_classes, scenario.input_shape, OracleRouter()).to(device)
        ref.add_expert(expert.to(device))
        return [e[0] for e in _evaluate_all(ref, scenario, device, cfg.train.eval_batch_size)]


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


PLOTS = ("accuracy_matrix.png", "task_accuracy.png", "routing.png")
RUN_OUTPUTS = ("metrics.json", "config.yaml", *PLOTS, "mesh", "checkpoint")
_OVERWRITE_FIX = "rerun with --overwrite to start this run over"


def _saved_config(out: Path) -> Optional[dict[str, Any]]:
    """OUT/config.yaml as a dict (None when absent); a damaged file is one error naming it."""
    import yaml

    saved = out / "config.yaml"
    if not saved.exists():
        return None
    try:
        previous = yaml.safe_load(saved.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"{saved} cannot be read ({str(e).splitlines()[0]}); {_OVERWRITE_FIX}") from None
    if not isinstance(previous, dict):
        raise CheckpointError(f"{saved} is not a saved experiment config (no mapping of sections); {_OVERWRITE_FIX}")
    # Read through today's schema so a key added since (with its behaviour-preserving default) does not
    # make an older run look like another experiment; a config the schema refuses is compared as saved.
    try:
        return to_dict(ExperimentConfig.model_validate(previous))
    except ValueError:
        return previous


def _check_out_dir(out: Path, resolved: dict[str, Any]) -> bool:
    """True when OUT holds a checkpoint of this same experiment (resume); error if another's."""
    if not (out / "checkpoint" / "progress.json").exists():
        return False
    previous = _saved_config(out)
    if previous != resolved:
        diff = sorted(k for k in set(previous or {}) | set(resolved) if (previous or {}).get(k) != resolved.get(k))
        raise ConfigError(
            f"{out} holds a checkpoint of a different experiment (sections differ: {', '.join(diff)}); "
            "use another --out, or --overwrite to start over"
        )
    return True


def _remove_outputs(out: Path) -> None:
    """``--overwrite``: remove what a run writes (and nothing else the user keeps in OUT); see ``io.set_aside``."""
    for name in RUN_OUTPUTS:
        set_aside(out / name)


def _write_plots(out: Path, metrics: dict[str, Any], only_missing: bool = False) -> None:
    """The three plots, all drawn from metrics.json, so a finished run can recreate any that went missing."""
    R = metrics["accuracy_matrix"]
    title = f"{metrics['strategy']} on {metrics['dataset']} ({metrics['scenario']})"
    draw = {
        "accuracy_matrix.png": lambda p: accuracy_matrix_plot(R, p, title),
        "task_accuracy.png": lambda p: task_accuracy_plot(R, p),
        "routing.png": lambda p: routing_plot(metrics["routing_matrix"], metrics["experts"], p),
    }
    for name, plot in draw.items():
        if not (only_missing and (out / name).is_file()):
            plot(out / name)


def finished_run(out_dir: str | Path, cfg: ExperimentConfig) -> Optional[dict[str, Any]]:
    """metrics.json of a finished run of exactly ``cfg`` in OUT, with any missing plot redrawn; else None.

    metrics.json is written last, so its presence means the mesh and plots were written too; a plot deleted
    (or lost by a run killed under an older version) is redrawn from the metrics. A missing mesh/ cannot be
    redrawn: then None, and ``run_experiment`` resumes from the final checkpoint and writes everything again.
    """
    out = Path(out_dir)
    try:
        if _saved_config(out) != to_dict(cfg) or not (out / "mesh").is_dir():
            return None
        metrics = json.loads((out / "metrics.json").read_bytes().decode("utf-8"))
    except (OSError, ValueError, CheckpointError):
        return None  # absent or damaged: the run is not finished, run (or resume) it
    if not isinstance(metrics, dict) or not {"accuracy_matrix", "routing_matrix", "experts"} <= set(metrics):
        return None
    _write_plots(out, metrics, only_missing=True)
    return metrics


def run_experiment(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    callbacks: Optional[Callbacks] = None,
    overwrite: bool = False,
    log: Sequence[str] = ("csv",),
    from_mesh: Optional[str] = None,
    tasks: Optional[list[int]] = None,
) -> dict[str, Any]:
    """Run (or resume) one experiment into ``out_dir``. ``log`` picks the watchable logs (csv, tensorboard);
    ``from_mesh`` continues that saved mesh (its experts frozen); ``tasks`` trains only these task indices."""
    cb = callbacks or Callbacks()
    out = check_output_path(out_dir)
    resolved = to_dict(cfg)
    start = start_record(from_mesh, tasks, cfg.scenario.n_tasks)
    if start is not None:
        resolved["start"] = start

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run_start = time.perf_counter()
    # Data, scenario, router and strategy are all built (and so validated) before OUT is touched.
    scenario, mesh, strategy = build_experiment(cfg)
    mesh = continue_from(scenario, mesh, from_mesh, tasks)
    reference = reference_accuracies(cfg, scenario, device)
    trainer = Trainer(mesh, strategy, cfg.train, device, seed=cfg.seed, on_step=cb.step)
    if overwrite:
        _remove_outputs(out)
    resuming = _check_out_dir(out, resolved)
    atomic_write_yaml(out / "config.yaml", resolved)

    R: list[list[float]] = []
    per_task: list[dict[str, Any]] = []
    elapsed_before = 0.0
    ckpt = out / "checkpoint"
    if resuming:
        mesh, R, per_task, elapsed_before = _restore(ckpt, trainer, strategy, device, len(scenario))
        trainer.mesh = mesh
    else:
        strategy.setup(mesh)
        mesh.to(device)

    steps_done = sum(p.get("steps", 0) for p in per_task)
    run_log = RunLog(out, log, keep_tasks=len(R), resume_step=steps_done)
    try:
        for task in scenario.tasks[len(R) :]:
            trainer.on_start = lambda total, t=task.id: cb.task_start(t, len(scenario), total)
            trainer.on_loss = lambda step, loss, t=task.id, s0=steps_done: run_log.scalar(
                "train/loss", loss, s0 + step, t
            )
            stats = trainer.train_task(task, scenario)
            steps_done += stats.steps
            evals = _evaluate_all(trainer.mesh, scenario, device, cfg.train.eval_batch_size, strategy)
            R.append([e[0] for e in evals])
            stamp_trained(trainer.mesh, task, to_dict(cfg), R[-1][len(R) - 1])
            run_log.task_end(task.id, steps_done, R[-1])
            per_task.append(
                {"task": task.id, "classes": task.classes, **asdict(stats), "experts": len(trainer.mesh.experts)}
            )
            cb.task_end(task.id, R[-1])
            _checkpoint(ckpt, trainer, strategy, R, per_task, elapsed_before + time.perf_counter() - run_start)
    finally:
        run_log.close()

    mesh = trainer.mesh
    metrics = _final_metrics(
        cfg, scenario, mesh, device, R, reference, per_task, elapsed_before + time.perf_counter() - run_start, strategy
    )
    mesh.save(out / "mesh")
    _write_plots(out, metrics)
    atomic_write_json(out / "metrics.json", metrics)  # last: its presence marks a finished run (see finished_run)
    return metrics


def _evaluate_all(mesh, scenario: Scenario, device, batch_size: int, strategy=None) -> list:
    """``evaluate`` on every task; tasks that share one test set (``scenario.test_groups``) are evaluated once.

    Without task ids at test time the result depends only on the test tensors, so sharing is exact.
    """
    done: dict = {}
    out = []
    for t in scenario:
        key = ("task", t.id) if scenario.task_ids_at_test else (id(t.x_test), id(t.y_test))
        if key not in done:
            done[key] = evaluate(mesh, t, scenario, device, batch_size, strategy=strategy)
        out.append(done[key])
    return out


def _validation_accuracies(mesh, scenario: Scenario, device, batch_size: int, strategy=None) -> Optional[list[float]]:
    """The final mesh's accuracy (%) on each task's validation split (None without one): what
    ``compare --tune`` picks hyper-parameters by, so that no choice ever reads the test split."""
    if any(len(t.y_val) == 0 for t in scenario):
        return None
    return [evaluate(mesh, t, scenario, device, batch_size, split="val", strategy=strategy)[0] for t in scenario]


def _final_metrics(cfg, scenario, mesh, device, R, reference, per_task, wall, strategy=None) -> dict[str, Any]:
    evals = _evaluate_all(mesh, scenario, device, cfg.train.eval_batch_size, strategy)
    val = _validation_accuracies(mesh, scenario, device, cfg.train.eval_batch_size, strategy)
    routing = [e[1].mean(0).tolist() for e in evals]
    weights, targets = torch.cat([e[1] for e in evals]), torch.cat([e[2] for e in evals])
    spec = specialization_scores(weights, targets, scenario.num_classes).tolist()
    x = torch.cat([t.x_test[:64] for t in scenario])
    t_ids = torch.cat([torch.full((min(64, t.x_test.shape[0]),), t.id) for t in scenario]).to(device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        mesh.eval()
        mesh(as_float(x.to(device)), t_ids if scenario.task_ids_at_test else None)
    summary = summarize(R, reference)
    # Accuracy = task prediction x within-task prediction; bytes = what the method keeps (issue 12).
    decomposition = routing_decomposition(
        mesh, scenario, [e[1] for e in evals], per_task, device, cfg.train.eval_batch_size, strategy
    )
    return {
        "experiment": cfg.name,
        "strategy": cfg.strategy.name,
        "dataset": scenario.dataset,
        "scenario": scenario.kind,
        "num_tasks": len(scenario),
        "seed": cfg.seed,
        "device": str(device),
        **summary,
        **decomposition,
        **total_bytes(mesh, strategy),
        "final_accuracies": R[-1],
        "validation_accuracies": val,
        "validation_average_accuracy": None if val is None else sum(val) / len(val),
        "accuracy_matrix": R,
        "random_init_accuracies": reference,
        # What a task changed: trained parameters plus the router state fit for it (density models).
        "params_trained_per_task": [p["params_trained"] + p.get("router_state_changed", 0) for p in per_task],
        "parameters_changed_per_task": [p["params_trained"] for p in per_task],
        "router_state_fit_per_task": [p.get("router_state_changed", 0) for p in per_task],
        # Every cost covers the training loop and the strategy's work around it (fits, Fisher, herding).
        "flops": int(sum(p["flops"] for p in per_task)),
        "flops_per_task": [p["flops"] for p in per_task],
        "train_loop_flops": int(sum(p.get("train_flops", p["flops"]) for p in per_task)),
        "strategy_flops": int(sum(p.get("strategy_flops", 0) for p in per_task)),
        "inference_flops_per_sample": fc.get_total_flops() / x.shape[0],
        # Per test input, the experts the mesh actually ran (fewer under router.k: auto) and the router.
        **inference_costs(mesh, weights),
        "train_time_s": float(sum(p["wall_time_s"] for p in per_task)),
        "train_loop_time_s": float(sum(p.get("train_time_s", p["wall_time_s"]) for p in per_task)),
        "strategy_time_s": float(sum(p.get("strategy_time_s", 0.0) for p in per_task)),
        "wall_time_s": wall,
        "peak_memory_mb": _peak_memory_mb(device),
        "experts": [e.name for e in mesh.experts],
        "expert_parameters": [e.num_parameters for e in mesh.experts],
        "total_parameters": sum(p.numel() for p in mesh.parameters()),
        # Non-parameter routing state (e.g. the density router's PPCA models) also costs memory; a
        # learned gate's parameters are already in total_parameters and are not counted again.
        "router_state_elements": int(sum(t.numel() for t in router_state(mesh).values())),
        "specialization": dict(zip([e.name for e in mesh.experts], spec)),
        "routing_matrix": routing,
        "per_task": per_task,
        "units": {
            "accuracy": "percent",
            "specialization": "nats (entropy of p(class|expert); lower = more specialized)",
            "flops": "FLOPs of the training loop (forward + backward, torch.utils.flop_counter) plus the "
            "strategy's work before and after each task; decompositions (SVD, eigh, ...) counted "
            "analytically (modulemesh.costs)",
            "train_time_s": "seconds per task summed: training loop + the strategy's work before and after it",
        },
    }


def _checkpoint(ckpt: Path, trainer: Trainer, strategy, R, per_task, elapsed: float) -> None:
    """Write task k's checkpoint next to the previous one, then switch progress.json to it."""
    k = len(R)
    target = ckpt / f"after_task{k - 1}"
    shutil.rmtree(target, ignore_errors=True)
    trainer.mesh.save(target / "mesh")
    state = {f"strategy.{n}": v for n, v in strategy.state_dict().items()}
    state["rng.torch"] = torch.get_rng_state()
    state["rng.trainer"] = trainer.generator.get_state()
    save_module(target / "state", state, {"kind": "run_state"})
    atomic_write_json(
        ckpt / "progress.json",
        {"completed_tasks": k, "dir": target.name, "accuracy_matrix": R, "per_task": per_task, "elapsed_s": elapsed},
    )
    for old in ckpt.glob("after_task*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)


def _restore(ckpt: Path, trainer: Trainer, strategy, device, num_tasks: int):
    progress = read_json_file(ckpt / "progress.json", "checkpoint progress file", _OVERWRITE_FIX)
    try:
        done, target = int(progress["completed_tasks"]), ckpt / str(progress["dir"])
        R, per_task, elapsed = progress["accuracy_matrix"], progress["per_task"], float(progress["elapsed_s"])
        if not (1 <= done <= num_tasks and len(R) == len(per_task) == done and all(len(r) == num_tasks for r in R)):
            raise ValueError(f"{done} tasks done, {len(R)} accuracy rows, {len(per_task)} task records")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint progress file {ckpt / 'progress.json'} is inconsistent ({e}); {_OVERWRITE_FIX}"
        ) from None
    try:
        mesh = ModuleMesh.load(target / "mesh", device=device)
        state, _ = load_module(target / "state")
    except (CheckpointError, KeyError, TypeError, ValueError) as e:
        # Malformed but parseable files (a list where a mapping belongs, a missing key) surface as Key/Type/ValueError.
        raise CheckpointError(
            f"the checkpoint in {ckpt} is damaged: {e!s}; to resume is impossible, {_OVERWRITE_FIX}"
        ) from None
    if "rng.torch" not in state or "rng.trainer" not in state:
        raise CheckpointError(f"checkpoint state {target / 'state'} lacks the RNG states; {_OVERWRITE_FIX}")
    strategy.load_state_dict({k[9:]: v.to(device) for k, v in state.items() if k.startswith("strategy.")})
    torch.set_rng_state(state["rng.torch"])
    trainer.generator.set_state(state["rng.trainer"])
    # Experts frozen before the checkpoint stay frozen; the manifest records it.
    return mesh, R, per_task, elapsed
