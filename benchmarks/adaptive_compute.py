"""Issue 14, adaptive compute: accuracy against inference FLOPs per sample as the threshold p varies.

Per seed, the default experiment (``modulemesh run``: Split-MNIST class-IL, 5 tasks, one MLP [20, 20]
expert per task, the density router) is trained once. Its mesh is then evaluated with
``router.k: auto, router.threshold: p`` for every p in GRID and with every expert (no threshold): per
input the fewest experts whose routing weights reach p run, the others are skipped. Accuracy is the
run's average accuracy (mean over the 5 tasks' test sets); expert FLOPs per sample count the experts
that actually ran on each test input (``modulemesh.mesh.adaptive``), the router's FLOPs are reported
apart (the same for every p). The operating point is picked on the validation split: the smallest p
whose validation accuracy is within 0.2 points of every expert's; the test numbers are then read there.

    OMP_NUM_THREADS=1 python benchmarks/adaptive_compute.py [--seeds 0 1 2] [--work runs/adaptive_compute]

Writes benchmarks/results/adaptive_compute.{json,md,png}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from modulemesh.commands.common import default_config_path
from modulemesh.config import ExperimentConfig, load_config
from modulemesh.io import atomic_write_json, atomic_write_text
from modulemesh.mesh import ModuleMesh
from modulemesh.mesh.adaptive import inference_costs
from modulemesh.runner import build_experiment, run_experiment
from modulemesh.tables import markdown_table
from modulemesh.training.evaluate import evaluate_task

RESULTS = Path(__file__).resolve().parent / "results"
GRID = [0.5, 0.7, 0.9, 0.95, 0.99, 0.999, 0.9999]
MARGIN = 0.2  # points of accuracy the operating point may lose, on validation


def measure(mesh: ModuleMesh, scenario, p, split: str) -> dict:
    mesh.router.threshold = p
    evals = [evaluate_task(mesh, t, scenario, torch.device("cpu"), 2048, split=split) for t in scenario]
    weights = torch.cat([w for _, w, _ in evals])
    return {"accuracy": statistics.mean(a for a, _, _ in evals), **inference_costs(mesh, weights)}


def one_seed(seed: int, work: Path) -> dict:
    cfg = load_config(ExperimentConfig, default_config_path(), [f"seed={seed}", "device=cpu"])
    out = work / f"seed{seed}"
    metrics = run_experiment(cfg, out)
    scenario, _, _ = build_experiment(cfg)  # the same seeded split the run used
    mesh = ModuleMesh.load(out / "mesh").eval()
    points = {}
    for p in [None, *GRID]:
        key = "all" if p is None else str(p)
        points[key] = {"val": measure(mesh, scenario, p, "val"), "test": measure(mesh, scenario, p, "test")}
        print(
            seed, key, points[key]["test"]["accuracy"], points[key]["test"]["expert_flops_per_sample"], file=sys.stderr
        )
    base = points["all"]["val"]["accuracy"]
    ok = [p for p in GRID if points[str(p)]["val"]["accuracy"] >= base - MARGIN]
    return {"run_average_accuracy": metrics["average_accuracy"], "points": points, "picked": min(ok) if ok else None}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from modulemesh.plots import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    for seed, run in res["seeds"].items():
        keys = [*map(str, GRID), "all"]
        xs = [run["points"][k]["test"]["expert_flops_per_sample"] / 1e3 for k in keys]
        ys = [run["points"][k]["test"]["accuracy"] for k in keys]
        ax.plot(xs, ys, "o-", label=f"seed {seed}", alpha=0.8)
        ax.annotate("all", (xs[-1], ys[-1]), textcoords="offset points", xytext=(-12, 6), fontsize=8)
        ax.annotate(f"p={GRID[0]}", (xs[0], ys[0]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlabel("mean expert FLOPs per test sample (thousands)")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title("Split-MNIST class-IL, density router: router.k auto, threshold p")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def report(res: dict) -> str:
    runs = list(res["seeds"].values())

    def cell(key: str, field: str, split: str = "test") -> str:
        vals = [r["points"][key][split][field] for r in runs]
        return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else f"{vals[0]:.2f}"

    def kflops(key: str) -> float:
        return statistics.mean(r["points"][key]["test"]["expert_flops_per_sample"] for r in runs) / 1e3

    rows = []
    for key in ["all", *map(str, GRID)]:
        rows.append(
            {
                "p": "every expert" if key == "all" else key,
                "test accuracy (%)": cell(key, "accuracy"),
                "val accuracy (%)": cell(key, "accuracy", "val"),
                "experts run / sample": cell(key, "experts_run_per_sample"),
                "expert kFLOPs / sample": f"{kflops(key):.1f}",
            }
        )
    router = statistics.mean(r["points"]["all"]["test"]["router_flops_per_sample"] for r in runs) / 1e3
    picked = [r["picked"] for r in runs]
    lines = [
        "# Adaptive compute: accuracy against inference FLOPs per sample",
        "",
        f"Command: `{res['command']}` ({res['seconds']:.0f} s at one thread). The default `modulemesh run` "
        "experiment (Split-MNIST class-IL, density router), trained once per seed, evaluated with "
        "`router.k: auto, router.threshold: p`. Mean ± std over seeds "
        f"{', '.join(res['seeds'])}; the router costs {router:.1f} kFLOPs per sample at every p (not in the "
        "expert column). Plot: `adaptive_compute.png`.",
        "",
        markdown_table(rows, right=[k for k in rows[0] if k != "p"]),
        "",
        f"Operating point picked on validation (smallest p within {MARGIN} points of every expert's validation "
        f"accuracy), per seed: {', '.join(map(str, picked))}. On the test split there:",
        "",
    ]
    for seed, r in res["seeds"].items():
        if r["picked"] is None:
            lines.append(f"- seed {seed}: no p in the grid stays within {MARGIN} points on validation")
            continue
        at, full = r["points"][str(r["picked"])]["test"], r["points"]["all"]["test"]
        drop = full["accuracy"] - at["accuracy"]
        share = at["expert_flops_per_sample"] / full["expert_flops_per_sample"]
        ok = drop <= MARGIN and share <= 0.5
        lines.append(
            f"- seed {seed}, p = {r['picked']}: accuracy {at['accuracy']:.2f}% vs {full['accuracy']:.2f}% with every "
            f"expert ({-drop:+.2f} points), {share:.0%} of the expert FLOPs "
            f"({at['experts_run_per_sample']:.2f} experts per sample): goal {'met' if ok else 'not met'}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", default="runs/adaptive_compute", help="where the runs are written (resumed if there)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    res = {"grid": GRID, "margin": MARGIN, "seeds": {str(s): one_seed(s, Path(args.work)) for s in args.seeds}}
    res["seconds"] = time.perf_counter() - start
    res["command"] = "python benchmarks/adaptive_compute.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    atomic_write_json(out / "adaptive_compute.json", res)
    atomic_write_text(out / "adaptive_compute.md", report(res))
    plot(res, out / "adaptive_compute.png")


if __name__ == "__main__":
    main()
