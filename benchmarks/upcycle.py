"""Issue 14, upcycling: is a dense model turned into a mesh better than the dense model trained on, at equal FLOPs?

Per data set (MNIST, Fashion-MNIST) and seed: a dense MLP (one hidden layer of 32) is pretrained for
PRETRAIN steps (batch 128, SGD 0.05, momentum 0.9) on the training split minus 5,000 validation
examples. Then, with the same optimizer and a cosine decay for every arm, three arms spend a budget
of F = CONTINUE dense steps' training FLOPs (forward + backward of a step, counted by
``torch.utils.flop_counter`` through ``fit``):

    (a) upcycled   E copies of the dense model behind a zero-initialized gate (``modulemesh upcycle``'s
                   library), noise 0.01, trained for floor(F / its FLOPs per step) steps
    (b) dense      the dense model trained on for CONTINUE steps (exactly F)
    (c) scratch    a mesh of the same shape from random init, for floor((F + P) / its FLOPs per step)
                   steps, P the dense pretraining FLOPs: it gets the compute (a) and the dense model
                   it came from got together, so the pretraining is not free for the upcycled arm

Meshes are evaluated with every expert (k = E) and with the gate's top-1 expert (k = 1, the dense
model's inference cost plus the gate). The variant (``dense`` training, every expert in every step,
or ``top2``, each input trains its gate's two experts) is picked by validation accuracy on seed 0.

    OMP_NUM_THREADS=1 python benchmarks/upcycle.py [--seeds 0 1 2] [--datasets mnist fashion_mnist]

Writes benchmarks/results/upcycle.json and upcycle.md (from the JSON).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from modulemesh.data.datasets import load_dataset
from modulemesh.io import atomic_write_json, atomic_write_text
from modulemesh.mesh import Expert
from modulemesh.sharing.upcycle import UpcycleConfig, break_symmetry, evaluate_mesh, mesh_loss, upcycle
from modulemesh.tables import markdown_table
from modulemesh.training.evaluate import accuracy
from modulemesh.training.fit import TensorBatches, fit
from modulemesh.training.optim import OptimizerSpec

RESULTS = Path(__file__).resolve().parent / "results"
BACKBONE = {"type": "mlp", "hidden": [32]}
PRETRAIN, CONTINUE, BATCH, VAL = 3000, 1500, 128, 5000
# Both phases decay the learning rate to 0: the dense model is a finished one, as a model to upcycle is.
OPT = OptimizerSpec("sgd", 0.05, 0.9, schedule="warmup_cosine", warmup=0.0)
VARIANTS = {  # E experts; every expert trains in every step (dense) or each input's top-2 (sparse)
    "e4_dense": {"experts": 4, "router": {"k": 1, "hidden": 16, "dense_training": True}},
    "e2_dense": {"experts": 2, "router": {"k": 1, "hidden": 16, "dense_training": True}},
    "e4_top2": {"experts": 4, "router": {"k": 2, "hidden": 16, "dense_training": False}},
}


def split(name: str, seed: int):
    ds = load_dataset(name)
    x, y = torch.as_tensor(ds.x_train), torch.as_tensor(ds.y_train).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    val, tr = perm[:VAL], perm[VAL:]
    return (x[tr], y[tr]), (x[val], y[val]), (torch.as_tensor(ds.x_test), torch.as_tensor(ds.y_test).long())


def step_flops(loss_fn, batch, params) -> float:
    """Forward + backward FLOPs of one training step, counted as ``fit(count_flops=True)`` counts them."""
    with FlopCounterMode(display=False) as fc:
        loss_fn(*batch).backward()
    for p in params:
        p.grad = None
    return float(fc.get_total_flops())


def train_mesh(mesh, cfg, train, seed: int, budget: float) -> dict:
    loss_fn = mesh_loss(mesh, cfg.router.load_balance_weight)
    mesh.train()
    per_step = step_flops(loss_fn, TensorBatches(*train, 1, BATCH, seed)[0], list(mesh.parameters()))
    steps = int(budget // per_step)
    r = fit(mesh, loss_fn, train, steps=steps, optimizer=OPT, batch_size=BATCH, seed=seed, modules=[mesh])
    return {"steps": steps, "flops_per_step": per_step, "train_flops": per_step * steps, "seconds": r.seconds}


def evaluate(mesh, val, test) -> dict:
    out = {}
    for label, k in (("all", len(mesh.experts)), ("top1", 1)):
        mesh.router.k = k
        v, t = evaluate_mesh(mesh, *val), evaluate_mesh(mesh, *test)
        out[label] = {
            "val": v["accuracy"],
            "test": t["accuracy"],
            "expert_flops_per_sample": t["expert_flops_per_sample"],
        }
        out[label]["router_flops_per_sample"] = t["router_flops_per_sample"]
    mesh.router.k = 1
    return out


def ce_loss(model):
    return lambda xb, yb, idx: F.cross_entropy(model(xb), yb)


def one_run(name: str, seed: int, variant: str) -> dict:
    torch.manual_seed(seed)
    train, val, test = split(name, seed)
    dense = Expert("dense", list(range(10)), BACKBONE, tuple(train[0].shape[1:]))
    pre = fit(
        dense, ce_loss(dense), train, steps=PRETRAIN, optimizer=OPT, batch_size=BATCH, seed=seed, count_flops=True
    )
    dense.eval()
    pretrain_flops = pre.train_flops
    budget = CONTINUE * pre.flops_per_step
    cfg = UpcycleConfig(**VARIANTS[variant])
    row = {"pretrained": {"val": accuracy(dense, *val), "test": accuracy(dense, *test), "flops": pretrain_flops}}

    mesh = upcycle(dense, cfg)
    break_symmetry(mesh, cfg.noise, seed)
    row["upcycled"] = {**train_mesh(mesh, cfg, train, seed + 1, budget), **evaluate(mesh, val, test)}

    cont = dense.clone("dense_continued").train()
    r = fit(
        cont, ce_loss(cont), train, steps=CONTINUE, optimizer=OPT, batch_size=BATCH, seed=seed + 1, count_flops=True
    )
    cont.eval()
    row["dense"] = {
        "steps": CONTINUE,
        "flops_per_step": r.flops_per_step,
        "train_flops": r.train_flops,
        "seconds": r.seconds,
        "all": {"val": accuracy(cont, *val), "test": accuracy(cont, *test)},
    }

    torch.manual_seed(10_000 + seed)
    fresh = upcycle(Expert("scratch", list(range(10)), BACKBONE, dense.input_shape), cfg)
    for e in fresh.experts:  # independent random inits: the copies of one random net would be identical
        for m in e.modules():
            if hasattr(m, "reset_parameters") and m is not e:
                m.reset_parameters()
    row["scratch"] = {**train_mesh(fresh, cfg, train, seed + 1, budget + pretrain_flops), **evaluate(fresh, val, test)}
    row["budget_flops"] = budget
    return row


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def report(res: dict) -> str:
    v = res["variant"]
    picked = ", ".join(f"{k} {a:.2f}%" for k, a in res["selection"].items()) or "given with --variant"
    lines = [
        "# Upcycling: a dense model into a mesh, at equal training FLOPs",
        "",
        f"Command: `{res['command']}` ({res['seconds']:.0f} s at one thread). Dense model: MLP "
        f"{BACKBONE['hidden']}, pretrained {PRETRAIN} steps; continued budget F = {CONTINUE} dense steps' FLOPs. "
        f"Mesh variant `{v}` ({VARIANTS[v]['experts']} experts; picked by the upcycled mesh's validation accuracy "
        f"on seed {res['seeds'][0]}: {picked}). Test accuracy (%), mean ± std over seeds "
        f"{', '.join(map(str, res['seeds']))}; the scratch mesh gets F plus the dense pretraining FLOPs. "
        "Train GFLOPs are those of the continued phase (seed 0).",
        "",
    ]
    for name, runs in res["datasets"].items():
        pre = mean_std([r["pretrained"]["test"] for r in runs])
        rows = [{"arm": "dense model before (pretrained)", "test acc": pre, "train steps": "—", "train GFLOPs": "—"}]
        arms = (("upcycled", "(a) upcycled"), ("dense", "(b) dense trained on"), ("scratch", "(c) scratch mesh"))
        for arm, label in arms:
            for k in ("all", "top1"):
                if k not in runs[0][arm]:
                    continue
                what = {"all": "every expert", "top1": "top-1 expert"}[k] if arm != "dense" else "dense"
                rows.append(
                    {
                        "arm": f"{label}, {what}",
                        "test acc": mean_std([r[arm][k]["test"] for r in runs]),
                        "train steps": str(runs[0][arm]["steps"]),
                        "train GFLOPs": f"{runs[0][arm]['train_flops'] / 1e9:.2f}",
                    }
                )
        lines += [f"## {name}", "", markdown_table(rows, right=("test acc", "train steps", "train GFLOPs")), ""]
        for k, what in (("all", "every expert"), ("top1", "top-1 expert")):
            wins = sum(r["upcycled"][k]["test"] > r["dense"]["all"]["test"] for r in runs)
            gap = statistics.mean(r["upcycled"][k]["test"] - r["dense"]["all"]["test"] for r in runs)
            lines.append(
                f"- upcycled ({what}) minus dense trained on: {gap:+.2f} points on average, ahead in {wins} of "
                f"{len(runs)} seeds"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    ap.add_argument("--variant", choices=sorted(VARIANTS), help="skip the selection on seed 0's validation split")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    selection, cache = {}, {}
    variant = args.variant
    if variant is None:  # validation accuracy of the upcycled mesh (every expert) on seed 0, averaged over data sets
        for v in VARIANTS:
            cache[v] = {d: one_run(d, args.seeds[0], v) for d in args.datasets}
            selection[v] = statistics.mean(cache[v][d]["upcycled"]["all"]["val"] for d in args.datasets)
            print(v, selection[v], file=sys.stderr)
        variant = max(selection, key=selection.get)
    res = {"variant": variant, "selection": selection, "seeds": args.seeds, "datasets": {}}
    for d in args.datasets:
        res["datasets"][d] = [
            cache[variant][d] if s == args.seeds[0] and variant in cache else one_run(d, s, variant) for s in args.seeds
        ]
        print(d, "done", file=sys.stderr)
    res["seconds"] = time.perf_counter() - start
    res["command"] = "python benchmarks/upcycle.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    atomic_write_json(out / "upcycle.json", res)
    atomic_write_text(out / "upcycle.md", report(res))


if __name__ == "__main__":
    main()
