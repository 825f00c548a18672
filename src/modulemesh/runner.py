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
from typing import Any, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from .checkpoint import load_module, save_module
from .config import ExperimentConfig, to_dict
from .data.datasets import load_dataset
from .data.scenarios import Scenario, as_float, build_scenario
from .decomposition import routing_decomposition, total_bytes
from .errors import ConfigError
from .io import atomic_write_json, atomic_write_yaml
from .mesh import Expert, ModuleMesh, OracleRouter, build_router
from .mesh.regularizers import specialization_scores
from .metrics import summarize
from .plots import accuracy_matrix_plot, routing_plot, task_accuracy_plot
from .strategies import build_strategy
from .training.loop import Trainer, evaluate
from .utils import resolve_device, seed_everything


class Callbacks:
    """Progress hooks for a front end (the CLI draws rich progress bars with them)."""

    def task_start(self, task_index: int, num_tasks: int, total_steps: int) -> None: ...
    def step(self, step: int, total: int) -> None: ...
    def task_end(self, task_index: int, accuracies: list[float]) -> None: ...


def build_experiment(cfg: ExperimentConfig) -> tuple[Scenario, ModuleMesh, Any]:
    """The scenario, an empty mesh with its router, and the strategy that will grow it."""
    if cfg.router.type == "oracle" and cfg.scenario.kind != "task_incremental":
        raise ConfigError("router.type=oracle needs task ids at test time; use scenario.kind=task_incremental or another router")
    dataset = load_dataset(cfg.data.name, cfg.data.root, **cfg.data.options)
    sc = cfg.scenario
    scenario = build_scenario(dataset, sc.kind, sc.n_tasks, sc.class_order, sc.shuffle_classes, sc.transform,
                              sc.val_fraction, cfg.seed, sc.max_train_per_task, sc.max_test_per_task, sc.test_groups)
    r = cfg.router
    router = build_router(r.type, scenario.input_shape, k=r.k, temperature=r.temperature, hidden=r.hidden,
                          renormalize=r.renormalize, components=r.components, seed=cfg.seed, clusters=r.clusters,
                          state_dtype=r.state_dtype, features=r.features, features_backbone=r.features_backbone,
                          features_expert=r.features_expert, expert_weight=r.expert_weight)
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


def _check_out_dir(out: Path, resolved: dict[str, Any]) -> bool:
    """True when OUT holds a checkpoint of this same experiment (resume); error if another's."""
    saved = out / "config.yaml"
    if not (out / "checkpoint" / "progress.json").exists():
        return False
    import yaml

    previous = yaml.safe_load(saved.read_text()) if saved.exists() else None
    if previous != resolved:
        diff = sorted(k for k in set(previous or {}) | set(resolved) if (previous or {}).get(k) != resolved.get(k))
        raise ConfigError(f"{out} holds a checkpoint of a different experiment (sections differ: {', '.join(diff)}); "
                          "use another --out, or --overwrite to start over")
    return True


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, callbacks: Optional[Callbacks] = None,
                   overwrite: bool = False) -> dict[str, Any]:
    cb = callbacks or Callbacks()
    out = Path(out_dir)
    resolved = to_dict(cfg)
    if overwrite and out.exists():
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    resuming = _check_out_dir(out, resolved)
    atomic_write_yaml(out / "config.yaml", resolved)

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run_start = time.perf_counter()
    scenario, mesh, strategy = build_experiment(cfg)
    reference = reference_accuracies(cfg, scenario, device)
    trainer = Trainer(mesh, strategy, cfg.train, device, seed=cfg.seed, on_step=cb.step)

    R: list[list[float]] = []
    per_task: list[dict[str, Any]] = []
    elapsed_before = 0.0
    ckpt = out / "checkpoint"
    if resuming:
        mesh, R, per_task, elapsed_before = _restore(ckpt, trainer, strategy, device)
        trainer.mesh = mesh
    else:
        strategy.setup(mesh)
        mesh.to(device)

    for task in scenario.tasks[len(R):]:
        trainer.on_start = lambda total, t=task.id: cb.task_start(t, len(scenario), total)
        stats = trainer.train_task(task, scenario)
        evals = _evaluate_all(trainer.mesh, scenario, device, cfg.train.eval_batch_size, strategy)
        R.append([e[0] for e in evals])
        per_task.append({"task": task.id, "classes": task.classes, **asdict(stats), "experts": len(trainer.mesh.experts)})
        cb.task_end(task.id, R[-1])
        _checkpoint(ckpt, trainer, strategy, R, per_task, elapsed_before + time.perf_counter() - run_start)

    mesh = trainer.mesh
    metrics = _final_metrics(cfg, scenario, mesh, device, R, reference, per_task,
                             elapsed_before + time.perf_counter() - run_start, strategy)
    mesh.save(out / "mesh")
    atomic_write_json(out / "metrics.json", metrics)
    accuracy_matrix_plot(R, out / "accuracy_matrix.png", f"{cfg.strategy.name} on {scenario.dataset} ({scenario.kind})")
    task_accuracy_plot(R, out / "task_accuracy.png")
    routing_plot(metrics["routing_matrix"], metrics["experts"], out / "routing.png")
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


