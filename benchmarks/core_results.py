"""The README's core result table: the default experiment (Split-MNIST class-IL, 5 tasks, 1 epoch)
for the bounds (finetune, joint) and ModuleMesh with each router (the seeds' routing ablation).
Every arm uses the default config with one override, so the experts, data and epochs are equal.

    python benchmarks/core_results.py [--seeds 0 1 2] [--out runs/core_results]

Prints a markdown table (mean ± std over seeds) and writes it to OUT/table.md.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from modulemesh.commands.common import default_config_path
from modulemesh.config import ExperimentConfig, load_config
from modulemesh.io import atomic_write_text
from modulemesh.runner import run_experiment
from publish import publish

ARMS = {
    "finetune (lower bound)": ["strategy.name=finetune"],
    "joint (upper bound)": ["strategy.name=joint"],
    "modulemesh, density router": ["router.type=density"],
    "modulemesh, top-1 gate + replay": ["router.type=topk"],
    "modulemesh, entropy router": ["router.type=entropy"],
    "modulemesh, random router": ["router.type=random"],
}


def fmt(values: list[float], digits: int = 1) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default="runs/core_results")
    args = ap.parse_args()
    torch.set_num_threads(2)
    lines = [
        "| method | avg acc (%) | forgetting (%) | BWT (%) | params trained / task | train FLOPs | wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, overrides in ARMS.items():
        runs = []
        for seed in args.seeds:
            cfg = load_config(ExperimentConfig, default_config_path(), overrides, seed=seed, device="cpu")
            out = Path(args.out) / arm.split(" (")[0].replace(", ", "_").replace(" ", "_") / f"seed{seed}"
            runs.append(run_experiment(cfg, out))
        params = [statistics.mean(r["params_trained_per_task"]) for r in runs]
        lines.append(
            f"| {arm} | {fmt([r['average_accuracy'] for r in runs])} | {fmt([r['forgetting'] for r in runs])} | "
            f"{fmt([r['bwt'] for r in runs])} | {statistics.mean(params):,.0f} | "
            f"{statistics.mean(r['flops'] for r in runs):.2e} | {fmt([r['wall_time_s'] for r in runs])} |"
        )
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    atomic_write_text(Path(args.out) / "table.md", table + "\n")
    print(table)
    publish(
        "core",
        "Core results: the default experiment, bounds and routers",
        f"Split-MNIST class-IL, 5 tasks, the default config (`modulemesh run`) with one override per arm; "
        f"mean ± std over seeds {args.seeds}.\n\n{table}\n",
    )


if __name__ == "__main__":
    main()
