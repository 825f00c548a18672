"""Federated benchmark on MNIST: federated distillation vs FedAvg vs centralized, bytes, failures, poisoning.

    python benchmarks/federated.py [--rounds 10] [--out runs/federated_bench]

Base settings come from ``configs/federate_mnist.yaml`` (10 clients, MLP 200-200, 5,000 held-out
training images as the unlabelled public proxy set). Runs, all with the in-process sim engine:

1. Dirichlet alpha 0.1 and 1.0: centralized (same private data pooled), FedAvg, federated
   distillation (FD) with fp32 and int8 logits; bytes FD needs to first reach FedAvg's final
   accuracy, as a fraction of FedAvg's total bytes; calibrated (offline LiRA) membership-inference AUC.
2. 100 simulated clients, one full FD run: wall time.
3. 30% of the peers vanish mid-round (a new draw each round): FD and FedAvg.
4. One poisoned client of 10 (sign-flipped x10 weights for FedAvg, confidently wrong logits for
   FD), with plain and robust aggregation.

Prints a markdown table and writes ``OUT/benchmark.json`` and ``OUT/benchmark.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from publish import publish

ROOT = Path(__file__).resolve().parents[1]
# how every table names the split it used (partition.py has both Dirichlet conventions)
PARTITION_NAME = {
    "dirichlet": "Dirichlet per class (one Dir(alpha) draw per class over the clients)",
    "dirichlet_clientwise": "Dirichlet per client (one Dir(alpha) label mix per client, sizes fixed first)",
    "iid": "IID",
    "task": "whole tasks per client",
}


def machine_load() -> str:
    """How busy the machine was (wall times are only comparable on an otherwise idle machine)."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} cores when the run ended"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "federate_mnist.yaml"))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--clients100-rounds", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (the machine has 2 cores)")
    p.add_argument("--out", default=str(ROOT / "runs" / "federated_bench"))
    p.add_argument(
        "--scale-only",
        action="store_true",
        help="only the 100-client FD run, timed alone; writes benchmarks/results/federated_scale.md",
    )
    args = p.parse_args(argv)

    import torch

    from modulemesh.config import load_config, to_dict
    from modulemesh.data.datasets import load_dataset
    from modulemesh.federated.config import FederateExperiment
    from modulemesh.federated.membership import membership_audit
    from modulemesh.federated.sim import make_fed_data, make_runner, simulate
    from modulemesh.io import atomic_write_json, atomic_write_text

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    base = load_config(FederateExperiment, args.config, [f"federation.rounds={args.rounds}", f"seed={args.seed}"])
    ds = load_dataset(base.data.name)
    results: dict = {"config": to_dict(base), "runs": {}}

    def data_for(alpha: float, clients: int = 10):
        fc = base.federation
        return make_fed_data(
            ds.x_train,
            ds.y_train,
            ds.x_test,
            ds.y_test,
            clients,
            "dirichlet",
            alpha,
            fc.distill.proxy_size,
            seed=base.seed,
            num_classes=ds.num_classes,
            min_size=fc.min_client_size,
        )

    def run(name: str, data, mia: bool = False, **fed) -> dict:
        cfg = base.federation.model_copy(update=fed)
        cfg = type(cfg).model_validate(cfg.model_dump())  # validate the overrides
        runner = make_runner(cfg, data, base.seed)
        t0 = time.perf_counter()
        hist = simulate(cfg, data, base.seed, runner=runner)
        rec = {
            "mode": cfg.mode,
            "final_accuracy": hist[-1]["accuracy"],
            "accuracy": [h["accuracy"] for h in hist],
            "bytes_cumulative": [h["bytes_cumulative"] for h in hist],
            "bytes_received_total": sum(h["bytes_received"] for h in hist),
            "seconds": round(time.perf_counter() - t0, 1),
            "failed_per_round": [len(h["failed"]) for h in hist],
            "overrides": {k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in fed.items()},
        }
        if "mesh_accuracy" in hist[-1]:
            rec["mesh_accuracy"] = hist[-1]["mesh_accuracy"]
        if mia and hasattr(runner, "predict"):
            # offline LiRA with reference models trained like this run (modulemesh.federated.membership)
            rec.update(
                membership_audit(
                    runner.predict, data, cfg, seed=base.seed, n=2000, references=cfg.membership_references
                )
            )
        results["runs"][name] = rec
        print(
            f"  {name:<34} acc {rec['final_accuracy']:.4f}  {rec['bytes_cumulative'][-1] / 1e6:8.1f} MB  "
            f"{rec['seconds']:6.1f} s",
            flush=True,
        )
        return rec

    def bytes_to_reach(fd: dict, target: float):
        for acc, b in zip(fd["accuracy"], fd["bytes_cumulative"]):
            if acc >= target:
                return b
        return None

    if args.scale_only:
        c100 = run(
            "c100/distill",
            data_for(0.1, clients=100),
            mode="distill",
            clients=100,
            alpha=0.1,
            rounds=args.clients100_rounds,
            client_eval_size=500,
        )
        table = (
            "| run | accuracy | sent / received | wall time |\n|---|---:|---:|---:|\n"
            f"| FD, 100 clients, Dirichlet 0.1 ({PARTITION_NAME[base.federation.partition]}), "
            f"{args.clients100_rounds} rounds | "
            f"{c100['final_accuracy']:.4f} | {c100['bytes_cumulative'][-1] / 1e6:.1f} MB / "
            f"{c100['bytes_received_total'] / 1e6:.1f} MB | {c100['seconds']:.0f} s |\n"
        )
        publish(
            "federated_scale",
            "Federated distillation with 100 simulated clients",
            f"MNIST, the settings of configs/federate_mnist.yaml, {args.threads} torch threads; "
            f"{machine_load()} (goal: under 3 minutes on 2 cores, timed alone).\n\n{table}",
            argv,
        )
        return 0

    rows = []
    central = None
    for alpha in (0.1, 1.0):
        print(f"MNIST, 10 clients, Dirichlet alpha={alpha}", flush=True)
        data = data_for(alpha)
        if central is None:  # the pooled data does not depend on alpha
            # the upper reference: same model and epochs on the pooled private data, larger batches for speed
            central = run("central", data, mia=True, mode="central", alpha=alpha, batch_size=128, lr=0.2)
        fedavg = run(f"a{alpha}/fedavg", data, mia=True, mode="fedavg", alpha=alpha)
        fd = run(f"a{alpha}/distill_fp32", data, mia=True, mode="distill", alpha=alpha)
        fd8 = run(f"a{alpha}/distill_int8", data, mode="distill", alpha=alpha, codec="int8")
        local = run(f"a{alpha}/local", data, mode="local", alpha=alpha)
        if alpha == 0.1:
            run("a0.1/modules_ring", data, mode="modules", alpha=alpha)
        target, fb = fedavg["final_accuracy"], fedavg["bytes_cumulative"][-1]
        b32, b8 = bytes_to_reach(fd, target), bytes_to_reach(fd8, target)
        rows.append(
            {
                "alpha": alpha,
                "central": central["final_accuracy"],
                "fedavg": target,
                "local_mean": local["final_accuracy"],
                "fd_fp32": fd["final_accuracy"],
                "fd_int8": fd8["final_accuracy"],
                "fd_gap_to_central": central["final_accuracy"] - fd["final_accuracy"],
                "fedavg_bytes": fb,
                "fedavg_bytes_received": fedavg["bytes_received_total"],
                "fd_fp32_bytes_to_fedavg_acc": b32,
                "fd_int8_bytes_to_fedavg_acc": b8,
                "ratio_fp32": (b32 / fb) if b32 else None,
                "ratio_int8": (b8 / fb) if b8 else None,
                "mia_auc": {
                    "central": central["membership_auc"],
                    "fedavg": fedavg["membership_auc"],
                    "fd_student": fd["membership_auc"],
                },
            }
        )

    print("100 simulated clients, Dirichlet alpha=0.1", flush=True)
    big = data_for(0.1, clients=100)
    c100 = run(
        "c100/distill", big, mode="distill", clients=100, alpha=0.1, rounds=args.clients100_rounds, client_eval_size=500
    )

    print("30% of peers fail mid-round / one poisoned peer of 10 (alpha=1.0)", flush=True)
    data = data_for(1.0)
    fail = {
        "fedavg": run("a1.0/fedavg_fail30", data, mode="fedavg", alpha=1.0, failure_rate=0.3),
        "distill": run("a1.0/distill_fail30", data, mode="distill", alpha=1.0, failure_rate=0.3),
    }
    poison = {
        "fedavg_mean": run("a1.0/fedavg_poison1", data, mode="fedavg", alpha=1.0, poisoned=1),
        "fedavg_trimmed": run(
            "a1.0/fedavg_trimmed_poison1", data, mode="fedavg", alpha=1.0, aggregator="trimmed_mean", poisoned=1
        ),
        "distill_conf": run("a1.0/distill_poison1", data, mode="distill", alpha=1.0, poisoned=1),
        "distill_median": run(
            "a1.0/distill_median_poison1",
            data,
            mode="distill",
            alpha=1.0,
            poisoned=1,
            distill=base.federation.distill.model_copy(update={"robust": "median"}),
        ),
    }
    R = results["runs"]
    total = time.perf_counter() - t_start

    def mb(b):
        return f"{b / 1e6:.1f} MB" if b is not None else "not reached"

    def ratio(x):
        return f"{x:.2f}x" if x is not None else "n/a"

    md = [
        f"MNIST, {base.federation.rounds} rounds, MLP 200-200, 1 local epoch (batch 64, SGD lr 0.1), "
        "5,000 held-out proxy images; "
        f"partition: {PARTITION_NAME[base.federation.partition]}; seed {base.seed}; "
        f"{total / 60:.1f} min on {args.threads} threads, {machine_load()}. "
        "Bytes: every transfer counted once (sent; received is less only when a receiver failed), including each "
        "client's download of the model (FedAvg) or of the proxy images (FD) when it joins.\n",
        "| Dirichlet alpha | centralized | FedAvg | local (mean) | FD fp32 | FD int8 | FD gap to centralized | "
        "FedAvg sent / received | FD sent to reach FedAvg's acc (fp32 / int8) | ratio fp32 / int8 | "
        "MIA AUC central / FedAvg / FD |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["mia_auc"]
        md.append(
            f"| {r['alpha']} | {r['central']:.4f} | {r['fedavg']:.4f} | {r['local_mean']:.4f} | {r['fd_fp32']:.4f} | "
            f"{r['fd_int8']:.4f} | {100 * r['fd_gap_to_central']:.1f} pt | "
            f"{mb(r['fedavg_bytes'])} / {mb(r['fedavg_bytes_received'])} | "
            f"{mb(r['fd_fp32_bytes_to_fedavg_acc'])} / {mb(r['fd_int8_bytes_to_fedavg_acc'])} | "
            f"{ratio(r['ratio_fp32'])} / {ratio(r['ratio_int8'])} | "
            f"{m['central']:.3f} / {m['fedavg']:.3f} / {m['fd_student']:.3f} |"
        )
    md += [
        "",
        "| scenario (alpha 1.0 unless noted) | accuracy | vs clean run (plain aggregation) | time |",
        "|---|---|---|---|",
    ]
    clean_fa, clean_fd = R["a1.0/fedavg"]["final_accuracy"], R["a1.0/distill_fp32"]["final_accuracy"]
    scen = [
        (
            f"FD, 100 clients, alpha 0.1, {args.clients100_rounds} rounds",
            c100,
            R["a0.1/distill_fp32"]["final_accuracy"],
        ),
        ("FedAvg, 30% peers fail each round", fail["fedavg"], clean_fa),
        ("FD, 30% peers fail each round", fail["distill"], clean_fd),
        ("FedAvg (mean), 1 poisoned of 10", poison["fedavg_mean"], clean_fa),
        ("FedAvg trimmed mean (10%), 1 poisoned", poison["fedavg_trimmed"], clean_fa),
        ("FD confidence-weighted, 1 poisoned", poison["distill_conf"], clean_fd),
        ("FD median of log-probs, 1 poisoned", poison["distill_median"], clean_fd),
    ]
    mod = R["a0.1/modules_ring"]
    md.append(
        f"| modules: 10 peers on a ring, 2 of 10 experts each, alpha 0.1 (mean peer / whole mesh) | "
        f"{mod['final_accuracy']:.4f} / {mod['mesh_accuracy']:.4f} | {mod['bytes_cumulative'][-1] / 1e6:.1f} MB sent / "
        f"{mod['bytes_received_total'] / 1e6:.1f} MB received | {mod['seconds']:.0f} s |"
    )
    for name, rec, ref in scen:
        md.append(
            f"| {name} | {rec['final_accuracy']:.4f} | {100 * (rec['final_accuracy'] - ref):+.1f} pt | "
            f"{rec['seconds']:.0f} s |"
        )
    text = "\n".join(md) + "\n"
    print()
    print(text)
    out = Path(args.out)
    results.update(
        summary=rows,
        scenarios={
            n: {"accuracy": r["final_accuracy"], "reference": ref, "seconds": r["seconds"]} for n, r, ref in scen
        },
        seconds_total=round(total, 1),
        command=" ".join(["python benchmarks/federated.py", *(argv if argv is not None else sys.argv[1:])]),
    )
    atomic_write_json(out / "benchmark.json", results)
    atomic_write_text(out / "benchmark.md", text)
    publish("federated", "Federated and decentralized training on MNIST", text, argv)
    print(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
