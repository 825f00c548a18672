"""``modulemesh federate``: federated / decentralized training of expert modules.

    modulemesh federate [CONFIG] --mode fedavg|modules|distill|local|central --clients K --rounds R
                        --alpha A [--engine sim|flower|hivemind] [--seed S] [--device auto] [--out DIR]

The run itself is ``modulemesh.federated.run.run_federate``; this module parses and prints. Writes
into DIR (every file atomically): ``config.yaml``, ``results.json`` (per-round accuracy,
per-client accuracy, bytes sent and received per peer, summary), ``rounds.csv``, the plots
``accuracy_vs_rounds.png``, ``accuracy_vs_bytes.png`` and ``client_accuracy.png``,
``state.safetensors``/``state.json`` (the run's tensors after the last finished round) and
``mesh/``, the trained model as a mesh that ``ModuleMesh.load`` reads (modules mode: every
expert module, routed by the library's EntropyRouter). Rerunning with the same ``--out`` and
config resumes after the last finished round; ``--overwrite`` starts over. The flower and
hivemind engines run all rounds in one go (no resume); hivemind (``modulemesh[p2p]``, modes
fedavg and modules) runs one process per peer on 127.0.0.1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_set_option

MODES = ("fedavg", "modules", "distill", "local", "central")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (sections: data, federation; see configs/federate_*.yaml)")
    p.add_argument(
        "--mode",
        choices=MODES,
        help="fedavg (one model), modules (peers sharing expert modules), distill (federated distillation), "
        "local / central baselines",
    )
    p.add_argument("--clients", type=int, metavar="K", help="number of clients / peers")
    p.add_argument("--rounds", type=int, metavar="R", help="communication rounds")
    p.add_argument(
        "--alpha", type=float, metavar="A", help="Dirichlet label-skew concentration (0.1 strong skew, 100 ~ IID)"
    )
    p.add_argument(
        "--engine",
        choices=("sim", "flower", "hivemind"),
        help="sim: in-process simulation (default); flower: Flower simulation engine (needs modulemesh[flower]); "
        "hivemind: one process per peer, DHT + decentralized averaging on loopback (needs modulemesh[p2p])",
    )
    p.add_argument("--codec", help="message codec: fp32, fp16, int8, topk:K (logits), lowrank:R")
    p.add_argument("--dataset", help="dataset name (mnist, fashion_mnist, digits, ...)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu or cuda[:N]")
    add_set_option(p, "override any config key, e.g. --set federation.distill.tau=0.5 (repeatable)")
    p.add_argument("--out", default="results/federate", help="output directory (default: results/federate)")
    p.add_argument("--overwrite", action="store_true", help="start over even if --out holds a finished or partial run")
    p.add_argument("--quiet", action="store_true", help="no per-round progress")


def build_config(args: argparse.Namespace):
    """YAML file, then ``--set`` overrides, then the explicit flags (which win)."""
    from ..config import load_config
    from ..federated.config import FederateExperiment

    fed = {
        k: getattr(args, k)
        for k in ("mode", "clients", "rounds", "alpha", "engine", "codec")
        if getattr(args, k) is not None
    }
    return load_config(
        FederateExperiment,
        args.config,
        args.overrides,
        seed=args.seed,
        device=args.device,
        federation=fed or None,
        data={"name": args.dataset} if args.dataset else None,
    )


def main(args: argparse.Namespace) -> int:
    from ..federated import results as res
    from ..federated.run import run_federate

    exp = build_config(args)
    out = Path(args.out)
    outcome = run_federate(exp, out, overwrite=args.overwrite, progress=not args.quiet)
    if args.quiet:
        return 0
    if outcome.already_done:
        print(f"{out}: all {exp.federation.rounds} rounds already done; use --overwrite to start over")
    else:
        if outcome.resumed_after:
            print(f"resumed {out} after round {outcome.resumed_after}/{exp.federation.rounds}")
        res.print_summary(outcome.summary, out)
    return 0
