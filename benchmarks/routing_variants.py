"""Which experts make the experts count: ModuleMesh variants scored on the validation split (never the test split).

    python benchmarks/routing_variants.py [--seed 0] [--out runs/benchmarks/routing_variants]

Each variant is the config's ``per_strategy.modulemesh`` block plus a few overrides (expert network, replay
buffer for the rejection training, rejection draws and shifts); it trains once (seed 0) and, on the validation
split of every task, reports router-only accuracy, each expert alone on its own task (within-expert), and,
for every weight b of the experts' task evidence (``router.expert_weight``), task-id accuracy and the mesh's
accuracy for each a (``strategy.router_weight``). The row with the best mesh accuracy within DER++'s bytes is
what the shipped configs use. A finished run (same resolved config) is read back, not rerun.
Writes benchmarks/results/routing_variants.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from modulemesh.config import ExperimentConfig, to_dict, validate
from modulemesh.data.scenarios import as_float
from modulemesh.io import atomic_write_text
from modulemesh.mesh import ModuleMesh
from modulemesh.runner import build_experiment, run_experiment
from modulemesh.sweep import finished_metrics, plan_runs
from modulemesh.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]
CNN = {"type": "cnn", "channels": [8, 16], "hidden": 64}
MLP = {"type": "mlp", "hidden": [50, 50]}  # replaces the file's backbone whole (an override would merge into it)
# router.expert_weight does not change training (the scoring sets it); every run keeps 1.0.
EW = "modulemesh.router.expert_weight=1.0"
OLD = [EW, "modulemesh.buffer_size=150", "modulemesh.reject_shift=0"]  # the previous default's experts
NEW = [EW, "modulemesh.buffer_size=500", "modulemesh.reject_shift=2"]
# (name, config, expert backbone, overrides on top of the file's per_strategy.modulemesh block)
VARIANTS = [
    ("mlp 50-50, buffer 150 (previous default)", "split_mnist_class_il.yaml", MLP, OLD),
    ("mlp 50-50, no rejection training", "split_mnist_class_il.yaml", MLP, [*OLD, "modulemesh.reject_weight=0"]),
    (
        "mlp 50-50, buffer 500 + 32 density draws per step",
        "split_mnist_class_il.yaml",
        MLP,
        [*OLD, "modulemesh.buffer_size=500", "modulemesh.reject_samples=32"],
    ),
    ("cnn 8-16-64, buffer 500, shift 2", "split_mnist_class_il.yaml", CNN, NEW),
    ("mlp 50-50, buffer 150 (previous default)", "split_fashion_mnist.yaml", MLP, OLD),
    ("cnn 8-16-64, buffer 500, shift 2", "split_fashion_mnist.yaml", CNN, NEW),
]
BETAS = [0.0, 2.0, 10.0, 20.0, 30.0, 50.0]  # router.expert_weight
ALPHAS = [0.5, 1.0]  # strategy.router_weight


@torch.no_grad()
def score(mesh: ModuleMesh, scenario, strategy, betas=BETAS) -> dict[str, float]:
    xs, ys = [as_float(t.x_val) for t in scenario], [t.y_val for t in scenario]
    n = sum(len(y) for y in ys)
    out = {
        "router-only": 100.0
        * sum(int((mesh.router.class_log_posterior(x, mesh.num_classes).argmax(1) == y).sum()) for x, y in zip(xs, ys))
        / n
    }
    within = []
    for e, x, y in zip(mesh.experts, xs, ys):
        within.append(100.0 * float((e.class_index[e(x).argmax(1)] == y).float().mean()))
    out["within-expert"] = sum(within) / len(within)
    for b in betas:
        mesh.router.expert_weight = b
        out[f"task-id b={b:g}"] = (
            100.0 * sum(int((mesh(x).weights.argmax(1) == t.id).sum()) for x, t in zip(xs, scenario)) / n
        )
        for a in ALPHAS:
            strategy.params.router_weight = a
            hits = sum(int((strategy.predict_log_probs(mesh, x, None).argmax(1) == y).sum()) for x, y in zip(xs, ys))
            out[f"mesh b={b:g} a={a:g}"] = 100.0 * hits / n
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/benchmarks/routing_variants")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tables: dict[str, list[dict]] = {}
    for i, (name, config, backbone, overrides) in enumerate(VARIANTS):
        ((_, _, cfg),) = plan_runs(
            str(ROOT / "configs" / config), [f"seed={args.seed}", *overrides], ["modulemesh"], 1, "cpu"
        )
        cfg = validate(ExperimentConfig, {**to_dict(cfg), "expert": {**to_dict(cfg.expert), "backbone": backbone}})
        where = Path(args.out) / f"v{i}"
        metrics = finished_metrics(where, cfg) or run_experiment(cfg, where)
        scenario, _, strategy = build_experiment(cfg)
        mesh = ModuleMesh.load(where / "mesh").eval()
        s = score(mesh, scenario, strategy)
        best = max((k for k in s if k.startswith("mesh")), key=s.get)
        row = {
            "variant": name,
            "bytes": f"{metrics['total_bytes']:,}",
            "router-only (%)": f"{s['router-only']:.2f}",
            "within-expert (%)": f"{s['within-expert']:.2f}",
            **{k.replace("task-id ", "task-id ") + " (%)": f"{v:.2f}" for k, v in s.items() if k.startswith("task-id")},
            "best mesh (%)": f"{s[best]:.2f}",
            "at": best.removeprefix("mesh "),
        }
        tables.setdefault(config, []).append(row)
        print(config, row, flush=True)
    text = (
        "# ModuleMesh variants on the validation split (issue 12)\n\n"
        f"Written by `python benchmarks/routing_variants.py` (seed {args.seed}, {platform.machine()} CPU, one thread). "
        "Every number is on the validation split of all five tasks after the last task. b = router.expert_weight "
        "(weight of the experts' task evidence), a = strategy.router_weight; 'best mesh' is the best over "
        f"b in {BETAS} and a in {ALPHAS}. Bytes: parameters + densities + replay buffer (DER++'s, "
        "with its 500-example buffer, are in the routing tables).\n"
    )
    for config, rows in tables.items():
        text += f"\n## {config}\n\n" + markdown_table(rows, right=[k for k in rows[0] if k not in ("variant", "at")])
    atomic_write_text(ROOT / "benchmarks" / "results" / "routing_variants.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
