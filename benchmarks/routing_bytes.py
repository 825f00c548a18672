"""Equal memory (issue 12): ModuleMesh's stored precision, density size and rejection buffer, chosen on the
validation split (never the test split) within DER++'s bytes.

    python benchmarks/routing_bytes.py [--config split_mnist_class_il.yaml] [--seed 0] [--buffers 300]
        [--densities 3x10,3x5]
    python benchmarks/routing_bytes.py --from-tuning runs/bytes_permuted_tune [--budget 778440] [--name STEM]  # a grid

While a task trains, the density router sends its rows to its own expert and the rejection loss replays stored
inputs, not densities; a finished expert is rounded to its stored precision (``expert.storage``) when its task
ends and never changes again. So each buffer size trains once (seed 0, the config's ``per_strategy.modulemesh``
block, with a one-direction density that is thrown away), each density size is fit once on every task's
training inputs, and every combination of expert storage x density (clusters, directions, ``router.state_dtype``)
x buffer is scored on the validation split of all tasks exactly as a run with those settings ends: router-only,
within-expert, task-id (for each b = ``router.expert_weight``) and mesh accuracy (for each b and
a = ``strategy.router_weight``). Bytes are what such a run keeps (``decomposition.total_bytes``): the experts as
stored, the densities as stored, the replay buffer. The budget is DER++'s total bytes with its 500-example
buffer (a run of the config's derpp block; its live model stays fp32: it trains on every task). The best mesh
accuracy within the budget is what the config's ``per_strategy.modulemesh`` block adopts. Finished runs and
fitted densities are read back, not redone. Writes benchmarks/results/routing_bytes_<experiment>.md.

Where the experts do depend on each other (Permuted-MNIST: each new expert starts as a copy of the newest,
rounded one), the precision is instead a ``modulemesh compare CONFIG --strategies modulemesh --tune
expert.storage=fp32,int8 --tune router.state_dtype=float16,int8`` grid of real runs; ``--from-tuning OUT``
renders that grid's validation accuracy with each point's bytes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from modulemesh.data.scenarios import as_float
from modulemesh.decomposition import total_bytes
from modulemesh.io import atomic_write_text
from modulemesh.mesh import DensityRouter, ModuleMesh
from modulemesh.mesh.density import stored_component
from modulemesh.mesh.pool import ExpertPool
from modulemesh.runner import build_experiment, run_experiment
from modulemesh.sweep import finished_metrics, plan_runs
from modulemesh.sweep.tune import tuning_dir
from modulemesh.tables import markdown_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_variants import score  # noqa: E402  (the same validation scoring as the variants table)

ROOT = Path(__file__).resolve().parents[1]
DENSITIES = "3x10,3x5"  # router.clusters x router.components, each fit in fp32 once
DTYPES = ["float16", "int8"]  # router.state_dtype
STORAGES = ["fp32", "fp16", "int8"]  # expert.storage
THROWAWAY = ["modulemesh.router.clusters=1", "modulemesh.router.components=1"]  # training never reads it


def memo(fn):
    """Cache fn(x) per input tensor object (held, so its id cannot be reused): scoring sweeps b and a over the
    same validation tensors, and the densities and experts are what cost."""
    cache: dict[int, tuple[torch.Tensor, object]] = {}

    def call(x):
        hit = cache.get(id(x))
        if hit is None or hit[0] is not x:
            hit = cache[id(x)] = (x, fn(x))
        return hit[1]

    return call


def fit_densities(scenario, clusters: int, components: int, path: Path) -> DensityRouter:
    """fp32 densities of every task's training inputs (task i -> expert i), cached in ``path``."""
    router = DensityRouter(len(scenario.tasks), components=components, clusters=clusters)
    if path.exists():
        router.import_state(load_file(str(path)))
        return router
    for i, task in enumerate(scenario.tasks):
        router.fit_expert(i, as_float(task.x_train), task.y_train)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in router.export_state().items()}, str(path))
    return router


