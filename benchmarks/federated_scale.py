"""1,000 simulated clients in one process (vmapped local updates): FD variant vs FedAvg, wall time and memory.

    python benchmarks/federated_scale.py [--clients 1000] [--variant feddf_ema] [--threads 2]

MNIST, the settings of ``configs/federate_mnist.yaml`` but Dirichlet alpha 0.1 *per client*
(``dirichlet_clientwise``, balanced sizes: every client gets ~55 images; the per-class convention
cannot give 1,000 clients data at alpha 0.1). Each method runs in its own child process, so its
peak RSS is its own; per-client accuracy is taken on 500 test images in the last round only. Memory
per client: the bytes of one client's model as the stacked state holds it, and the child's peak RSS
above the same process before the runner was built, divided by the clients. Writes
``benchmarks/results/federated_scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from federated_runs import PARTITION_NAME, VARIANTS, federation_for, machine_load, peak_rss_bytes, run_one
from publish import command_line, publish

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def child(args) -> int:
    """One method, timed, in this process; prints its JSON record."""
    import torch

    from modulemesh.config import load_config
    from modulemesh.data.datasets import load_dataset
    from modulemesh.federated.config import FederateExperiment
    from modulemesh.federated.sim import make_fed_data
    from modulemesh.federated.sim.stacked import Stack

    torch.set_num_threads(args.threads)
    base = load_config(FederateExperiment, args.config, [f"federation.rounds={args.rounds}", f"seed={args.seed}"])
    cfg = federation_for(
        base,
        args.one,
        clients=args.clients,
        alpha=0.1,
        partition="dirichlet_clientwise",
        min_client_size=1,
        client_eval_size=500,
        eval_every=args.rounds,
    )
    ds = load_dataset(base.data.name)
    t0 = time.perf_counter()
    data = make_fed_data(
        ds.x_train,
        ds.y_train,
        ds.x_test,
        ds.y_test,
        cfg.clients,
        cfg.partition,
        cfg.alpha,
        cfg.distill.proxy_size,
        seed=args.seed,
        num_classes=ds.num_classes,
        min_size=1,
        sizes=cfg.client_sizes,
    )
    split_s = time.perf_counter() - t0
    rss0 = peak_rss_bytes()
    rec = run_one(cfg, data, args.seed)
    params = sum(p.numel() for p in Stack(cfg.backbone, data.input_shape, data.num_classes, 1, 0).params.values())
    rec.update(
        name=args.one,
        clients=cfg.clients,
        partition=cfg.partition,
        split_seconds=round(split_s, 1),
        client_sizes=[min(data.counts), max(data.counts)],
        model_bytes_per_client=params * 4,
        peak_rss_delta_bytes=peak_rss_bytes() - rss0,
    )
    print("RESULT " + json.dumps(rec), flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "federate_mnist.yaml"))
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", default="feddf_ema", choices=sorted(VARIANTS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args(argv)
    if args.one:
        return child(args)
    path = RESULTS / "federated_scale.json"
    res = json.loads(path.read_text()) if args.render_only else {"runs": {}}
    if not args.render_only:
        from modulemesh.io import atomic_write_json

        for name in (args.variant, "fedavg"):
            cmd = [
                sys.executable,
                __file__,
                "--one",
                name,
                "--clients",
                str(args.clients),
                "--rounds",
                str(args.rounds),
                "--seed",
                str(args.seed),
                "--threads",
                str(args.threads),
                "--config",
                args.config,
            ]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
                return 1
            rec = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[7:])
            res["runs"][name] = rec
            print(f"{name}: acc {rec['final_accuracy']:.4f}, {rec['seconds']:.0f} s", flush=True)
        res.update(threads=args.threads, load=machine_load(), variant=args.variant, command=command_line(argv))
        atomic_write_json(path, res)
    any_run = next(iter(res["runs"].values()))
    rows = [
        f"| method | accuracy | wall time ({len(any_run['accuracy'])} rounds) | CPU time, all threads | sent / "
        "received | client model | peak RSS rise per client |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["runs"].items():
        rows.append(
            f"| {VARIANTS[name][0]} | {r['final_accuracy']:.4f} | {r['seconds']:.0f} s | {r['cpu_seconds']:.0f} s | "
            f"{r['bytes_cumulative'][-1] / 1e9:.2f} GB / {r['bytes_received_total'] / 1e9:.2f} GB | "
            f"{r['model_bytes_per_client'] / 1e3:.0f} KB | {r['peak_rss_delta_bytes'] / r['clients'] / 1e3:.0f} KB |"
        )
    body = (
        f"MNIST, {any_run['clients']:,} clients, {len(any_run['accuracy'])} rounds, the settings of "
        f"configs/federate_mnist.yaml; partition: {PARTITION_NAME[any_run['partition']]}, alpha 0.1, "
        f"{any_run['client_sizes'][0]}-{any_run['client_sizes'][1]} images per client; seed 0; one process, "
        f"{res['threads']} torch threads; {res['load']} (goal: under 10 minutes on 2 cores, at least FedAvg's "
        "accuracy with the same clients, rounds and partition). The machine was shared: CPU time / 2 is what the "
        "run would need at best on 2 idle cores."
        + (f" Runs: `{res['command']}`." if "command" in res else "")
        + "\n\n"
        + "\n".join(rows)
    )
    publish("federated_scale", f"Federated distillation with {any_run['clients']:,} simulated clients", body, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
