"""``modulemesh federate``: federated / decentralized training of expert modules.

    modulemesh federate [CONFIG] --mode fedavg|modules|distill|local|central --clients K --rounds R
                        --alpha A [--engine sim|flower|hivemind] [--seed S] [--device auto] [--out DIR]

Writes into DIR (every file atomically): ``config.yaml`` (the resolved config), ``results.json``
(per-round accuracy, per-client accuracy, bytes per peer, summary), ``rounds.csv``, the plots
``accuracy_vs_rounds.png``, ``accuracy_vs_bytes.png`` and ``client_accuracy.png``, and
``state.safetensors``/``state.json`` (the run's tensors after the last finished round). Rerunning
with the same ``--out`` and config resumes after the last finished round; ``--overwrite``
starts over. The flower and hivemind engines run all rounds in one go (no resume); hivemind
(``modulemesh[p2p]``, modes fedavg and modules) runs one process per peer on 127.0.0.1 and saves
each peer's modules after the last round as ``state.safetensors``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

MODES = ("fedavg", "modules", "distill", "local", "central")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (sections: data, federation; see configs/federate_*.yaml)")
    p.add_argument("--mode", choices=MODES, help="fedavg (one model), modules (peers sharing expert modules), distill (federated distillation), local / central baselines")
    p.add_argument("--clients", type=int, metavar="K", help="number of clients / peers")
    p.add_argument("--rounds", type=int, metavar="R", help="communication rounds")
    p.add_argument("--alpha", type=float, metavar="A", help="Dirichlet label-skew concentration (0.1 strong skew, 100 ~ IID)")
    p.add_argument("--engine", choices=("sim", "flower", "hivemind"), help="sim: in-process simulation (default); flower: Flower simulation engine (needs modulemesh[flower]); hivemind: one process per peer, DHT + decentralized averaging on loopback (needs modulemesh[p2p])")
    p.add_argument("--codec", help="message codec: fp32, fp16, int8, topk:K (logits), lowrank:R")
    p.add_argument("--dataset", help="dataset name (mnist, fashion_mnist, digits, ...)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu or cuda[:N]")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set federation.distill.tau=0.5 (repeatable)")
    p.add_argument("--out", default="results/federate", help="output directory (default: results/federate)")
    p.add_argument("--overwrite", action="store_true", help="start over even if --out holds a finished or partial run")
    p.add_argument("--quiet", action="store_true", help="no per-round progress")


def build_config(args: argparse.Namespace):
    """YAML file, then ``--set`` overrides, then the explicit flags (which win)."""
    from ..config import load_config
    from ..federated.config import FederateExperiment

    fed = {k: getattr(args, k) for k in ("mode", "clients", "rounds", "alpha", "engine", "codec") if getattr(args, k) is not None}
    return load_config(FederateExperiment, args.config, args.overrides, seed=args.seed, device=args.device,
                       federation=fed or None, data={"name": args.dataset} if args.dataset else None)


def main(args: argparse.Namespace) -> int:
    from ..config import to_dict
    from ..utils import resolve_device, seed_everything
    from ..federated import results as res

    exp = build_config(args)
    fc = exp.federation
    if fc.engine == "hivemind":
        from ..federated.hivemind_engine import check_config

        check_config(fc)  # refuse unsupported modes before any data is loaded or process started
    out = Path(args.out)
    cfg_dict = to_dict(exp)
    history, state = res.resume_point(out, cfg_dict, overwrite=args.overwrite)
    if len(history) >= fc.rounds:
        if not args.quiet:
            print(f"{out}: all {fc.rounds} rounds already done; use --overwrite to start over")
        res.write_outputs(out, cfg_dict, history, final=True)
        return 0
    device = resolve_device(exp.device)
    seed_everything(exp.seed)
    from ..federated.simulate import fed_data_from_experiment

    data = fed_data_from_experiment(exp, device)

    if fc.engine == "flower":
        from ..federated.flower_app import run_flower_simulation

        history = run_flower_simulation(exp, data, progress=not args.quiet)
        res.write_outputs(out, cfg_dict, history, final=True, data=data)
        return 0

    if fc.engine == "hivemind":
        from ..federated.hivemind_engine import run_hivemind

        progress = res.Progress(fc.rounds, 0, f"hivemind {fc.mode} K={fc.clients} alpha={fc.alpha}", enabled=not args.quiet)
        with progress:
            history, state = run_hivemind(exp, data, on_round=progress.update)
        res.save_round(out, cfg_dict, history, state)
        summary = res.write_outputs(out, cfg_dict, history, final=True, data=data)
        if not args.quiet:
            res.print_summary(summary, out)
        return 0

    from ..federated.simulate import make_runner, simulate

    runner = make_runner(fc, data, exp.seed)
    if state is not None:
        runner.load_state(state)
        if fc.failure_mode == "permanent":
            runner.dead = {i for rec in history for i in rec["failed"]}
    start = len(history)
    if start and not args.quiet:
        print(f"resuming {out} after round {start}/{fc.rounds}")
    progress = res.Progress(fc.rounds, start, f"{fc.mode} K={fc.clients} alpha={fc.alpha} {fc.partition}", enabled=not args.quiet)

    def on_round(rec: dict) -> None:
        history.append(rec)
        res.save_round(out, cfg_dict, history, runner.state())
        progress.update(rec)

    with progress:
        simulate(fc, data, exp.seed, runner=runner, start_round=start, on_round=on_round,
                 bytes_before=history[-1]["bytes_cumulative"] if history else 0)
    summary = res.write_outputs(out, cfg_dict, history, final=True, data=data, runner=runner)
    if not args.quiet:
        res.print_summary(summary, out)
    return 0
