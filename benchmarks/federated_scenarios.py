"""Failures, poisoning, 100 clients and modules on MNIST, plus the calibrated membership audit, over seeds.

    python benchmarks/federated_scenarios.py [--seeds 0 1 2] [--rounds 10] [--references 4] [--threads 1]
    python benchmarks/federated_scenarios.py --render-only     # re-render the tables from the JSON

Base settings come from ``configs/federate_mnist.yaml`` (10 clients, MLP 200-200, 1 local epoch,
5,000 held-out proxy images, its partition convention). For every seed, on the current code:

1. Scenarios, each next to the clean run of the same seed and alpha: 30% of the peers vanish
   mid-round (a new draw each round; FedAvg, FD), one poisoned client of 10 (sign-flipped x10
   weights for FedAvg, confidently wrong logits for FD) with plain and robust aggregation (FedAvg
   trimmed mean 10%, FD median of log-probs) at alpha 1.0; FD with 100 clients at alpha 0.1 (next
   to FD with 10 clients); modules on a ring (10 peers, 2 of 10 experts each) at alpha 0.1 (next to
   FedAvg at alpha 0.1).
2. Calibrated membership inference (offline LiRA, ``modulemesh.federated.membership``) on the final
   model of the clean centralized, FedAvg and FD runs at each ``--mia-alphas``; the reference models
   are trained like the audited run.

``--clean-from benchmarks/results/federated.json`` takes the clean runs that benchmarks/federated.py
already made (same keys and settings) instead of running them again; the table says which, and
whether the runs made in both places agree. The audited runs come last, method by method, each made
again here because the audit needs the final model.

Every finished run goes to ``benchmarks/results/federated_scenarios.json`` at once (atomic write);
a rerun skips the runs already there, so an interrupted benchmark resumes. The JSON remembers the
settings it was made with and refuses to mix in runs made with others.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from federated_runs import PARTITION_NAME, cpu_seconds, federation_for, machine_load, run_one
from publish import command_line, publish

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# name -> (row label, VARIANTS entry it starts from, alpha, overrides of federation.* ("distill" holds
# overrides of federation.distill.*), the clean run of the same seed it is compared with)
RUNS = {
    "a1.0/fedavg": ("FedAvg, clean", "fedavg", 1.0, {}, None),
    "a1.0/fd": ("FD, clean", "fd", 1.0, {}, None),
    "a1.0/fedavg_fail30": ("FedAvg, 30% of peers fail each round", "fedavg", 1.0, {"failure_rate": 0.3}, "a1.0/fedavg"),
    "a1.0/fd_fail30": ("FD, 30% of peers fail each round", "fd", 1.0, {"failure_rate": 0.3}, "a1.0/fd"),
    "a1.0/fedavg_poison1": ("FedAvg (mean), 1 poisoned of 10", "fedavg", 1.0, {"poisoned": 1}, "a1.0/fedavg"),
    "a1.0/fedavg_trimmed_poison1": (
        "FedAvg trimmed mean (10%), 1 poisoned of 10",
        "fedavg",
        1.0,
        {"poisoned": 1, "aggregator": "trimmed_mean", "trim": 0.1},
        "a1.0/fedavg",
    ),
    "a1.0/fd_poison1": ("FD confidence-weighted, 1 poisoned of 10", "fd", 1.0, {"poisoned": 1}, "a1.0/fd"),
    "a1.0/fd_median_poison1": (
        "FD median of log-probs, 1 poisoned of 10",
        "fd",
        1.0,
        {"poisoned": 1, "distill": {"robust": "median"}},
        "a1.0/fd",
    ),
    "a0.1/fd": ("FD, 10 clients, clean", "fd", 0.1, {}, None),
    "a0.1/fedavg": ("FedAvg, clean", "fedavg", 0.1, {}, None),
    "a0.1/modules_ring": (
        "modules: 10 peers on a ring, 2 of 10 experts each (mean peer / whole mesh)",
        "fedavg",
        0.1,
        {"mode": "modules", "modules": {"topology": "ring", "modules_per_peer": 2}},
        "a0.1/fedavg",
    ),
    "a0.1/fd_c100": ("FD, 100 clients", "fd", 0.1, {"clients": 100, "client_eval_size": 500}, "a0.1/fd"),
    # the pooled data does not depend on alpha; 0.1 as in benchmarks/federated.py
    "central": ("centralized (pooled private data)", "central", 0.1, {}, None),
}
SCENARIOS = [k for k, v in RUNS.items() if v[4]]  # the rows of the first table, in this order
AUDITED = {"central": "central", "fedavg": "FedAvg", "fd": "FD"}  # clean runs the membership audit reads


def run_key(name: str, seed: int) -> str:
    return f"{name}/s{seed}"


AUDIT = "audit/"  # key prefix of the clean runs made again, after every scenario, for the membership audit


def jobs_for(seeds, mia_alphas) -> list[tuple[str, int, bool]]:
    """(run, seed, audit?): scenarios and their clean references first, seed by seed; then the audited runs,
    method by method (FD, FedAvg, centralized), so that a cut-short run leaves whole columns of every seed."""
    refs = {RUNS[n][4] for n in SCENARIOS}
    first = [n for n in RUNS if n in SCENARIOS or n in refs]
    audit = [f"a{a}/{m}" for m in ("fd", "fedavg") for a in mia_alphas if f"a{a}/{m}" in refs] + ["central"]
    return [(n, s, False) for s in seeds for n in first] + [(n, s, True) for n in audit for s in seeds]


def copy_clean(res: dict, path: str, base_cfg: dict, seeds) -> None:
    """Take clean runs of the same key from another benchmark's JSON (benchmarks/federated.py writes the same
    keys) instead of running them again; where both exist, remember both accuracies for the table's note."""
    other = json.loads(Path(path).read_text())
    if other.get("config", {}).get("federation") != base_cfg["federation"]:
        print(f"error: {path} was made with other federation settings; drop --clean-from", file=sys.stderr)
        raise SystemExit(2)
    check = res.setdefault("copy_check", {})
    for name in {RUNS[n][4] for n in SCENARIOS}:
        for seed in seeds:
            k = run_key(name, seed)
            theirs = other["runs"].get(k)
            if theirs is None:
                continue
            mine = res["runs"].get(k)
            if mine is None:
                res["runs"][k] = {**theirs, "copied_from": Path(path).name}
            elif "copied_from" not in mine:
                check[k] = [mine["final_accuracy"], theirs["final_accuracy"]]


