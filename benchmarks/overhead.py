"""Overhead of ModuleMesh's training loop against a bare PyTorch loop on the same model and data.

Both train the same MLP 784-100-100-10 (same init, same batches, SGD) for one epoch over MNIST's
training set held in memory; the mesh side goes through Trainer + the finetune strategy + the mesh's
mixture output (one expert), the bare side is the textbook loop. Prints samples/s and the ratio.

    python benchmarks/overhead.py [--dataset mnist] [--batch-sizes 10 64] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from modulemesh.config import ExperimentConfig, load_config
from modulemesh.data.datasets import load_dataset
from modulemesh.data.scenarios import as_float, build_scenario
from modulemesh.io import atomic_write_json
from modulemesh.mesh import ModuleMesh, build_backbone, build_router
from modulemesh.strategies import build_strategy
from modulemesh.training.loop import Trainer, batch_bounds
from publish import publish


def bare_epoch(model, x, y, batch_size, lr, generator) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    order = torch.randperm(len(y), generator=generator)
    start = time.perf_counter()
    for begin, end in batch_bounds(len(y), batch_size):  # the same minibatches as the Trainer
        idx = order[begin:end]
        loss = F.cross_entropy(model(as_float(x[idx])), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def mesh_epoch(cfg, scenario) -> tuple[float, torch.nn.Module]:
    mesh = ModuleMesh(scenario.num_classes, scenario.input_shape, build_router("topk", scenario.input_shape))
    strategy = build_strategy(cfg, scenario)
    strategy.setup(mesh)
    trainer = Trainer(mesh, strategy, cfg.train, torch.device("cpu"), seed=cfg.seed)
    stats = trainer.train_task(scenario[0], scenario)
    return stats.wall_time_s, mesh


def measure(dataset: str, batch_size: int, repeats: int, scenario) -> dict:
    cfg = load_config(
        ExperimentConfig,
        None,
        [
            f"data.name={dataset}",
            "strategy.name=finetune",
            "scenario.n_tasks=1",
            "scenario.val_fraction=0",
            f"train.batch_size={batch_size}",
            "train.count_flops=false",
        ],
    )
    task = scenario[0]
    n = len(task.y_train)
    mesh_times, bare_times = [], []
    for r in range(repeats):  # alternate the two loops so machine noise hits both alike
        torch.manual_seed(r)
        t_mesh, _ = mesh_epoch(cfg, scenario)
        torch.manual_seed(r)
        model = build_backbone(cfg.expert.backbone, scenario.input_shape, scenario.num_classes)  # same architecture
        bare_times.append(
            bare_epoch(model, task.x_train, task.y_train, batch_size, cfg.train.lr, torch.Generator().manual_seed(r))
        )
        mesh_times.append(t_mesh)
    mesh_sps, bare_sps = n / statistics.median(mesh_times), n / statistics.median(bare_times)
    return {
        "batch_size": batch_size,
        "samples": n,
        "bare_samples_per_s": bare_sps,
        "mesh_samples_per_s": mesh_sps,
        "bare_epoch_s": statistics.median(bare_times),
        "mesh_epoch_s": statistics.median(mesh_times),
        "time_ratio_mesh_over_bare": bare_sps / mesh_sps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[10, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scenario = build_scenario(load_dataset(args.dataset), "class_incremental", 1, val_fraction=0.0, seed=0)
    rows = [measure(args.dataset, bs, args.repeats, scenario) for bs in args.batch_sizes]
    lines = [
        "| batch | bare PyTorch (samples/s) | ModuleMesh Trainer (samples/s) | bare epoch (s) | Trainer epoch "
        "(s) | time ratio (Trainer / bare) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['batch_size']} | {r['bare_samples_per_s']:,.0f} | {r['mesh_samples_per_s']:,.0f} | "
        f"{r['bare_epoch_s']:.1f} | "
        f"{r['mesh_epoch_s']:.1f} | {r['time_ratio_mesh_over_bare']:.3f} |"
        for r in rows
    ]
    table = "\n".join(lines)
    print(table)
    publish(
        "overhead",
        "Training-loop overhead",
        f"One epoch of {args.dataset} ({rows[0]['samples']:,} images) with the "
        f"784-100-100-10 MLP, SGD, {args.threads} torch thread, median of {args.repeats} repeats per "
        f"loop.\n\n{table}\n",
    )
    if args.json:
        atomic_write_json(
            args.json, {"dataset": args.dataset, "threads": args.threads, "repeats": args.repeats, "rows": rows}
        )


if __name__ == "__main__":
    main()