def as_stored(fitted: DensityRouter, dtype: str, expert_weight: float) -> DensityRouter:
    """The router a run with ``router.state_dtype: dtype`` would hold: the fp32 fit packed as fit_expert packs it."""
    r = DensityRouter(
        fitted.num_experts, fitted.components, clusters=fitted.clusters, state_dtype=dtype, expert_weight=expert_weight
    )
    r.densities = [[stored_component(p, dtype) for p in comps] for comps in fitted.densities]
    r.counts, r.labels = list(fitted.counts), list(fitted.labels)
    r.component_log_density = memo(r.component_log_density)
    return r


def from_tuning(out: Path, budget: int | None = None, stem: str | None = None) -> int:
    """Render a finished ``compare --tune`` grid: each point's validation accuracy and the bytes its run keeps
    (and, given DER++'s bytes as ``budget``, whether it fits and the best point that does)."""
    try:
        tuning = json.loads((out / "tuning.json").read_text())
    except (OSError, ValueError) as e:
        print(
            f"--from-tuning {out}: no readable tuning.json ({e}); run `modulemesh compare ... --tune` first",
            file=sys.stderr,
        )
        return 2
    rows, best = [], None
    for strategy, block in tuning["strategies"].items():
        for entry in block["grid"]:
            point = {k: str(v) for k, v in entry["point"].items()}
            where = tuning_dir(out, strategy, point, block["seed"])  # the directory compare --tune wrote
            metrics = json.loads((where / "metrics.json").read_text())
            kept, val = metrics["total_bytes"], entry["validation_average_accuracy"]
            row = {"strategy": strategy, **point, "bytes": f"{kept:,}"}
            if budget is not None:
                row["<= DER++"] = "yes" if kept <= budget else "no"
                if kept <= budget and (best is None or (val, -kept) > best[0]):
                    best = ((val, -kept), point)
            rows.append({**row, "val avg acc (%)": f"{val:.2f}"})
    name = Path(tuning["command"].split()[2]).stem
    swept = list(next(iter(tuning["strategies"].values()))["grid"][0]["point"])  # the --tune keys
    flag = (f" --budget {budget}" if budget is not None else "") + (f" --name {stem}" if stem else "")
    text = (
        f"# Equal memory: stored precision and size on the validation split ({name}: {' x '.join(swept)})\n\n"
        f"Written by `python benchmarks/routing_bytes.py --from-tuning {out}{flag}` from the grid of real runs of "
        f"`{tuning['command']}` (seed {tuning['strategies'][next(iter(tuning['strategies']))]['seed']}; "
        "validation average accuracy after the last task; bytes: what each run keeps"
        + (f"; budget: DER++ with its 500-example buffer, **{budget:,} bytes**" if budget is not None else "")
        + ").\n\n"
        + markdown_table(rows, right=["bytes", "val avg acc (%)"])
    )
    if best is not None:
        text += (
            f"\nBest within the budget: {', '.join(f'{k} {v}' for k, v in best[1].items())}: {best[0][0]:.2f}% on "
            f"validation, {-best[0][1]:,} bytes.\n"
        )
    atomic_write_text(ROOT / "benchmarks" / "results" / f"{stem or f'routing_bytes_{name}'}.md", text)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="split_mnist_class_il.yaml")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--buffers", default="300", help="comma-separated strategy.buffer_size values to train")
    ap.add_argument("--densities", default=DENSITIES, help="comma-separated CLUSTERSxCOMPONENTS density sizes")
    ap.add_argument("--out", default="runs/benchmarks/routing_bytes")
    ap.add_argument("--from-tuning", default=None, help="render this `modulemesh compare --tune` output instead")
    ap.add_argument("--budget", type=int, default=None, help="with --from-tuning: DER++'s bytes, marks what fits")
    ap.add_argument(
        "--name", default=None, help="with --from-tuning: results file stem (default routing_bytes_<config>)"
    )
    args = ap.parse_args(argv)
    if args.name is not None and (not args.from_tuning or not args.name.replace("_", "").isalnum()):
        print(f"--name {args.name!r}: give a file stem of letters, digits and _, with --from-tuning", file=sys.stderr)
        return 2
    if args.from_tuning:
        return from_tuning(Path(args.from_tuning), args.budget, args.name)
    try:
        densities = [tuple(int(v) for v in d.split("x")) for d in args.densities.split(",")]
        assert all(len(d) == 2 and min(d) >= 1 for d in densities)
    except (ValueError, AssertionError):
        print(f"--densities {args.densities!r}: give CLUSTERSxCOMPONENTS sizes, e.g. 3x10,3x5", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    config, out = str(ROOT / "configs" / args.config), Path(args.out) / Path(args.config).stem
    ((_, _, dcfg),) = plan_runs(config, [f"seed={args.seed}"], ["derpp"], 1, "cpu")
    budget = (finished_metrics(out / "derpp", dcfg) or run_experiment(dcfg, out / "derpp"))["total_bytes"]
    rows, best = [], None
    for buffer in [int(b) for b in args.buffers.split(",")]:
        over = [f"seed={args.seed}", f"modulemesh.buffer_size={buffer}", *THROWAWAY]
        ((_, _, cfg),) = plan_runs(config, over, ["modulemesh"], 1, "cpu")
        where = out / f"buffer{buffer}"
        metrics = finished_metrics(where, cfg) or run_experiment(cfg, where)
        scenario, _, strategy = build_experiment(cfg)
        trained = ModuleMesh.load(where / "mesh").eval()
        for storage in STORAGES:
            pool = ExpertPool()
            for e in trained.pool:
                twin = pool.add(e.clone(e.name).compress(storage))
                twin.forward = memo(twin.forward)
            for clusters, components in densities:
                fitted = fit_densities(scenario, clusters, components, out / f"density_c{clusters}_k{components}.st")
                for dtype in DTYPES:
                    mesh = ModuleMesh(trained.num_classes, trained.input_shape, as_stored(fitted, dtype, 0.0), pool)
                    kept = total_bytes(mesh, None)["total_bytes"] + metrics["strategy_state_bytes"]
                    s = score(mesh.eval(), scenario, strategy)
                    top = max((k for k in s if k.startswith("mesh")), key=s.get)
                    row = {
                        "expert.storage": storage,
                        "density": f"{clusters}x{components} {dtype}",
                        "buffer": buffer,
                        "bytes": f"{kept:,}",
                        "<= DER++": "yes" if kept <= budget else "no",
                        "router-only (%)": f"{s['router-only']:.2f}",
                        "within-expert (%)": f"{s['within-expert']:.2f}",
                        "task-id b=20 (%)": f"{s['task-id b=20']:.2f}",
                        "best mesh (%)": f"{s[top]:.2f}",
                        "at": top.removeprefix("mesh "),
                    }
                    rows.append(row)
                    print(row, flush=True)
                    if kept <= budget and (best is None or (s[top], -kept) > best[0]):
                        best = ((s[top], -kept), row)
    text = (
        f"# Equal memory: ModuleMesh within DER++'s bytes, chosen on the validation split ({Path(config).name})\n\n"
        f"Written by `python benchmarks/routing_bytes.py --config {args.config} --seed {args.seed} --buffers "
        f"{args.buffers} --densities {args.densities}` ({platform.machine()} CPU, one thread). "
        "Every accuracy is on the validation split of all "
        "tasks after the last one; b = router.expert_weight, a = strategy.router_weight, 'best mesh' over b in "
        "[0, 2, 10, 20, 30, 50] and a in [0.5, 1]. Bytes: what a run with these settings keeps (experts as stored, "
        "densities as stored, replay buffer of uint8 images + int64 labels and task ids). Budget: DER++ with its "
        f"500-example buffer, **{budget:,} bytes** (fp32 MLP that trains on every task + buffer + stored logits). "
        "Experts and densities are rounded once, when their task ends, and compute in fp32.\n\n"
        + markdown_table(rows, right=["buffer", "bytes", *[k for k in rows[0] if k.endswith("(%)")]])
    )
    if best is not None:
        b = best[1]
        text += (
            f"\nBest within the budget: expert.storage {b['expert.storage']}, density {b['density']}, buffer "
            f"{b['buffer']}, {b['at']}: {b['best mesh (%)']}% on validation, {b['bytes']} bytes.\n"
        )
    name = Path(args.config).stem
    atomic_write_text(ROOT / "benchmarks" / "results" / f"routing_bytes_{name}.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