def config_for(base, name: str):
    _, variant, alpha, over, _ = RUNS[name]
    over = dict(over)
    sub = {k: over.pop(k) for k in ("distill", "modules") if k in over}
    cfg = federation_for(base, variant, alpha=alpha, **over)
    dump = cfg.model_dump()
    for k, v in sub.items():
        dump[k] = {**dump[k], **v}
    return type(cfg).model_validate(dump)


def train(args, res: dict) -> None:
    import torch

    from modulemesh.config import load_config, to_dict
    from modulemesh.data.datasets import load_dataset
    from modulemesh.federated.config import FederateExperiment
    from modulemesh.federated.membership import membership_audit
    from modulemesh.federated.sim import make_fed_data, make_runner
    from modulemesh.io import atomic_write_json

    torch.set_num_threads(args.threads)
    base = load_config(FederateExperiment, args.config, [f"federation.rounds={args.rounds}", *args.set])
    res.setdefault("config", to_dict(base))
    if args.clean_from:
        copy_clean(res, args.clean_from, res["config"], args.seeds)
        res["clean_from"] = Path(args.clean_from).resolve().relative_to(ROOT).as_posix()
    ds = load_dataset(base.data.name)
    splits: dict = {}
    for name, seed, audit in jobs_for(args.seeds, args.mia_alphas):
        k = (AUDIT if audit else "") + run_key(name, seed)
        if k in res["runs"]:
            continue
        cfg = config_for(base, name)
        split = (cfg.clients, cfg.alpha, seed)
        if split not in splits:
            splits.clear()  # one split at a time in memory
            splits[split] = make_fed_data(
                ds.x_train,
                ds.y_train,
                ds.x_test,
                ds.y_test,
                cfg.clients,
                cfg.partition,
                cfg.alpha,
                cfg.distill.proxy_size,
                seed=seed,
                num_classes=ds.num_classes,
                min_size=cfg.min_client_size,
                max_train=cfg.max_train,
                max_test=cfg.max_test,
                sizes=cfg.client_sizes,
            )
        data = splits[split]
        runner = make_runner(cfg, data, seed)
        rec = run_one(cfg, data, seed, runner=runner)
        rec.update(name=name, seed=seed, alpha=cfg.alpha, clients=cfg.clients, partition=cfg.partition)
        if cfg.mode == "modules":
            rec["mesh_accuracy"] = runner.mesh_accuracy()
        if audit:
            cpu0 = cpu_seconds()
            rec.update(
                membership_audit(runner.predict, data, cfg, seed=seed, n=args.members, references=args.references)
            )
            rec["audit_cpu_seconds"] = round(cpu_seconds() - cpu0, 1)
        res["runs"][k] = rec
        audit = f"  AUC {rec['membership_auc']:.3f}" if "membership_auc" in rec else ""
        print(
            f"  {k:<34} acc {rec['final_accuracy']:.4f}  {rec['seconds']:6.1f} s  "
            f"{rec['cpu_seconds']:6.1f} CPU s{audit}",
            flush=True,
        )
        res["load"] = machine_load()
        atomic_write_json(Path(args.json), res)