def _final_metrics(cfg, scenario, mesh, device, R, reference, per_task, wall, strategy=None) -> dict[str, Any]:
    evals = _evaluate_all(mesh, scenario, device, cfg.train.eval_batch_size, strategy)
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
    decomposition = routing_decomposition(mesh, scenario, [e[1] for e in evals], per_task, device,
                                          cfg.train.eval_batch_size, strategy)
    return {
        "experiment": cfg.name, "strategy": cfg.strategy.name, "dataset": scenario.dataset, "scenario": scenario.kind,
        "num_tasks": len(scenario), "seed": cfg.seed, "device": str(device),
        **summary,
        **decomposition,
        **total_bytes(mesh, strategy),
        "final_accuracies": R[-1],
        "accuracy_matrix": R,
        "random_init_accuracies": reference,
        "params_trained_per_task": [p["params_trained"] for p in per_task],
        "flops": int(sum(p["flops"] for p in per_task)),
        "flops_per_task": [p["flops"] for p in per_task],
        "inference_flops_per_sample": fc.get_total_flops() / x.shape[0],
        "train_time_s": float(sum(p["wall_time_s"] for p in per_task)),
        "wall_time_s": wall,
        "peak_memory_mb": _peak_memory_mb(device),
        "experts": [e.name for e in mesh.experts],
        "expert_parameters": [e.num_parameters for e in mesh.experts],
        "total_parameters": sum(p.numel() for p in mesh.parameters()),
        # Non-parameter routing state (e.g. the density router's PPCA models) also costs memory.
        "router_state_elements": int(sum(t.numel() for t in mesh.router.export_state().values())),
        "specialization": dict(zip([e.name for e in mesh.experts], spec)),
        "routing_matrix": routing,
        "per_task": per_task,
        "units": {"accuracy": "percent", "specialization": "nats (entropy of p(class|expert); lower = more specialized)",
                  "flops": "training FLOPs (forward + backward), torch.utils.flop_counter"},
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
    atomic_write_json(ckpt / "progress.json", {"completed_tasks": k, "dir": target.name, "accuracy_matrix": R,
                                                "per_task": per_task, "elapsed_s": elapsed})
    for old in ckpt.glob("after_task*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)


def _restore(ckpt: Path, trainer: Trainer, strategy, device):
    progress = json.loads((ckpt / "progress.json").read_text())
    target = ckpt / progress["dir"]
    mesh = ModuleMesh.load(target / "mesh", device=device)
    state, _ = load_module(target / "state")
    strategy.load_state_dict({k[9:]: v.to(device) for k, v in state.items() if k.startswith("strategy.")})
    torch.set_rng_state(state["rng.torch"])
    trainer.generator.set_state(state["rng.trainer"])
    # Experts frozen before the checkpoint stay frozen; the manifest records it.
    return mesh, progress["accuracy_matrix"], progress["per_task"], progress["elapsed_s"]
