"""Where one FedDF round at 1,000 clients spends its time, and the stacked server path against the per-client loop.

    python benchmarks/federated_round_profile.py [--clients 1000] [--threads 1]

MNIST, the settings of ``configs/federate_mnist.yaml``, Dirichlet 0.1 per client (as
``federated_scale.py``). In one process, on the same client stack: (a) the upload + FedAvg step as
the per-client loop (copy, encode, decode, re-stack each client, then ``aggregate`` of the list)
and as ``sim.upload.upload`` + ``aggregate_stacked`` (one pass over the stack); (b) the server's
ensemble forward pass on the proxy set with the old chunking (all K models per input chunk of
32768 / K images) and the new one (64 models x 1,024 images); (c) one whole FedDF round with the
new code (local training and the clients' accuracy on 500 test images included, as in the last
round of ``federated_scale.py``). Old and new run back to back, so their ratio holds on a shared
machine even when the absolute times do not. Writes ``benchmarks/results/federated_round_profile.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from federated_runs import federation_for, machine_load
from publish import command_line, publish

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def measure(args) -> dict:
    import torch

    from modulemesh.config import load_config
    from modulemesh.data.datasets import load_dataset
    from modulemesh.federated.aggregate import aggregate, aggregate_stacked
    from modulemesh.federated.config import FederateExperiment
    from modulemesh.federated.sim import make_fed_data, make_runner
    from modulemesh.federated.sim.upload import upload, upload_loop

    torch.set_num_threads(args.threads)
    base = load_config(FederateExperiment, args.config, ["federation.rounds=1", f"seed={args.seed}"])
    cfg = federation_for(
        base,
        "feddf",
        clients=args.clients,
        alpha=0.1,
        partition="dirichlet_clientwise",
        min_client_size=1,
        client_eval_size=500,  # as federated_scale.py's last round: each client scored on 500 test images
    )
    ds = load_dataset(base.data.name)
    data = make_fed_data(
        ds.x_train, ds.y_train, ds.x_test, ds.y_test, cfg.clients, cfg.partition, cfg.alpha,
        cfg.distill.proxy_size, seed=args.seed, num_classes=ds.num_classes, min_size=1, sizes=cfg.client_sizes,
    )  # fmt: skip
    runner = make_runner(cfg, data, args.seed)  # clients start from different random weights
    stack, k, senders = runner.stack, runner.k, list(range(runner.k))
    counts = [runner.counts[i] for i in senders]
    mods = {"model": stack.params}

    def loop_path():
        rx, sizes = upload_loop(mods, senders, cfg.codec)
        rows = [{n: v[j] for n, v in rx["model"].items()} for j in range(len(senders))]
        return aggregate(rows, counts, cfg.aggregator, cfg.trim), sizes

    def stacked_path():
        rx, sizes = upload(mods, senders, cfg.codec)
        return aggregate_stacked(rx["model"], counts, cfg.aggregator, cfg.trim), sizes

    (avg_loop, b_loop), t_loop = timed(loop_path)
    (avg_new, b_new), t_new = timed(stacked_path)
    assert b_loop == b_new and all(torch.equal(avg_loop[n], avg_new[n]) for n in avg_loop)
    x = data.x_proxy
    old, t_ens_old = timed(lambda: stack.logits(x, clients=k, batch=max(32, min(2048, 32768 // k))))
    new, t_ens_new = timed(lambda: stack.logits(x))
    diff = float((old - new).abs().max())
    del old, new
    rec, t_round = timed(lambda: runner.run_round(0))
    return {
        "clients": k,
        "proxy_images": len(x),
        "upload_loop_seconds": round(t_loop, 2),
        "upload_stacked_seconds": round(t_new, 2),
        "bytes_per_client": b_new[0],
        "ensemble_old_seconds": round(t_ens_old, 2),
        "ensemble_new_seconds": round(t_ens_new, 2),
        "ensemble_max_abs_diff": diff,
        "round_seconds": round(t_round, 2),
        "threads": args.threads,
        "load": machine_load(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "federate_mnist.yaml"))
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args(argv)
    path = RESULTS / "federated_round_profile.json"
    if args.render_only:
        r = json.loads(path.read_text())
    else:
        from modulemesh.io import atomic_write_json

        r = measure(args)
        r["command"] = command_line(argv)
        atomic_write_json(path, r)
    rows = [
        "| step | per-client loop (old) | stacked (new) | speed-up |",
        "|---|---:|---:|---:|",
        f"| upload (copy, encode, decode) + FedAvg of {r['clients']:,} clients | {r['upload_loop_seconds']:.2f} s | "
        f"{r['upload_stacked_seconds']:.2f} s | {r['upload_loop_seconds'] / r['upload_stacked_seconds']:.1f}x |",
        f"| ensemble forward, {r['clients']:,} models x {r['proxy_images']:,} proxy images | "
        f"{r['ensemble_old_seconds']:.2f} s | {r['ensemble_new_seconds']:.2f} s | "
        f"{r['ensemble_old_seconds'] / r['ensemble_new_seconds']:.2f}x |",
    ]
    body = (
        f"MNIST, {r['clients']:,} clients (Dirichlet 0.1 per client), FedDF with the settings of "
        f"configs/federate_mnist.yaml; {r['threads']} torch thread(s); {r['load']}. The machine was shared with "
        "other jobs: compare old and new within this table (they ran back to back on the same stack), not with "
        f"other tables. Bytes per client upload: {r['bytes_per_client']:,} in both paths (checked equal for every "
        f"client, and the averaged model bit-identical); ensemble logits differ by at most "
        f"{r['ensemble_max_abs_diff']:.1e}. One whole FedDF round (local training, each client's accuracy on 500 "
        f"test images, upload, ensemble, distillation) with the new code took {r['round_seconds']:.1f} s, of "
        "which the ensemble forward is "
        f"{100 * r['ensemble_new_seconds'] / r['round_seconds']:.0f}% and the upload + FedAvg "
        f"{100 * r['upload_stacked_seconds'] / r['round_seconds']:.1f}%. Run: `{r['command']}`.\n\n" + "\n".join(rows)
    )
    publish("federated_round_profile", f"One FedDF round at {r['clients']:,} clients, profiled", body, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
