"""Federated benchmark on MNIST: centralized vs FedAvg vs federated distillation (FD) variants, over seeds.

    python benchmarks/federated.py [--seeds 0 1 2] [--rounds 10] [--json benchmarks/results/federated.json]
    python benchmarks/federated.py --render-only     # re-render the tables from the JSON
    python benchmarks/federated.py --set federation.local_epochs=5 --name federated_e5   # a shared setting changed

``--set`` changes the base config for every row (centralized, FedAvg and each FD variant alike); such a run
writes its own JSON and table (``--name``), since none of the base runs can be read back into it.

Base settings come from ``configs/federate_mnist.yaml`` (10 clients, MLP 200-200, 1 local epoch,
5,000 held-out training images as the unlabelled public proxy set, Dirichlet per class). Tables:

1. Main (every seed): centralized, FedAvg and the FD variants named by ``--main`` at Dirichlet
   alpha 0.1 and 1.0: accuracy mean +- sd, gap to centralized, bytes sent, and the bytes each FD
   variant needs to first reach FedAvg's final accuracy (same seed) as a fraction of FedAvg's total.
2. Ablation (every seed): each published switch alone and combined (``--ablation``).

Failures, poisoning, 100 clients, modules and the membership audit are in
``benchmarks/federated_scenarios.py`` (its own 3-seed JSON and table).

Every finished run is saved to the JSON at once; a rerun skips runs already there (same key), so an
interrupted benchmark resumes and the tables can be re-rendered without training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from federated_runs import PARTITION_NAME, VARIANTS, bytes_to_reach, federation_for, machine_load, run_one
from publish import publish

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MAIN = ["fd", "feddf", "fd_counts", "feddf_counts"]
ABLATION = ["fd_sharpen", "fd_ema", "fd_proxy20k"]  # the feddf_* combinations are in VARIANTS too


def key(alpha, name, seed):
    return f"central/s{seed}" if name == "central" else f"a{alpha}/{name}/s{seed}"


def train(args, res: dict, jobs) -> None:
    import torch

    from modulemesh.config import load_config, to_dict
    from modulemesh.data.datasets import load_dataset
    from modulemesh.federated.config import FederateExperiment
    from modulemesh.federated.sim import make_fed_data
    from modulemesh.io import atomic_write_json

    torch.set_num_threads(args.threads)
    base = load_config(FederateExperiment, args.config, [f"federation.rounds={args.rounds}", *args.set])
    res.setdefault("config", to_dict(base))
    ds = load_dataset(base.data.name)
    for alpha, name, seed in jobs:
        k = key(alpha, name, seed)
        if k in res["runs"]:
            continue
        cfg = federation_for(base, name, alpha=alpha)
        fc = cfg
        data = make_fed_data(
            ds.x_train,
            ds.y_train,
            ds.x_test,
            ds.y_test,
            fc.clients,
            fc.partition,
            alpha,
            fc.distill.proxy_size,
            seed=seed,
            num_classes=ds.num_classes,
            min_size=fc.min_client_size,
        )
        rec = run_one(cfg, data, seed)
        rec.update(alpha=alpha, name=name, seed=seed, partition=fc.partition)
        res["runs"][k] = rec
        print(
            f"  {k:<28} acc {rec['final_accuracy']:.4f}  {rec['bytes_cumulative'][-1] / 1e6:7.1f} MB  "
            f"{rec['seconds']:6.1f} s",
            flush=True,
        )
        res["load"] = machine_load()
        atomic_write_json(Path(args.json), res)


def pm(xs, digits=4):
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} +- {statistics.stdev(xs):.{digits}f}"


def main_table(res, seeds, alphas, names) -> list[str]:
    R = res["runs"]
    md = [
        "| Dirichlet alpha | method | accuracy | gap to centralized | sent, all rounds | "
        "sent to reach FedAvg's final accuracy / FedAvg's total (per seed) |",
        "|---|---|---|---|---|---|",
    ]
    for alpha in alphas:
        central = [R[key(alpha, "central", s)]["final_accuracy"] for s in seeds]
        md.append(f"| {alpha} | {VARIANTS['central'][0]} | {pm(central)} | | | |")
        fa = {s: R[key(alpha, "fedavg", s)] for s in seeds}
        for name in ["fedavg", *names]:
            if any(key(alpha, name, s) not in R for s in seeds):  # left out by --variant-alphas
                md.append(f"| {alpha} | {VARIANTS[name][0]} | not run at this alpha | | | |")
                continue
            runs = [R[key(alpha, name, s)] for s in seeds]
            acc = [r["final_accuracy"] for r in runs]
            gap = [100 * (c - a) for c, a in zip(central, acc)]
            sent = [r["bytes_cumulative"][-1] / 1e6 for r in runs]
            if name == "fedavg":
                reach = "1.00 (reference)"
            else:
                ratios = [bytes_to_reach(r, fa[s]["final_accuracy"]) for r, s in zip(runs, seeds)]
                reach = " / ".join(
                    f"{b / fa[s]['bytes_cumulative'][-1]:.2f}" if b else "not reached" for b, s in zip(ratios, seeds)
                )
            md.append(f"| {alpha} | {VARIANTS[name][0]} | {pm(acc)} | {pm(gap, 1)} pt | {pm(sent, 1)} MB | {reach} |")
    return md


def ablation_table(res, seeds, alphas, names) -> list[str]:
    R = res["runs"]
    head = " | ".join(f"alpha {a}: accuracy / ensemble on proxy / sent" for a in alphas)
    md = [f"| variant (seeds {', '.join(map(str, seeds))}) | {head} |", "|---|" + "---|" * len(alphas)]
    for name in ["fedavg", *names]:
        cells = []
        for a in alphas:
            if any(key(a, name, s) not in R for s in seeds):
                cells.append("not run")
                continue
            runs = [R[key(a, name, s)] for s in seeds]
            teacher = [r["teacher_proxy_accuracy"][-1] for r in runs]
            sent = statistics.mean(r["bytes_cumulative"][-1] for r in runs) / 1e6
            t = pm(teacher) if None not in teacher else "-"
            cells.append(f"{pm([r['final_accuracy'] for r in runs])} / {t} / {sent:.1f} MB")
        md.append(f"| {VARIANTS[name][0]} | " + " | ".join(cells) + " |")
    return md


def render(args, res: dict) -> str:
    seeds, alphas = res["seeds"], res["alphas"]
    part = PARTITION_NAME[res["config"]["federation"]["partition"]]
    fc = res["config"]["federation"]
    epochs = f"{fc['local_epochs']:g} local epoch" + ("s" if fc["local_epochs"] != 1 else "")
    setup = (
        f"MNIST, {fc['clients']} clients, {fc['rounds']} rounds, MLP 200-200, {epochs} "
        f"(batch {fc['batch_size']}, SGD lr {fc['lr']}), {fc['distill']['proxy_size']:,} held-out proxy images unless "
        f"a row says otherwise; partition: {part}; full 10,000-image test set; {res['load']}. Bytes: every "
        "transfer counted once, including each client's download of the model (FedAvg, FedDF) or of the proxy "
        "images (logit FD) when it joins. Centralized: the same model on the pooled private data, batch 128, lr 0.2, "
        f"{fc['local_epochs']:g} epoch(s) per round for {fc['rounds']} rounds (the clients' epochs)."
    )
    if any("codec" in VARIANTS[n][1] for n in [*res["main"], *res["ablation"]]):
        setup += (
            f" Messages are {fc['codec']} unless a row names a codec; int8 quantizes each tensor to one byte per "
            "value (per-tensor min and scale), in both directions."
        )
    if any(VARIANTS[n][1].get("scaffold") for n in [*res["main"], *res["ablation"]]):
        setup += (
            " SCAFFOLD rows (`federation.scaffold=true`, Karimireddy et al. 2020) correct every local step by the "
            "control variates c - c_i; the server's c goes down with the model and each client's change of c_i comes "
            "up with its weights, so those rows send twice the bytes of the same codec without it."
        )
    md = [setup, "", f"**Main table**: seeds {', '.join(map(str, seeds))} (mean +- sd).", ""]
    md += main_table(res, seeds, alphas, res["main"])
    order = list(VARIANTS)
    names = sorted({*res["main"], *res["ablation"]} - {"central", "fedavg"}, key=order.index)
    # The seeds for which every ablation row exists (older JSON holds the first seed only).
    ran = [(a, n) for a in alphas for n in ["fedavg", *names] if any(key(a, n, s) in res["runs"] for s in seeds)]
    done = [s for s in seeds if all(key(a, n, s) in res["runs"] for a, n in ran)]
    md += [
        "",
        f"**Ablation**: seeds {', '.join(map(str, done))} (mean +- sd where more than one); 'ensemble on proxy' is "
        "the accuracy of the aggregated soft labels on the proxy set (a diagnostic: proxy labels are never "
        "trained on).",
        "",
    ]
    md += ablation_table(res, done, alphas, names)
    md += [
        "",
        "Failures, poisoning, 100 clients, modules and membership inference (3 seeds): "
        "benchmarks/results/federated_scenarios.md, written by `python benchmarks/federated_scenarios.py`.",
    ]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "federate_mnist.yaml"))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument("--main", nargs="+", default=MAIN, choices=sorted(VARIANTS))
    p.add_argument("--ablation", nargs="+", default=ABLATION, choices=sorted(VARIANTS))
    p.add_argument(
        "--variant-alphas",
        type=float,
        nargs="+",
        help="run the --main/--ablation variants at these alphas only (default: --alphas); the tables say 'not run'",
    )
    p.add_argument(
        "--skip",
        nargs="+",
        default=[],
        choices=sorted(VARIANTS),
        help="variants to render but not train now (their missing runs show as 'not run')",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="base config override, every row")
    p.add_argument("--name", default="federated", help="results name: benchmarks/results/NAME.md (and .json)")
    p.add_argument("--json", default=None, help="default: benchmarks/results/NAME.json")
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args(argv)
    args.json = args.json or str(RESULTS / f"{args.name}.json")
    path = Path(args.json)
    res = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    if not args.render_only:
        if res.get("set", []) != args.set and res["runs"]:
            print(
                f"error: {path} holds runs with --set {res.get('set', [])}; use another --name/--json", file=sys.stderr
            )
            return 2
        res.update(seeds=args.seeds, alphas=args.alphas, main=args.main, ablation=args.ablation, set=args.set)
        va = args.variant_alphas or args.alphas
        jobs = [(a, n, s) for s in args.seeds for a in args.alphas for n in ["central", "fedavg"]]
        jobs += [(a, n, s) for s in args.seeds for a in va for n in [*args.main, *args.ablation] if n not in args.skip]
        train(args, res, jobs)
    text = render(args, res)
    print(text)
    title = "Federated and decentralized training on MNIST"
    publish(args.name, title + (f" ({', '.join(res.get('set', []))})" if res.get("set") else ""), text, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
