"""Do ModuleMesh's expert_weight b and router_weight a still hold under its tuned lr / batch? Validation only.

    python benchmarks/routing_weights.py [--runs runs/benchmarks/routing] [--seed 0] [--sections mnist,fashion]

b (``router.expert_weight``) and a (``strategy.router_weight``) were chosen on the validation split with the
experts trained at lr 0.1 / batch 32 (``benchmarks/routing_bytes.py``); the shipped blocks now train them at
the lr / batch their own validation grid picked (``benchmarks/results/routing_tuning_*.md``). Neither weight
changes training, only how a finished mesh combines the densities' and the experts' evidence, so this reads the
finished seed's mesh that ``benchmarks/routing.py`` trained with the shipped block and scores it on the validation
split of every task for every b and a (the same scoring as ``routing_variants.py``). The test split is not read.
Writes benchmarks/results/routing_weights.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from modulemesh.io import atomic_write_text
from modulemesh.mesh import ModuleMesh
from modulemesh.runner import build_experiment
from modulemesh.sweep import finished_metrics, plan_runs
from modulemesh.tables import markdown_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_variants import ALPHAS, BETAS, score  # noqa: E402  (the same validation scoring)

ROOT = Path(__file__).resolve().parents[1]
# routing_variants.BETAS plus the neighbours of its best point (30) under the tuned lr / batch: rescoring only.
GRID = sorted({*BETAS, 25.0, 40.0})
# Closer than this (about one image in 6,000) is a tie: then the shipped pair, or the nearest to it, stays.
TIE = 0.02
CONFIGS = {"mnist": "split_mnist_class_il.yaml", "fashion": "split_fashion_mnist.yaml"}  # routing.py's sections


def choose(s: dict[str, float], shipped: tuple[float, float]) -> tuple[float, float]:
    """The best (b, a); points within TIE of the best count as tied, and the one nearest the shipped pair wins."""
    top = max(s[f"mesh b={b:g} a={a:g}"] for b in GRID for a in ALPHAS)
    tied = [(b, a) for b in GRID for a in ALPHAS if s[f"mesh b={b:g} a={a:g}"] >= top - TIE]
    return min(tied, key=lambda p: (abs(p[0] - shipped[0]), abs(p[1] - shipped[1])))


def section(runs: Path, key: str, seed: int) -> tuple[list[dict], str]:
    config = CONFIGS[key]
    cfg = [c for _, s, c in plan_runs(str(ROOT / "configs" / config), [], ["modulemesh"], seed + 1, "cpu") if s == seed]
    where = runs / key / "modulemesh" / f"seed{seed}"
    if not finished_metrics(where, cfg[0]):
        raise FileNotFoundError(
            f"no finished run of configs/{config}'s modulemesh block in {where}; run "
            f"python benchmarks/routing.py --sections {key} --out {runs} first"
        )
    cfg = cfg[0]
    scenario, _, strategy = build_experiment(cfg)
    shipped = (cfg.router.expert_weight, strategy.params.router_weight)  # before score() sweeps them
    s = score(ModuleMesh.load(where / "mesh").eval(), scenario, strategy, GRID)
    rows = [
        {
            "b": f"{b:g}",
            "task-id (%)": f"{s[f'task-id b={b:g}']:.2f}",
            **{f"mesh a={a:g} (%)": f"{s[f'mesh b={b:g} a={a:g}']:.2f}" for a in ALPHAS},
        }
        for b in GRID
    ]
    best = max((k for k in s if k.startswith("mesh")), key=s.get)
    b, a = choose(s, shipped)
    ship = f"mesh b={shipped[0]:g} a={shipped[1]:g}"
    line = (
        f"configs/{config} (lr {cfg.train.lr:g}, batch {cfg.train.batch_size}): shipped b={shipped[0]:g} "
        f"a={shipped[1]:g} scores {s[ship]:.2f}% on validation; the best point, "
        f"{best.removeprefix('mesh ')}, {s[best]:.2f}% (router-only {s['router-only']:.2f}%, within-expert "
        f"{s['within-expert']:.2f}%). Chosen: **b={b:g} a={a:g}** ({s[f'mesh b={b:g} a={a:g}']:.2f}%)."
    )
    return rows, line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="runs/benchmarks/routing", help="benchmarks/routing.py's --out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sections", default="mnist,fashion")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    keys = args.sections.split(",")
    if bad := [k for k in keys if k not in CONFIGS]:
        print(f"unknown section {bad[0]!r}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    text = (
        "# expert_weight and router_weight under the tuned lr / batch (validation split)\n\n"
        f"Written by `python benchmarks/routing_weights.py --seed {args.seed} --sections {args.sections}` "
        f"({platform.machine()} CPU, one thread) from the seed-{args.seed} runs of `benchmarks/routing.py`. Every "
        "number is on the validation split of all tasks after the last one; b = router.expert_weight, "
        f"a = strategy.router_weight (neither changes training). Chosen: the best point; points within {TIE} "
        "of it are a tie, which the pair nearest the shipped one wins (b first, then a).\n"
    )
    for key in keys:
        try:
            rows, line = section(Path(args.runs), key, args.seed)
        except FileNotFoundError as e:  # nothing to score: say which run is missing and how to make it
            print(e, file=sys.stderr)
            return 2
        print(line, flush=True)
        text += f"\n## {CONFIGS[key]}\n\n{line}\n\n" + markdown_table(rows, right=list(rows[0]))
    atomic_write_text(ROOT / "benchmarks" / "results" / "routing_weights.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
