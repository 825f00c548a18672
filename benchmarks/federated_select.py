"""Where federated distillation loses, and which switches to keep: cheap probes on a validation split.

    python benchmarks/federated_select.py ALPHA ROUNDS "k=v,k=v" ["k=v" ...] >> LOG    # one JSON line per setting
    python benchmarks/federated_select.py --ceiling ROUNDS PROXY_SIZE [PROXY_SIZE ...] >> LOG   # the student's ceiling
    python benchmarks/federated_select.py --render LOG [LOG ...]      # -> benchmarks/results/federated_select.md

5,000 images of MNIST's *training* set (seeded, fixed) are held out as the validation set and take the
test set's place; the federation splits the remaining 55,000 as ``configs/federate_mnist.yaml`` says
(seed 0, one seed, few rounds). The test set is never read, so settings picked here are picked on
validation data only. Each line records validation accuracy per round and the accuracy of the
aggregated soft labels on the proxy set (the ensemble the student learns from).

``--ceiling`` replaces the ensemble by one perfect-as-we-can member: the centralized model (trained on the
pooled private data as the benchmark's centralized row is), and runs the FD student (``fd_counts``: the
same aggregation, sharpening and Adam steps, ROUNDS rounds) on its soft labels on the proxy set. No
federation of these clients can hand the student a better teacher, so this bounds what logit FD with that
proxy set can reach.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from modulemesh.errors import ConfigError
from publish import publish

ROOT = Path(__file__).resolve().parents[1]


def validation_split():
    """MNIST's training set as (x, y) tensors, and the fixed 5,000 validation / 55,000 training indices."""
    import numpy as np
    import torch

    from modulemesh.data.datasets import load_dataset

    torch.set_num_threads(1)
    ds = load_dataset("mnist")
    perm = np.random.default_rng(123).permutation(len(ds.y_train))
    return torch.as_tensor(ds.x_train), torch.as_tensor(ds.y_train), perm[:5000], np.sort(perm[5000:])


def split(fc, x, y, val, tr):
    from modulemesh.federated.sim import make_fed_data

    return make_fed_data(
        x[tr], y[tr], x[val], y[val], fc.clients, fc.partition, fc.alpha, fc.distill.proxy_size,
        seed=0, num_classes=10, min_size=fc.min_client_size,
    )  # fmt: skip


def load(sets: list[str]):
    from modulemesh.config import load_config
    from modulemesh.federated.config import FederateExperiment

    return load_config(FederateExperiment, str(ROOT / "configs" / "federate_mnist.yaml"), sets)


def probe(alpha: float, rounds: int, sets_list: list[list[str]]) -> None:
    from modulemesh.federated.sim import simulate

    x, y, val, tr = validation_split()
    for sets in sets_list:
        fixed = [f"federation.alpha={alpha}", f"federation.rounds={rounds}", "federation.client_eval_size=100"]
        fc = load(fixed + sets).federation
        d = split(fc, x, y, val, tr)
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


def ceiling(rounds: int, proxy_sizes: list[int]) -> None:
    import torch

    from federated_runs import federation_for
    from modulemesh.federated.sim import Student, make_runner, simulate

    x, y, val, tr = validation_split()
    for size in proxy_sizes:
        t, cpu = time.time(), time.process_time()
        base = load([f"federation.rounds={rounds}", f"federation.distill.proxy_size={size}"])
        d = split(base.federation, x, y, val, tr)
        central = make_runner(federation_for(base, "central"), d, 0)
        simulate(central.cfg, d, 0, runner=central)
        student = Student(federation_for(base, "fd_counts"), d, 0)
        teacher = central.stack.logits(d.x_proxy)  # (1, N, C): a one-member ensemble holding every class
        student.aggregate(teacher, class_counts=torch.ones(1, d.num_classes))
        acc = []
        for r in range(rounds):
            student.learn(r)
            acc.append(round(student.accuracy(), 4))
        rec = {
            "ceiling": True,
            "rounds": rounds,
            "proxy_size": size,
            "teacher_val": round(central_accuracy(central, d), 4),
            "teacher": round(student.teacher_accuracy(), 4),
            "val": acc,
            "s": round(time.time() - t, 1),
            "cpu_s": round(time.process_time() - cpu, 1),
        }
        print(json.dumps(rec), flush=True)


def central_accuracy(runner, d) -> float:
    from modulemesh.federated.sim.stacked import model_accuracy

    return model_accuracy(runner.stack, runner.stack.member(0), d.x_test, d.y_test)


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
    for r in sorted((r for r in recs if "alpha" in r), key=lambda r: r["alpha"]):
        setting = ", ".join(s.replace("federation.", "") for s in r["sets"]) or "FD as configured"
        per_round = " ".join(f"{a:.3f}" for a in r["val"])
        ens = f"{r['teacher'][-1]:.3f}" if r["teacher"][-1] else "-"  # no ensemble in FedAvg
        md.append(f"| {r['alpha']} | {setting} | {per_round} | {ens} | {r['MB']} MB |")
    ceil = [r for r in recs if r.get("ceiling")]
    if ceil:
        md += [
            "",
            "**The student's ceiling**: the FD student (class-count weights, sharpening, Adam, 10 epochs a round) "
            "distilled from the soft labels of the centralized model (pooled private data, one epoch a round for "
            f"{'/'.join(sorted({str(r.get('rounds', 10)) for r in ceil}))} rounds, batch 128, lr 0.2) on the proxy "
            "set instead of an ensemble of clients (`--ceiling`); validation accuracy.",
            "",
            "| proxy images | centralized teacher: validation / on proxy | student, per round |",
            "|---:|---|---|",
        ]
        for r in sorted(ceil, key=lambda r: r["proxy_size"]):
            per_round = " ".join(f"{a:.3f}" for a in r["val"])
            md.append(f"| {r['proxy_size']:,} | {r['teacher_val']:.4f} / {r['teacher']:.4f} | {per_round} |")
    publish("federated_select", "Federated distillation: probes on a validation split", "\n".join(md))


USAGE = (
    'usage: federated_select.py ALPHA ROUNDS "k=v,k=v" [...] | --ceiling ROUNDS PROXY_SIZE [...] | --render LOG [...]'
)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:  # the three forms take positional numbers; a wrong one gets the usage line, not a traceback
        if argv and argv[0] == "--render":
            if not argv[1:] or (missing := [a for a in argv[1:] if not Path(a).is_file()]):
                raise ValueError(f"no log file {missing[0]!r}" if argv[1:] else "--render needs LOG files")
            render(argv[1:])
        elif argv and argv[0] == "--ceiling":
            rounds, sizes = int(argv[1]), [int(a) for a in argv[2:]]
            if rounds < 1 or not sizes or min(sizes) < 1:
                raise ValueError("--ceiling needs ROUNDS >= 1 and at least one PROXY_SIZE >= 1")
            ceiling(rounds, sizes)
        else:
            alpha, rounds = float(argv[0]), int(argv[1])
            if alpha <= 0 or rounds < 1:
                raise ValueError("ALPHA must be > 0 and ROUNDS >= 1")
            probe(alpha, rounds, [s.split(",") if s else [] for s in argv[2:]])
    except IndexError:
        print(f"error: missing arguments; {USAGE}", file=sys.stderr)
        return 2
    except (ValueError, ConfigError) as e:  # ConfigError: a bad k=v, named by the config loader
        print(f"error: {e}; {USAGE}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
