"""Issue 14, adaptive compute: accuracy against inference FLOPs per sample as the threshold p varies.

Per seed, the default experiment (``modulemesh run``: Split-MNIST class-IL, 5 tasks, one MLP [20, 20]
expert per task) is trained once with its default density router and once with the learned top-k
gate (``router.type=topk``, whose softer weights make p matter). Each mesh is then evaluated with
``router.k: auto, router.threshold: p`` for every p in GRID, with its full weights and (top-k) with
its top-1 expert: per input the fewest experts whose routing weights reach p run, the others are
skipped. Accuracy is the run's average accuracy (mean over the 5 tasks' test sets); expert FLOPs per
sample count the experts that actually ran on each test input (``modulemesh.mesh.adaptive``); the
router's FLOPs are reported apart (the same for every p). The operating point is picked on the
validation split: the smallest p whose validation accuracy is within 0.2 points of the full
weights'; the test numbers are then read there.

    OMP_NUM_THREADS=1 python benchmarks/adaptive_compute.py [--seeds 0 1 2] [--work runs/adaptive_compute]

Writes benchmarks/results/adaptive_compute.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
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


def measure(mesh: ModuleMesh, scenario, split: str, p=None, k=None) -> dict:
    """Average accuracy (%) over the tasks and mean per-sample costs with threshold ``p`` (top-k gate: ``k``)."""
    mesh.router.threshold = p
    if hasattr(mesh.router, "k"):
        mesh.router.k = "auto" if p is not None else k
    evals = [evaluate_task(mesh, t, scenario, torch.device("cpu"), 2048, split=split) for t in scenario]
    weights = torch.cat([w for _, w, _ in evals])
    return {"accuracy": statistics.mean(a for a, _, _ in evals), **inference_costs(mesh, weights)}


def one_seed(seed: int, router: str, work: Path) -> dict:
    overrides = [f"seed={seed}", "device=cpu", f"router.type={router}"]
    cfg = load_config(ExperimentConfig, default_config_path(), overrides)
    out = work / f"{router}_seed{seed}"
    metrics = run_experiment(cfg, out)
    scenario, _, _ = build_experiment(cfg)  # the same seeded split the run used
    mesh = ModuleMesh.load(out / "mesh").eval()
    e = len(mesh.experts)
    settings = {"full": {"k": e}, **({"top1": {"k": 1}} if router == "topk" else {})}
    settings.update({str(p): {"p": p} for p in GRID})
    points = {}
    for key, kw in settings.items():
        points[key] = {split: measure(mesh, scenario, split, **kw) for split in ("val", "test")}
        t = points[key]["test"]
        print(router, seed, key, t["accuracy"], t["expert_flops_per_sample"], file=sys.stderr)
    base = points["full"]["val"]["accuracy"]
    ok = [p for p in GRID if points[str(p)]["val"]["accuracy"] >= base - MARGIN]
    return {"run_average_accuracy": metrics["average_accuracy"], "points": points, "picked": min(ok) if ok else None}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from modulemesh.plots import save_figure

    fig, axes = plt.subplots(1, len(res["routers"]), figsize=(5.5 * len(res["routers"]), 4), squeeze=False)
    for ax, (router, seeds) in zip(axes[0], res["routers"].items()):
        for seed, run in seeds.items():
            pts = run["points"]
            keys = [*map(str, GRID)]
            xs = [pts[k]["test"]["expert_flops_per_sample"] / 1e3 for k in keys]
            ys = [pts[k]["test"]["accuracy"] for k in keys]
            line = ax.plot(xs, ys, "o-", label=f"seed {seed}: p = {GRID[0]} .. {GRID[-1]}", alpha=0.8)[0]
            every = pts["full"]["test"]
            ax.plot([every["all_experts_flops_per_sample"] / 1e3], [every["accuracy"]], "s", color=line.get_color())
        ax.annotate("every expert", (every["all_experts_flops_per_sample"] / 1e3, every["accuracy"]), fontsize=8)
        ax.set_xlabel("mean expert FLOPs per test sample (thousands)")
        ax.set_ylabel("average accuracy (%)")
        ax.set_title(f"Split-MNIST class-IL, {router} router, k: auto")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def _cell(vals: list[float]) -> str:
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else f"{vals[0]:.2f}"


def router_report(router: str, seeds: dict) -> list[str]:
    runs = list(seeds.values())
    every = statistics.mean(r["points"]["full"]["test"]["all_experts_flops_per_sample"] for r in runs)

    def row(label: str, key: str, forced: bool = False) -> dict:
        pts = [r["points"][key] for r in runs]
        flops = [every if forced else q["test"]["expert_flops_per_sample"] for q in pts]
        return {
            "routing": label,
            "test accuracy (%)": _cell([q["test"]["accuracy"] for q in pts]),
            "val accuracy (%)": _cell([q["val"]["accuracy"] for q in pts]),
            "experts run / sample": "5" if forced else _cell([q["test"]["experts_run_per_sample"] for q in pts]),
            "expert kFLOPs / sample": f"{statistics.mean(flops) / 1e3:.1f}",
            "share of every expert's FLOPs": f"{statistics.mean(flops) / every:.0%}",
        }

    rows = [row("every expert", "full", forced=True), row("full weights, experts with weight > 0", "full")]
    if "top1" in runs[0]["points"]:
        rows.append(row("top-1 (router.k: 1)", "top1"))
    rows += [row(f"k: auto, p = {p}", str(p)) for p in GRID]
    router_flops = statistics.mean(r["points"]["full"]["test"]["router_flops_per_sample"] for r in runs) / 1e3
    lines = [
        f"## {router} router",
        "",
        f"The router costs {router_flops:.1f} kFLOPs per sample at every setting (not in the expert column).",
        "",
        markdown_table(rows, right=[k for k in rows[0] if k != "routing"]),
        "",
        f"Operating point picked on validation (smallest p within {MARGIN} points of the full weights' validation "
        "accuracy); on the test split there:",
        "",
    ]
    for seed, r in seeds.items():
        if r["picked"] is None:
            lines.append(f"- seed {seed}: no p in the grid stays within {MARGIN} points on validation")
            continue
        at, full = r["points"][str(r["picked"])]["test"], r["points"]["full"]["test"]
        drop = full["accuracy"] - at["accuracy"]
        share = at["expert_flops_per_sample"] / full["all_experts_flops_per_sample"]
        ok = drop <= MARGIN and share <= 0.5
        r_flops = full["router_flops_per_sample"]
        total = (at["expert_flops_per_sample"] + r_flops) / (full["all_experts_flops_per_sample"] + r_flops)
        lines.append(
            f"- seed {seed}, p = {r['picked']}: {at['accuracy']:.2f}% vs {full['accuracy']:.2f}% with every expert "
            f"({-drop:+.2f} points) at {share:.0%} of every expert's FLOPs "
            f"({at['expert_flops_per_sample'] / full['expert_flops_per_sample']:.0%} of the full weights' experts with "
            f"weight > 0; {at['experts_run_per_sample']:.2f} experts per sample): goal {'met' if ok else 'not met'}; "
            f"with the router counted, {total:.0%} of every expert's inference FLOPs"
        )
    return lines + [""]


def report(res: dict) -> str:
    lines = [
        "# Adaptive compute: accuracy against inference FLOPs per sample",
        "",
        f"Command: `{res['command']}` ({res['seconds']:.0f} s at one thread). The default `modulemesh run` "
        "experiment (Split-MNIST class-IL, 5 tasks, one MLP [20, 20] expert per task), with its default density "
        "router and with the learned top-k gate (`router.type=topk`), trained once per seed and evaluated with "
        f"`router.k: auto, router.threshold: p`. Mean ± std over seeds {', '.join(res['seeds'])}. 'Every expert' "
        "is what running all five costs; its accuracy is that of the full weights (an expert whose weight is "
        "exactly 0 changes nothing when run). The density posterior is exactly 0 in float32 for most experts of "
        "most inputs, so the mesh with full weights already skips them. Plot: `adaptive_compute.png`.",
        "",
    ]
    for router, seeds in res["routers"].items():
        lines += router_report(router, seeds)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", default="runs/adaptive_compute", help="where the runs are written (resumed if there)")
    ap.add_argument("--routers", nargs="+", default=["density", "topk"])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from the JSON in --out")
    args = ap.parse_args()
    out = Path(args.out)
    if args.report_only:
        res = json.loads((out / "adaptive_compute.json").read_text())
        atomic_write_text(out / "adaptive_compute.md", report(res))
        plot(res, out / "adaptive_compute.png")
        return
    torch.set_num_threads(1)
    start = time.perf_counter()
    res = {"grid": GRID, "margin": MARGIN, "seeds": [str(s) for s in args.seeds], "routers": {}}
    for router in args.routers:
        res["routers"][router] = {str(s): one_seed(s, router, Path(args.work)) for s in args.seeds}
    res["seconds"] = time.perf_counter() - start
    res["command"] = "python benchmarks/adaptive_compute.py " + " ".join(sys.argv[1:])
    atomic_write_json(out / "adaptive_compute.json", res)
    atomic_write_text(out / "adaptive_compute.md", report(res))
    plot(res, out / "adaptive_compute.png")


if __name__ == "__main__":
    main()
