"""How much each piece of task evidence counts in a finished ModuleMesh: chosen on the validation split only.

    python benchmarks/routing_weights.py [--runs runs/benchmarks/routing] [--seed 0] [--sections mnist,fashion]

The density router adds to each expert's input density two kinds of evidence from the experts themselves
(``mesh/task_evidence.py``): the rejection logits, weight b (``router.expert_weight``), and the task probe
refit on the replay buffer, weight c (``router.probe_weight``) and L2 penalty (``PROBE_L2``); a
(``strategy.router_weight``) mixes the router's class posterior into each expert's. None of them changes how
the experts train (each task's data trains its own expert alone; the probe is fit after the task), so this
reads the finished seed's run that ``benchmarks/routing.py`` trained with the shipped block, refits the probe
from the buffer its last checkpoint holds for every L2, and scores every (L2, b, c, a) on the validation split
of every task. The test split is not read. Writes benchmarks/results/routing_weights.md.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from modulemesh.data.scenarios import as_float
from modulemesh.io import atomic_write_text
from modulemesh.mesh import ModuleMesh
from modulemesh.mesh.task_evidence import PROBE_L2
from modulemesh.runner import build_experiment
from modulemesh.strategies.modulemesh import mix_log_probs
from modulemesh.sweep import finished_metrics, plan_runs
from modulemesh.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]
BETAS = [0.0, 5.0, 10.0, 20.0, 25.0, 30.0, 40.0]  # b, router.expert_weight
PROBES = [0.0, 10.0, 20.0, 30.0, 50.0, 100.0, 200.0]  # c, router.probe_weight
ALPHAS = [0.5, 1.0]  # a, strategy.router_weight
L2S = [0.03, 0.1, 0.3, 1.0, 3.0]  # the probe's L2 penalty
# Closer than this (about one image in 6,000) is a tie: then the shipped point, or the nearest to it, stays.
TIE = 0.02
CONFIGS = {"mnist": "split_mnist_class_il.yaml", "fashion": "split_fashion_mnist.yaml"}  # routing.py's sections
Point = tuple[float, float, float, float]  # (l2, b, c, a)


def key(p: Point) -> str:
    return "l2={:g} b={:g} c={:g} a={:g}".format(*p)


def choose(s: dict[str, float], shipped: Point) -> Point:
    """The best point; points within TIE of the best count as tied, and the one nearest the shipped point wins
    (c first, then b, a, L2)."""
    points = list(itertools.product(L2S, BETAS, PROBES, ALPHAS))
    top = max(s["mesh " + key(p)] for p in points)
    tied = [p for p in points if s["mesh " + key(p)] >= top - TIE]
    l2, b, c, a = shipped
    return min(tied, key=lambda p: (abs(p[2] - c), abs(p[1] - b), abs(p[3] - a), abs(p[0] - l2)))


@torch.no_grad()
def score(mesh: ModuleMesh, scenario, strategy) -> dict[str, float]:
    """Validation accuracy (%) of every (L2, b, c, a), and router-only / within-expert for reference."""
    router, tasks = mesh.router, list(scenario)
    xs, ys = [as_float(t.x_val) for t in tasks], [t.y_val for t in tasks]
    n = sum(len(y) for y in ys)
    # What does not depend on the weights, once per task: densities, the experts' logits, the class joint.
    dens = [router.routing_scores(x) for x in xs]
    logits = [[e(x) for e in mesh.experts] for x in xs]
    joint = [router.expert_class_log_joint(x, mesh.num_classes) for x in xs]
    out = {"router-only": 100.0 * sum(int((j.logsumexp(0).argmax(1) == y).sum()) for j, y in zip(joint, ys)) / n}
    within = [
        float((e.class_index[z[i].argmax(1)] == y).float().mean())
        for i, (e, z, y) in enumerate(zip(mesh.experts, logits, ys))
    ]
    out["within-expert"] = 100.0 * sum(within) / len(within)
    for l2 in L2S:
        strategy.fit_task_probe(mesh, l2=l2)
        for b, c in itertools.product(BETAS, PROBES):
            router.expert_weight, router.probe_weight = b, c
            w = [router.combine(d, z) for d, z in zip(dens, logits)]
            out[f"task-id l2={l2:g} b={b:g} c={c:g}"] = (
                100.0 * sum(int((wi.argmax(1) == t.id).sum()) for wi, t in zip(w, tasks)) / n
            )
            for a in ALPHAS:
                hits = sum(
                    int((mix_log_probs(mesh, wi, z, j, a).argmax(1) == y).sum())
                    for wi, z, j, y in zip(w, logits, joint, ys)
                )
                out["mesh " + key((l2, b, c, a))] = 100.0 * hits / n
    return out


def finished_run(runs: Path, key_: str, seed: int):
    """(config, mesh, scenario, strategy with the run's final buffer) of the finished seed's shipped block."""
    config = CONFIGS[key_]
    cfg = [c for _, s, c in plan_runs(str(ROOT / "configs" / config), [], ["modulemesh"], seed + 1, "cpu") if s == seed]
    where = runs / key_ / "modulemesh" / f"seed{seed}"
    last = sorted(where.glob("checkpoint/after_task*/state.safetensors"), key=lambda p: int(p.parent.name[10:]))
    if not finished_metrics(where, cfg[0]) or not last:
        raise FileNotFoundError(
            f"no finished run of configs/{config}'s modulemesh block (with its checkpoint) in {where}; run "
            f"python benchmarks/routing.py --sections {key_} --out {runs} first"
        )
    scenario, _, strategy = build_experiment(cfg[0])
    state = load_file(str(last[-1]))
    strategy.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("strategy.")})
    return cfg[0], ModuleMesh.load(where / "mesh").eval(), scenario, strategy


def points_at(l2: float) -> list[Point]:
    return [(l2, b, c, a) for b, c, a in itertools.product(BETAS, PROBES, ALPHAS)]


def section(runs: Path, key_: str, seed: int) -> tuple[list[dict], str]:
    cfg, mesh, scenario, strategy = finished_run(runs, key_, seed)
    shipped = (PROBE_L2, cfg.router.expert_weight, cfg.router.probe_weight, strategy.params.router_weight)
    s = score(mesh, scenario, strategy)
    l2, b, c, a = choose(s, shipped)
    rows = [
        {"b": f"{bb:g}", **{f"c={cc:g} (%)": f"{s['mesh ' + key((l2, bb, cc, a))]:.2f}" for cc in PROBES}}
        for bb in BETAS
    ]
    best = {ll: max(points_at(ll), key=lambda p: s["mesh " + key(p)]) for ll in L2S}
    per_l2 = "; ".join(
        f"L2 {ll:g}: {s['mesh ' + key(p)]:.2f}% at b={p[1]:g} c={p[2]:g} a={p[3]:g}" for ll, p in best.items()
    )
    line = (
        f"configs/{CONFIGS[key_]} (lr {cfg.train.lr:g}, batch {cfg.train.batch_size}): shipped {key(shipped)} scores "
        f"{s['mesh ' + key(shipped)]:.2f}% on validation (router-only {s['router-only']:.2f}%, within-expert "
        f"{s['within-expert']:.2f}%, without the probe (c=0) at best "
        f"{max(s['mesh ' + key((l2, bb, 0.0, aa))] for bb in BETAS for aa in ALPHAS):.2f}%). Best per L2: {per_l2}. "
        f"Chosen: **{key((l2, b, c, a))}** ({s['mesh ' + key((l2, b, c, a))]:.2f}%); the table is at its L2 and a."
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
        "# Weights of the experts' task evidence in a finished mesh (validation split)\n\n"
        f"Written by `python benchmarks/routing_weights.py --seed {args.seed} --sections {args.sections}` "
        f"({platform.machine()} CPU, one thread) from the seed-{args.seed} runs of `benchmarks/routing.py`. Every "
        "number is mesh accuracy on the validation split of all tasks after the last one; b = router.expert_weight "
        "(rejection logits), c = router.probe_weight (task probe refit on the run's final replay buffer with L2 "
        "penalty L2), a = strategy.router_weight; none changes training. Chosen: the best point; points within "
        f"{TIE} of it are a tie, which the point nearest the shipped one wins (c, then b, a, L2).\n"
    )
    for k in keys:
        try:
            rows, line = section(Path(args.runs), k, args.seed)
        except FileNotFoundError as e:  # nothing to score: say which run is missing and how to make it
            print(e, file=sys.stderr)
            return 2
        print(line, flush=True)
        text += f"\n## {CONFIGS[k]}\n\n{line}\n\n" + markdown_table(rows, right=list(rows[0]))
    atomic_write_text(ROOT / "benchmarks" / "results" / "routing_weights.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