def pm(xs, digits=4, sign=""):
    if len(xs) == 1:
        return f"{xs[0]:{sign}.{digits}f}"
    return f"{statistics.mean(xs):{sign}.{digits}f} +- {statistics.stdev(xs):.{digits}f}"


def scenario_table(R, seeds) -> list[str]:
    md = [
        "| scenario | alpha | accuracy | clean run (same seed) | vs clean run | sent | wall / CPU per run |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in SCENARIOS:
        label, _, alpha, _, ref = RUNS[name]
        runs = [R[run_key(name, s)] for s in seeds]
        clean = [R[run_key(ref, s)]["final_accuracy"] for s in seeds]
        acc = [r["final_accuracy"] for r in runs]
        shown = pm(acc)
        if "mesh_accuracy" in runs[0]:
            shown += " / " + pm([r["mesh_accuracy"] for r in runs])
        diff = [100 * (a - c) for a, c in zip([r.get("mesh_accuracy", r["final_accuracy"]) for r in runs], clean)]
        sent = statistics.mean(r["bytes_cumulative"][-1] for r in runs) / 1e6
        wall = statistics.mean(r["seconds"] for r in runs)
        cpu = statistics.mean(r["cpu_seconds"] for r in runs)
        md.append(
            f"| {label} | {alpha} | {shown} | {RUNS[ref][0]}: {pm(clean)} | {pm(diff, 1, '+')} pt | {sent:.1f} MB | "
            f"{wall:.0f} s / {cpu:.0f} s |"
        )
    return md


def membership_table(R, seeds, alphas) -> list[str]:
    md = [
        "| alpha | " + " | ".join(f"{v}: accuracy / AUC calibrated / AUC loss only" for v in AUDITED.values()) + " |",
        "|---|" + "---|" * len(AUDITED),
    ]
    for alpha in alphas:
        cells = []
        for m in AUDITED:
            runs = [R.get(AUDIT + run_key("central" if m == "central" else f"a{alpha}/{m}", s)) for s in seeds]
            if None in runs or any("membership_auc" not in r for r in runs):
                cells.append("not run (time)")
                continue
            cells.append(
                f"{pm([r['final_accuracy'] for r in runs])} / {pm([r['membership_auc'] for r in runs], 3)} / "
                f"{pm([r['membership_auc_uncalibrated'] for r in runs], 3)}"
            )
        md.append(f"| {alpha} | " + " | ".join(cells) + " |")
    return md


def copy_note(R, res) -> list[str]:
    copied = sorted(k for k, r in R.items() if "copied_from" in r)
    if not copied:
        return []
    # the same run made here and there: equal accuracies mean the same code and numbers
    pairs = list(res.get("copy_check", {}).values())
    pairs += [[R[AUDIT + k]["final_accuracy"], R[k]["final_accuracy"]] for k in copied if AUDIT + k in R]
    same = sum(a == b for a, b in pairs)
    return [
        "",
        f"{len(copied)} clean runs ({', '.join(copied)}) are taken from `{res['clean_from']}` "
        "(benchmarks/federated.py, "
        f"same settings and keys) instead of being run again (`--clean-from`); of the {len(pairs)} runs made both "
        f"there and here, {same} give the same final accuracy to the last digit.",
    ]


def render(res: dict) -> str:
    R, s = res["runs"], res["settings"]
    seeds = [x for x in s["seeds"] if all(run_key(n, x) in R for n in SCENARIOS + [RUNS[n][4] for n in SCENARIOS])]
    fc = res["config"]["federation"]
    test = "full 10,000-image test set" if fc.get("max_test") is None else f"{fc['max_test']:,} test images"
    total_cpu = sum(r["cpu_seconds"] + r.get("audit_cpu_seconds", 0) for r in R.values() if "copied_from" not in r)
    md = [
        f"MNIST, {fc['clients']} clients unless a row says otherwise, {fc['rounds']} rounds, MLP 200-200, "
        f"{fc['local_epochs']:g} local epoch (batch {fc['batch_size']}, SGD lr {fc['lr']}), "
        f"{fc['distill']['proxy_size']:,} held-out proxy images; partition: {PARTITION_NAME[fc['partition']]}; "
        f"{test} (the 100-client run scores each client on 500 test images, the global model on all). FD: "
        f"confidence-weighted logits (the main table's FD row). Seeds {', '.join(map(str, seeds))}, "
        f"mean +- sd; each row is compared with the clean run of the same seed, alpha and clients. "
        f"Runs: `{res['command']}` at {s['threads']} torch thread(s), {total_cpu / 60:.1f} CPU minutes in all "
        f"(runs and audits made here); {res['load']}.",
        "",
        "## Failures, poisoning, 100 clients, modules",
        "",
        "Failures: 30% of the peers vanish mid-round, a new draw each round. Poisoning: one client of 10 sends "
        f"sign-flipped weights scaled x{fc['poison_scale']:g} (FedAvg) or confidently wrong logits (FD). The modules "
        "row gives the mean peer's accuracy (its own 2 experts) and the whole mesh's, and compares the whole mesh "
        "with FedAvg. Wall and CPU seconds are the mean over seeds of one run's training (no audit).",
        "",
    ]
    md += scenario_table(R, seeds) if seeds else ["No seed has every scenario yet."]
    md += copy_note(R, res)
    # a column is shown only where every seed has its audited run; "not run" elsewhere
    mia = s["seeds"] if any(k.startswith(AUDIT) for k in R) else []
    if mia:
        audits = [r for k, r in R.items() if k.startswith(AUDIT)]
        a = audits[0]["membership_attack"]
        many, left = len(s["mia_alphas"]) > 1, [x for x in (0.1, 1.0) if x not in s["mia_alphas"]]
        audit_cpu = statistics.mean(r["audit_cpu_seconds"] for r in audits)
        md += [
            "",
            "## Membership inference on the clean runs",
            "",
            f"Calibrated attack: {a} (Carlini et al. 2022; `modulemesh.federated.membership`), the "
            "reference models trained like the audited run (same backbone, optimizer, batch size and example "
            "passes, on data without any candidate); 'loss only' is the uncalibrated confidence threshold. Members: "
            "the clients' private examples; non-members: test images. 0.5 = the attacker cannot tell them apart. "
            f"Seeds {', '.join(map(str, mia))}, mean +- sd; audited at alpha "
            f"{', '.join(map(str, s['mia_alphas']))} (`--mia-alphas`)."
            + (" The centralized run does not depend on alpha (same pooled data), so its cells repeat." if many else "")
            + (
                f" Alpha {', '.join(map(str, left))} left out to keep this benchmark within its compute budget; "
                f"`--mia-alphas {' '.join(map(str, sorted({*s['mia_alphas'], *left})))}` adds it."
                if left
                else ""
            )
            + f" One audit ({s['references']} reference models) took {audit_cpu:.0f} CPU s on average."
            + (
                " 'not run (time)': that column's audits did not finish for every seed within the session's time; "
                "rerunning the same command resumes them."
                if len(audits) < len(s["seeds"]) * (2 * len(s["mia_alphas"]) + 1)
                else ""
            ),
            "",
        ]
        md += membership_table(R, mia, s["mia_alphas"])
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "federate_mnist.yaml"))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--mia-alphas", type=float, nargs="*", default=[0.1, 1.0], help="alphas of the audited runs")
    p.add_argument("--references", type=int, default=4, help="reference models of the membership audit")
    p.add_argument("--members", type=int, default=2000, help="audited members (and as many non-members)")
    p.add_argument("--set", nargs="*", default=[], help="config overrides, KEY=VALUE (e.g. a quick check)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json", default=str(RESULTS / "federated_scenarios.json"))
    p.add_argument("--clean-from", help="take clean runs from this benchmarks/federated.py JSON (same keys)")
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args(argv)
    path = Path(args.json)
    res = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    if not args.render_only:
        fixed = {k: getattr(args, k) for k in ("rounds", "references", "members", "set")}
        fixed["config"] = Path(args.config).resolve().relative_to(ROOT).as_posix()
        if res["runs"] and any(res["settings"].get(k) != v for k, v in fixed.items()):
            print(
                f"error: {path} holds runs made with {res['settings']}, not {fixed}; "
                "pass another --json or the same settings",
                file=sys.stderr,
            )
            return 2
        res.update(settings={**fixed, "seeds": args.seeds, "mia_alphas": args.mia_alphas, "threads": args.threads})
        res["command"] = command_line(argv)
        train(args, res)
    elif not res["runs"]:
        print(f"error: {path} holds no runs; run without --render-only first", file=sys.stderr)
        return 2
    text = render(res)
    print(text)
    if Path(args.json).resolve() == (RESULTS / "federated_scenarios.json").resolve():
        publish("federated_scenarios", "Federated failures, poisoning, scale and membership inference", text, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
