"""Pick ModuleMesh's router settings on the validation split (never the test split), within a byte budget.

    python benchmarks/routing_select.py configs/split_mnist_class_il.yaml [--budget-from derpp] [--seed 0]

Trains ModuleMesh once with the config's ``per_strategy.modulemesh`` settings (the experts do not depend on
the router: each task trains its own expert alone), then for every router setting in the grid refits the
densities on each task's training inputs and scores, on the validation split of all tasks:
task-id accuracy, ``router-only`` accuracy, and the mesh's accuracy for each ``router_weight``. A setting
whose bytes (expert parameters + density state) exceed the budget (DER++'s measured bytes with its
500-example buffer: model parameters + buffer inputs + logits) is skipped. Writes
benchmarks/results/routing_select_<experiment>.md; the chosen row is copied into the config by hand.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import sys
from pathlib import Path

import torch

from modulemesh.data.scenarios import as_float
from modulemesh.io import atomic_write_text
from modulemesh.mesh import DensityRouter, ModuleMesh
from modulemesh.runner import run_experiment
from modulemesh.strategies import ModuleMeshStrategy
from modulemesh.sweep import finished_metrics, plan_runs
from modulemesh.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]
GRID = {"clusters": [1, 3, 6], "components": [10], "state_dtype": ["float16"]}
ALPHAS = [0.0, 0.5, 1.0]  # strategy.router_weight
BETAS = [0.0, 0.5, 1.0, 2.0]  # router.expert_weight (only with experts trained to reject: strategy.reject_weight > 0)


@torch.no_grad()
def score(mesh: ModuleMesh, scenario, strategy: ModuleMeshStrategy) -> dict[str, float]:
    xs = [as_float(t.x_val) for t in scenario]
    ys = [t.y_val for t in scenario]
    out = {}
    n = sum(len(y) for y in ys)
    ro = sum(int((mesh.router.class_log_posterior(x, mesh.num_classes).argmax(1) == y).sum()) for x, y in zip(xs, ys))
    out["router-only (%)"] = 100.0 * ro / n
    for b in BETAS if strategy.params.reject_weight > 0 else [0.0]:
        mesh.router.expert_weight = b
        tid = sum(int((mesh(x).weights.argmax(1) == t.id).sum()) for x, t in zip(xs, scenario))
        out[f"task-id b={b} (%)"] = 100.0 * tid / n
        for a in ALPHAS:
            strategy.params.router_weight = a
            hits = 0
            for x, y in zip(xs, ys):
                lp = strategy.predict_log_probs(mesh, x, None)
                lp = mesh(x).log_probs if lp is None else lp
                hits += int((lp.argmax(1) == y).sum())
            out[f"mesh b={b} a={a} (%)"] = 100.0 * hits / n
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/benchmarks/routing_select")
    ap.add_argument("--budget", type=int, default=None, help="bytes; default: DER++'s measured total_bytes")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ((_, _, mm_cfg),) = plan_runs(args.config, [f"seed={args.seed}"], ["modulemesh"], 1, "cpu")
    out = Path(args.out) / mm_cfg.name
    budget = args.budget
    if budget is None:
        ((_, _, der_cfg),) = plan_runs(args.config, [f"seed={args.seed}"], ["derpp"], 1, "cpu")
        done = finished_metrics(out / "derpp", der_cfg)
        budget = (done or run_experiment(der_cfg, out / "derpp"))["total_bytes"]
    metrics = run_experiment(mm_cfg, out / "modulemesh")
    from modulemesh.runner import build_experiment

    scenario, _, strategy = build_experiment(mm_cfg)
    mesh = ModuleMesh.load(out / "modulemesh" / "mesh").eval()
    expert_bytes = metrics["parameter_bytes"]  # + the replay buffer (strategy state) below
    rows = []
    for clusters, k, dtype in itertools.product(*GRID.values()):
        router = DensityRouter(
            len(mesh.experts),
            components=k,
            clusters=clusters,
            state_dtype=dtype,
            expert_weight=mesh.router.expert_weight,
        )
        for i, t in enumerate(scenario):
            router.fit_expert(i, as_float(t.x_train), t.y_train)
        kept = (
            expert_bytes
            + metrics["strategy_state_bytes"]
            + sum(v.numel() * v.element_size() for v in router.export_state().values())
        )
        if kept > budget:
            continue
        mesh.router = router.eval()
        rows.append(
            {
                "clusters": clusters,
                "components": k,
                "state": dtype,
                "bytes": f"{kept:,}",
                **{key: f"{v:.2f}" for key, v in score(mesh, scenario, strategy).items()},
            }
        )
        print(rows[-1], flush=True)
    best = max(rows, key=lambda r: max(float(v) for key, v in r.items() if key.startswith("mesh")))
    text = (
        f"# Router settings chosen on the validation split: {mm_cfg.name}\n\n"
        f"Written by `python benchmarks/routing_select.py {args.config}` (seed {args.seed}, {platform.machine()} CPU). "
        f"Experts trained once with the config's ModuleMesh settings; every row refits only the densities; "
        f"a = strategy.router_weight, b = router.expert_weight (router settings, no retraining). "
        f"Budget: {budget:,} bytes (DER++ with its buffer, measured). All numbers on the validation split.\n\n"
        + markdown_table(rows, right=[k for k in rows[0] if k not in ("state",)])
        + f"\nBest mesh accuracy: clusters={best['clusters']}, components={best['components']}, "
        f"state={best['state']}.\n"
    )
    atomic_write_text(ROOT / "benchmarks" / "results" / f"routing_select_{mm_cfg.name}.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
