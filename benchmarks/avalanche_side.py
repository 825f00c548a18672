"""Avalanche 0.6.0 and ModuleMesh side by side on exactly the same Split-MNIST stream.

Driven by ``benchmarks/vs_avalanche.sh``; four subcommands, so that Avalanche only ever runs in
its own virtual environment and ModuleMesh only in the project's:

    python avalanche_side.py export    --seed K --out DIR/split_sK.pt     # project Python: the tensors
    python avalanche_side.py avalanche --data DIR/split_sK.pt --out DIR/avalanche_sK.json   # Avalanche venv
    python avalanche_side.py ours      --data DIR/split_sK.pt --out DIR/ours_sK.json        # project Python
    python avalanche_side.py table     --dir DIR --seeds N --md benchmarks/results/vs_avalanche.md
    python avalanche_side.py table     --from-json benchmarks/results/vs_avalanche.json --md ...  # re-render

``export`` builds the scenario with ModuleMesh's own loader and scenario code
(``configs/split_mnist_class_il.yaml``: MNIST, classes 0-1, 2-3, ..., 10% of each task held out
for validation, seed K) and saves each task's training and test tensors; the Avalanche side turns
exactly those tensors into a benchmark (``create_generic_benchmark_from_tensor_lists``), so both
libraries train on the same examples. Same model (Flatten -> 784-100-100-10 MLP, PyTorch's
default initialization under seed K), SGD lr 0.03, batch 10, 1 epoch per task, buffer 500, one
torch thread (fixed settings on both sides, overriding the config's per-strategy blocks).
Timed (wall and this process's CPU seconds, the latter less disturbed by other jobs on a shared
machine): the training calls only (Avalanche ``strategy.train(experience)``; ModuleMesh
``Trainer.train_task(task)``, which includes each strategy's before/after-task work such as the
EWC Fisher); evaluation (the same function for both, outside the timer) is not timed. ``table``
writes the combined JSON (benchmarks/results/vs_avalanche.json) and renders it
(``avalanche_report.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from avalanche_report import PAIRS

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "split_mnist_class_il.yaml"
SETTINGS = {
    "lr": 0.03,
    "batch_size": 10,
    "epochs": 1,
    "buffer": 500,
    "ewc_lambda": 90.0,
    "ewc_gamma": 1.0,
    "lwf_alpha": 1.0,
    "lwf_T": 2.0,
    "der_alpha": 1.0,
}


def accuracy_row(model, tasks, torch) -> list[float]:
    """Class-IL accuracy (%) of ``model`` on each task's test set (argmax over all 10 classes)."""
    model.eval()
    row = []
    with torch.no_grad():
        for t in tasks:
            pred = torch.cat([model(t["x_test"][i : i + 2048]).argmax(1) for i in range(0, len(t["y_test"]), 2048)])
            row.append(100.0 * float((pred == t["y_test"]).float().mean()))
    model.train()
    return row


def summary(R: list[list[float]]) -> dict:
    final = R[-1]
    forgetting = [max(R[k][j] for k in range(j, len(R) - 1)) - final[j] for j in range(len(R) - 1)]
    return {
        "average_accuracy": sum(final) / len(final),
        "forgetting": sum(forgetting) / max(len(forgetting), 1),
        "accuracy_matrix": R,
    }


# ---------------------------------------------------------------- export (project Python)


def cmd_export(args) -> None:
    import torch

    from modulemesh.config import ExperimentConfig, load_config
    from modulemesh.data.scenarios import as_float
    from modulemesh.runner import build_experiment

    cfg = load_config(ExperimentConfig, str(CONFIG), ["strategy.name=finetune", "device=cpu"], seed=args.seed)
    scenario, _, _ = build_experiment(cfg)
    tasks = [
        {
            "classes": t.classes,
            "x_train": as_float(t.x_train).contiguous(),
            "y_train": t.y_train.long(),
            "x_test": as_float(t.x_test).contiguous(),
            "y_test": t.y_test.long(),
        }
        for t in scenario
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"tasks": tasks, "num_classes": scenario.num_classes, "settings": {**SETTINGS, "seed": args.seed}}, args.out
    )
    print(
        f"exported {len(tasks)} tasks, {sum(len(t['y_train']) for t in tasks):,} training and "
        f"{sum(len(t['y_test']) for t in tasks):,} test examples to {args.out}"
    )


# ---------------------------------------------------------------- Avalanche (its own venv)


def warm_up(torch) -> None:
    """The first optimizer step imports torch._dynamo (~3 s here); pay it before any timer starts,
    so it is not charged to whichever strategy happens to run first on either side."""
    p = torch.zeros(1, requires_grad=True)
    p.sum().backward()
    torch.optim.SGD([p], lr=0.1).step()


