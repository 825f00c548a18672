"""Overhead of ModuleMesh's training loop against a bare PyTorch loop on the same model and data.

Both train the same MLP 784-100-100-10 (same init, same batches, SGD) for one epoch over MNIST's
training set held in memory; the mesh side goes through Trainer + the finetune strategy + the mesh's
mixture output (one expert), the bare side is the textbook loop. Prints samples/s and the ratio.

    python benchmarks/overhead.py [--dataset mnist] [--batch-size 64] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(ExperimentConfig, None, [f"data.name={args.dataset}", "strategy.name=finetune", "scenario.n_tasks=1",
                                               "scenario.val_fraction=0", f"train.batch_size={args.batch_size}",
                                               "train.count_flops=false"])
    scenario = build_scenario(load_dataset(args.dataset), "class_incremental", 1, val_fraction=0.0, seed=0)
    task = scenario[0]
    n = len(task.y_train)
    mesh_times, bare_times = [], []
    for r in range(args.repeats):
        torch.manual_seed(r)
        t_mesh, mesh = mesh_epoch(cfg, scenario)
        torch.manual_seed(r)
        model = build_backbone(cfg.expert.backbone, scenario.input_shape, scenario.num_classes)  # same architecture
        t_bare = bare_epoch(model, task.x_train, task.y_train, args.batch_size, cfg.train.lr, torch.Generator().manual_seed(r))
        mesh_times.append(t_mesh)
        bare_times.append(t_bare)
    mesh_sps, bare_sps = n / statistics.median(mesh_times), n / statistics.median(bare_times)
    result = {"dataset": args.dataset, "samples": n, "batch_size": args.batch_size, "threads": args.threads,
              "repeats": args.repeats, "bare_samples_per_s": bare_sps, "mesh_samples_per_s": mesh_sps,
              "time_ratio_mesh_over_bare": bare_sps / mesh_sps}
    table = "\n".join([f"| loop | samples/s ({args.dataset}, batch {args.batch_size}, {args.threads} thread) |", "|---|---:|",
                       f"| bare PyTorch | {bare_sps:,.0f} |", f"| ModuleMesh Trainer | {mesh_sps:,.0f} |",
                       f"| time ratio (mesh / bare) | {bare_sps / mesh_sps:.3f} |"])
    print(table)
    publish("overhead", "Training-loop overhead", f"One epoch of MNIST ({n:,} images) with the 784-100-100-10 MLP, "
            f"median of {args.repeats} repeats.\n\n{table}\n")
    if args.json:
        atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
