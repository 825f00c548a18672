"""Where federated distillation loses, and which switches to keep: cheap probes on a validation split.

    python benchmarks/federated_select.py ALPHA ROUNDS "k=v,k=v" ["k=v" ...] >> LOG    # one JSON line per setting
    python benchmarks/federated_select.py --render LOG [LOG ...]      # -> benchmarks/results/federated_select.md

5,000 images of MNIST's *training* set (seeded, fixed) are held out as the validation set and take the
test set's place; the federation splits the remaining 55,000 as ``configs/federate_mnist.yaml`` says
(seed 0, one seed, few rounds). The test set is never read, so settings picked here are picked on
validation data only. Each line records validation accuracy per round and the accuracy of the
aggregated soft labels on the proxy set (the ensemble the student learns from).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from publish import publish

ROOT = Path(__file__).resolve().parents[1]


def probe(alpha: float, rounds: int, sets_list: list[list[str]]) -> None:
    import numpy as np
    import torch

    from modulemesh.config import load_config
    from modulemesh.data.datasets import load_dataset
    from modulemesh.federated.config import FederateExperiment
    from modulemesh.federated.sim import make_fed_data, simulate

    torch.set_num_threads(1)
    ds = load_dataset("mnist")
    perm = np.random.default_rng(123).permutation(len(ds.y_train))
    val, tr = perm[:5000], np.sort(perm[5000:])
    x, y = torch.as_tensor(ds.x_train), torch.as_tensor(ds.y_train)
    for sets in sets_list:
        fixed = [f"federation.alpha={alpha}", f"federation.rounds={rounds}", "federation.client_eval_size=100"]
        exp = load_config(FederateExperiment, str(ROOT / "configs" / "federate_mnist.yaml"), fixed + sets)
        fc = exp.federation
        d = make_fed_data(
            x[tr], y[tr], x[val], y[val], fc.clients, fc.partition, fc.alpha, fc.distill.proxy_size,
            seed=0, num_classes=10, min_size=fc.min_client_size,
        )  # fmt: skip
        t, cpu = time.time(), time.process_time()
        h = simulate(fc, d, 0)
        rec = {
            "alpha": alpha,
            "sets": sets,
            "val": [round(r["accuracy"], 4) for r in h],
            "teacher": [round(r.get("teacher_proxy_accuracy", 0), 4) for r in h],
            "MB": round(h[-1]["bytes_cumulative"] / 1e6, 1),
            "s": round(time.time() - t, 1),
            "cpu_s": round(time.process_time() - cpu, 1),
        }
        print(json.dumps(rec), flush=True)


def render(logs: list[str]) -> None:
    recs = [json.loads(ln) for p in logs for ln in Path(p).read_text().splitlines() if ln.startswith("{")]
    md = [
        "MNIST, 10 clients, the settings of configs/federate_mnist.yaml (partition: Dirichlet per class) unless the "
        "row changes them; seed 0; validation set: 5,000 images held out of the training set (the test set is "
        "not used). 'ensemble' is the accuracy of the aggregated soft labels on the proxy set.",
        "",
        "| alpha | setting | validation accuracy per round | ensemble on proxy, last round | sent |",
        "|---|---|---|---:|---:|",
    ]
    for r in sorted(recs, key=lambda r: r["alpha"]):
        setting = ", ".join(s.replace("federation.", "") for s in r["sets"]) or "FD as configured"
        per_round = " ".join(f"{a:.3f}" for a in r["val"])
        ens = f"{r['teacher'][-1]:.3f}" if r["teacher"][-1] else "-"  # no ensemble in FedAvg
        md.append(f"| {r['alpha']} | {setting} | {per_round} | {ens} | {r['MB']} MB |")
    publish("federated_select", "Federated distillation: probes on a validation split", "\n".join(md))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--render":
        render(argv[1:])
        return 0
    probe(float(argv[0]), int(argv[1]), [s.split(",") if s else [] for s in argv[2:]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