def cmd_avalanche(args) -> None:
    import torch
    from torch import nn

    torch.set_num_threads(1)
    warm_up(torch)
    import avalanche
    from avalanche.benchmarks.scenarios.deprecated.generic_benchmark_creation import (
        create_generic_benchmark_from_tensor_lists,
    )
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised import DER, EWC, LwF, Naive, Replay

    data = torch.load(args.data)
    tasks, s = data["tasks"], data["settings"]
    bench = create_generic_benchmark_from_tensor_lists(
        train_tensors=[[t["x_train"], t["y_train"]] for t in tasks],
        test_tensors=[[t["x_test"], t["y_test"]] for t in tasks],
        task_labels=[0] * len(tasks),
    )  # class-IL: no task labels
    results = {
        "avalanche_version": avalanche.__version__,
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,  # a CUDA build runs on the CPU here; recorded for the table
        "seed": s["seed"],
        "strategies": {},
    }
    only = set(args.only.split(",")) if args.only else None
    for label, _, name in PAIRS:
        if only and name not in only:
            continue
        torch.manual_seed(s["seed"])
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10)
        )
        common = dict(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=s["lr"]),
            criterion=nn.CrossEntropyLoss(),
            train_mb_size=s["batch_size"],
            train_epochs=s["epochs"],
            eval_mb_size=1024,
            device="cpu",
            evaluator=EvaluationPlugin(loggers=[]),
        )
        if name == "Naive":
            strategy = Naive(**common)
        elif name == "EWC":
            strategy = EWC(**common, ewc_lambda=s["ewc_lambda"], mode="online", decay_factor=s["ewc_gamma"])
        elif name == "LwF":
            strategy = LwF(**common, alpha=s["lwf_alpha"], temperature=s["lwf_T"])
        elif name == "Replay":
            strategy = Replay(**common, mem_size=s["buffer"])
        else:
            strategy = DER(
                **common, mem_size=s["buffer"], batch_size_mem=s["batch_size"], alpha=s["der_alpha"], beta=0.0
            )
        R, train_s, cpu_s = [], 0.0, 0.0
        for exp in bench.train_stream:
            t0, c0 = time.perf_counter(), time.process_time()
            strategy.train(exp, num_workers=0)
            train_s += time.perf_counter() - t0
            cpu_s += time.process_time() - c0
            R.append(accuracy_row(model, tasks, torch))
        results["strategies"][name] = {**summary(R), "train_time_s": train_s, "train_cpu_s": cpu_s}
        print(
            f"avalanche {name}: {results['strategies'][name]['average_accuracy']:.2f}% in {train_s:.1f} s", flush=True
        )
    Path(args.out).write_text(json.dumps(results, indent=1))


# ---------------------------------------------------------------- ModuleMesh (project Python)


def cmd_ours(args) -> None:
    import torch

    torch.set_num_threads(1)
    warm_up(torch)
    from modulemesh.config import ExperimentConfig, load_config
    from modulemesh.runner import build_experiment
    from modulemesh.training.loop import Trainer
    from modulemesh.utils import seed_everything

    data = torch.load(args.data)
    tasks, s = data["tasks"], data["settings"]
    results = {"torch_version": torch.__version__, "seed": s["seed"], "strategies": {}}
    for label, name, _ in PAIRS:
        overrides = [
            f"strategy.name={name}",
            "device=cpu",
            f"strategy.buffer_size={s['buffer']}",
            f"train.lr={s['lr']}",
            f"train.batch_size={s['batch_size']}",
            f"train.epochs={s['epochs']}",
            "expert.backbone.hidden=[100,100]",
        ]
        cfg = load_config(ExperimentConfig, str(CONFIG), overrides, seed=s["seed"])
        seed_everything(cfg.seed)
        scenario, mesh, strategy = build_experiment(cfg)
        # the very tensors the Avalanche side trained on
        for t, saved in zip(scenario, tasks):
            assert t.classes == saved["classes"] and torch.equal(t.y_train, saved["y_train"]), (
                "scenario differs from the export"
            )
        strategy.setup(mesh)
        trainer = Trainer(mesh, strategy, cfg.train, torch.device("cpu"), seed=cfg.seed)

        def model(x, mesh=mesh):  # the baselines' one monolithic MLP
            return mesh.experts[0](x)

        R, train_s, cpu_s = [], 0.0, 0.0
        for task in scenario:
            t0, c0 = time.perf_counter(), time.process_time()
            trainer.train_task(task, scenario)
            train_s += time.perf_counter() - t0
            cpu_s += time.process_time() - c0
            mesh.eval()
            R.append(accuracy_row(_Callable(model), tasks, torch))
        results["strategies"][name] = {**summary(R), "train_time_s": train_s, "train_cpu_s": cpu_s}
        print(
            f"modulemesh {name}: {results['strategies'][name]['average_accuracy']:.2f}% in {train_s:.1f} s", flush=True
        )
    Path(args.out).write_text(json.dumps(results, indent=1))


class _Callable:
    """``accuracy_row`` wants .eval()/.train() and a call; the mesh's expert is driven directly."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)

    def eval(self):
        return self

    def train(self):
        return self


# ---------------------------------------------------------------- table


def cmd_table(args) -> None:
    from avalanche_report import collect, render
    from modulemesh.io import atomic_write_json, atomic_write_text

    md = Path(args.md)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
    else:
        notes = Path(args.notes).read_text() if args.notes and Path(args.notes).exists() else ""
        data = collect(Path(args.dir), args.seeds, SETTINGS, notes)
        atomic_write_json(md.with_suffix(".json"), data)
    atomic_write_text(md, render(data))
    print(md.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("export")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the models' initialization and the order")
    p = sub.add_parser("avalanche")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--only", default="", help="comma-separated Avalanche strategy names")
    p = sub.add_parser("ours")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("table")
    p.add_argument("--dir", help="work directory with ours_s<k>.json and avalanche_s<k>.json")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 to read from --dir")
    p.add_argument("--md", required=True)
    p.add_argument("--notes", default="")
    p.add_argument("--from-json", help="re-render a combined JSON written by an earlier table call")
    args = ap.parse_args()
    if args.cmd == "table" and not (args.dir or args.from_json):
        ap.error("table needs --dir WORK (the per-seed JSONs) or --from-json benchmarks/results/vs_avalanche.json")
    {"export": cmd_export, "avalanche": cmd_avalanche, "ours": cmd_ours, "table": cmd_table}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
