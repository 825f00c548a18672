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
model's inference cost plus the gate). Two upcycled variants are reported, each picked on seed 0's
validation split (mean over the data sets) from a list fixed before any result was seen:

    first list (the first run's: every expert, or each input's top-2 of 4, trains; a hidden-16 gate):
        e4_dense, e2_dense, e4_top2                       picked by validation accuracy with every expert
    sparse (``router.train_k``: each input trains its top-1, or top-2, experts; a step costs about one
    dense step plus the gate; ``hidden 0`` is a linear gate, cheaper than the hidden-16 one):
        e4_top1, e4_top1_linear, e2_top1_linear, e8_top1_linear, e4_top2_linear
                                                          picked by validation accuracy with the top-1 expert

    OMP_NUM_THREADS=1 python benchmarks/upcycle.py [--seeds 0 1 2] [--datasets mnist fashion_mnist]
    python benchmarks/upcycle.py --render     # rewrite upcycle.md from the committed upcycle.json

Writes benchmarks/results/upcycle.json and upcycle.md (from the JSON).
"""

from __future__ import annotations

import argparse
import json
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
DENSE = {"k": 1, "hidden": 16, "dense_training": True}
VARIANTS = {  # E experts; which experts train in a step (dense routing, or sparse: router.train_k); the gate
    "e4_dense": {"experts": 4, "router": DENSE},
    "e2_dense": {"experts": 2, "router": DENSE},
    "e4_top2": {"experts": 4, "router": {"k": 2, "hidden": 16, "dense_training": False}},
    "e4_top1": {"experts": 4, "router": {"k": 1, "hidden": 16, "train_k": 1}},
    "e4_top1_linear": {"experts": 4, "router": {"k": 1, "hidden": 0, "train_k": 1}},
    "e2_top1_linear": {"experts": 2, "router": {"k": 1, "hidden": 0, "train_k": 1}},
    "e8_top1_linear": {"experts": 8, "router": {"k": 1, "hidden": 0, "train_k": 1}},
    "e4_top2_linear": {"experts": 4, "router": {"k": 1, "hidden": 0, "train_k": 2}},
}
GROUPS = {  # group: (its candidates, the evaluation whose validation accuracy picks one)
    "first list": (("e4_dense", "e2_dense", "e4_top2"), "all"),
    "sparse (train_k)": (("e4_top1", "e4_top1_linear", "e2_top1_linear", "e8_top1_linear", "e4_top2_linear"), "top1"),
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
    loss_fn = mesh_loss(mesh, cfg.router.load_balance_weight, cfg.train_k)
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


def prepare(name: str, seed: int):
    """The pretrained dense model, the data and the arms every variant shares: pretrained and (b)."""
    torch.manual_seed(seed)
    train, val, test = split(name, seed)
    dense = Expert("dense", list(range(10)), BACKBONE, tuple(train[0].shape[1:]))
    pre = fit(
        dense, ce_loss(dense), train, steps=PRETRAIN, optimizer=OPT, batch_size=BATCH, seed=seed, count_flops=True
    )
    dense.eval()
    row = {
        "pretrained": {"val": accuracy(dense, *val), "test": accuracy(dense, *test), "flops": pre.train_flops},
        "budget_flops": CONTINUE * pre.flops_per_step,
        "upcycled": {},
        "scratch": {},
    }
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
    return dense, (train, val, test), row


def upcycled_arm(dense, data, row: dict, seed: int, variant: str) -> dict:
    train, val, test = data
    cfg = UpcycleConfig(**VARIANTS[variant])
    torch.manual_seed(20_000 + seed)  # the gate's hidden layer: the same whichever variants ran before
    mesh = upcycle(dense, cfg)
    break_symmetry(mesh, cfg.noise, seed)
    return {**train_mesh(mesh, cfg, train, seed + 1, row["budget_flops"]), **evaluate(mesh, val, test)}


def scratch_arm(dense, data, row: dict, seed: int, variant: str) -> dict:
    train, val, test = data
    cfg = UpcycleConfig(**VARIANTS[variant])
    torch.manual_seed(10_000 + seed)
    fresh = upcycle(Expert("scratch", list(range(10)), BACKBONE, dense.input_shape), cfg)
    for e in fresh.experts:  # independent random inits: the copies of one random net would be identical
        for m in e.modules():
            if hasattr(m, "reset_parameters") and m is not e:
                m.reset_parameters()
    budget = row["budget_flops"] + row["pretrained"]["flops"]
    return {**train_mesh(fresh, cfg, train, seed + 1, budget), **evaluate(fresh, val, test)}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def report(res: dict) -> str:
    picked = res["picked"]
    sel_rows = [
        {
            "variant": v,
            "group": g,
            "experts": str(VARIANTS[v]["experts"]),
            "trains per input": str(UpcycleConfig(**VARIANTS[v]).train_k),
            "gate": "linear" if VARIANTS[v]["router"]["hidden"] == 0 else f"hidden {VARIANTS[v]['router']['hidden']}",
            "step FLOPs / dense step": f"{sel['flops_per_step'] / sel['dense_flops_per_step']:.2f}",
            "val every expert": f"{sel['all']:.2f}",
            "val top-1": f"{sel['top1']:.2f}",
            "picked": "yes" if v in picked else "",
        }
        for g, (cands, _) in GROUPS.items()
        for v in cands
        if (sel := res["selection"].get(v))
    ]
    lines = [
        "# Upcycling: a dense model into a mesh, at equal training FLOPs",
        "",
        f"Command: `{res['command']}` ({res['seconds']:.0f} s at one thread). Dense model: MLP "
        f"{BACKBONE['hidden']}, pretrained {PRETRAIN} steps; continued budget F = {CONTINUE} dense steps' FLOPs. "
        f"Upcycled variants: {', '.join(f'`{v}`' for v in picked)}, picked on seed {res['seeds'][0]}'s validation "
        "split (below). Test accuracy (%), mean ± std over seeds "
        f"{', '.join(map(str, res['seeds']))}; the scratch mesh gets F plus the dense pretraining FLOPs. "
        "Train GFLOPs are those of the continued phase (seed 0).",
        "",
    ]
    for name, runs in res["datasets"].items():
        pre = mean_std([r["pretrained"]["test"] for r in runs])
        rows = [{"arm": "dense model before (pretrained)", "test acc": pre, "train steps": "—", "train GFLOPs": "—"}]
        arms = [(("upcycled", v), f"(a) upcycled `{v}`") for v in picked] + [(("dense", None), "(b) dense trained on")]
        arms += [(("scratch", v), f"(c) scratch mesh `{v}`") for v in picked]
        for (arm, v), label in arms:
            get = (lambda r: r[arm]) if v is None else (lambda r: r[arm][v])
            for k in ("all", "top1"):
                if k not in get(runs[0]):
                    continue
                what = {"all": "every expert", "top1": "top-1 expert"}[k] if arm != "dense" else "dense"
                rows.append(
                    {
                        "arm": f"{label}, {what}",
                        "test acc": mean_std([get(r)[k]["test"] for r in runs]),
                        "train steps": str(get(runs[0])["steps"]),
                        "train GFLOPs": f"{get(runs[0])['train_flops'] / 1e9:.2f}",
                    }
                )
        lines += [f"## {name}", "", markdown_table(rows, right=("test acc", "train steps", "train GFLOPs")), ""]
        for v in picked:
            top1 = runs[0]["upcycled"][v]["top1"]
            lines.append(
                f"- `{v}` at top-1 inference: {top1['expert_flops_per_sample'] / 1e3:.1f}k expert FLOPs (the dense "
                f"model's) + {top1['router_flops_per_sample'] / 1e3:.1f}k gate FLOPs per sample"
            )
            for k, what in (("all", "every expert"), ("top1", "top-1 expert")):
                wins = sum(r["upcycled"][v][k]["test"] > r["dense"]["all"]["test"] for r in runs)
                gap = statistics.mean(r["upcycled"][v][k]["test"] - r["dense"]["all"]["test"] for r in runs)
                lines.append(
                    f"- upcycled `{v}` ({what}) minus dense trained on: {gap:+.2f} points on average, ahead in "
                    f"{wins} of {len(runs)} seeds"
                )
        lines.append("")
    if sel_rows:
        lines += [
            "## Variant selection (validation)",
            "",
            f"Validation accuracy (%) of the upcycled mesh on seed {res['seeds'][0]}, mean over "
            f"{', '.join(res['datasets'])}; each group picks by the column named in benchmarks/upcycle.py "
            "(first list: every expert; sparse: top-1 expert). Step FLOPs are counted forward + backward, "
            "gate included.",
            "",
            markdown_table(
                sel_rows,
                right=("experts", "trains per input", "step FLOPs / dense step", "val every expert", "val top-1"),
            ),
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), help="skip the selection; report these")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--render", action="store_true", help="only rewrite upcycle.md from --out's upcycle.json")
    args = ap.parse_args()
    if args.render:
        res = json.loads((Path(args.out) / "upcycle.json").read_text())
        atomic_write_text(Path(args.out) / "upcycle.md", report(res))
        return
    torch.set_num_threads(1)
    start = time.perf_counter()
    first = {d: prepare(d, args.seeds[0]) for d in args.datasets}
    selection, picked = {}, args.variants
    if picked is None:  # each group's pick: its candidates' validation accuracy on the first seed
        picked = []
        for cands, mode in GROUPS.values():
            for v in cands:
                for d, (dense, data, row) in first.items():
                    row["upcycled"][v] = upcycled_arm(dense, data, row, args.seeds[0], v)
                runs = [row["upcycled"][v] for _, _, row in first.values()]
                selection[v] = {k: statistics.mean(r[k]["val"] for r in runs) for k in ("all", "top1")}
                selection[v]["flops_per_step"] = runs[0]["flops_per_step"]
                selection[v]["dense_flops_per_step"] = next(iter(first.values()))[2]["dense"]["flops_per_step"]
                print(v, selection[v], file=sys.stderr, flush=True)
            picked.append(max(cands, key=lambda v: selection[v][mode]))
    res = {"picked": picked, "selection": selection, "seeds": args.seeds, "datasets": {}}
    for d in args.datasets:
        res["datasets"][d] = []
        for s in args.seeds:
            dense, data, row = first[d] if s == args.seeds[0] else prepare(d, s)
            row["upcycled"] = {v: row["upcycled"].get(v) or upcycled_arm(dense, data, row, s, v) for v in picked}
            row["scratch"] = {v: scratch_arm(dense, data, row, s, v) for v in picked}
            res["datasets"][d].append(row)
            print(d, s, "done", file=sys.stderr, flush=True)
    res["seconds"] = time.perf_counter() - start
    res["command"] = "python benchmarks/upcycle.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    atomic_write_json(out / "upcycle.json", res)
    atomic_write_text(out / "upcycle.md", report(res))


if __name__ == "__main__":
    main()
