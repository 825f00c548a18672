"""Issue 13's goals, measured through the command line as two users would run it.

For each seed s: five separate processes each train one Split-MNIST task (`modulemesh run --tasks t`,
seed 100 s + 10 + t, the default config: density router, 1 epoch), publish their expert to a hub
folder (signed), and a sixth user pulls all five (`--require-signed`) and composes them. The same
config trained in one sequential run (seed s) is the reference. Then task 2 (classes 4, 5) is
forgotten from the sequential mesh (`modulemesh forget`), which also retrains a mesh from scratch
without that task and runs the calibrated membership attack on the forget set.

    python benchmarks/hub.py [--seeds 0 1 2] [--out runs/hub_bench]

Writes benchmarks/results/hub.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from modulemesh.data.scenarios import as_float
from modulemesh.io import atomic_write_json
from modulemesh.mesh import ModuleMesh
from modulemesh.sharing.output import class_split
from publish import publish

FORGET = "4,5"  # task 2 of Split-MNIST 5x2


def cli(*argv) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "modulemesh.cli", *map(str, argv)], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"modulemesh {' '.join(map(str, argv))} failed:\n{done.stderr}")


def test_accuracy(mesh_dir: Path) -> float:
    mesh = ModuleMesh.load(mesh_dir).eval()
    x, y = class_split("mnist", None, range(10))
    with torch.no_grad():
        pred = torch.cat([mesh.predict(as_float(x[i : i + 4096])) for i in range(0, len(y), 4096)])
    return 100.0 * float((pred == y).float().mean())


def retain_shift(before_dir: Path, after_dir: Path) -> dict:
    """What forgetting changed on the retain set (MNIST test images of the classes kept): how many the
    mesh before put in a forgotten class, how many of those are right after, and how many right
    answers turned wrong. Each class has one expert and routing renormalizes over the experts left,
    so only the answers that were a forgotten class can change."""
    lost = torch.tensor([int(c) for c in FORGET.split(",")])
    x, y = class_split("mnist", None, [c for c in range(10) if c not in lost])
    preds = []
    for d in (before_dir, after_dir):
        mesh = ModuleMesh.load(d).eval()
        with torch.no_grad():
            preds.append(torch.cat([mesh.predict(as_float(x[i : i + 4096])) for i in range(0, len(y), 4096)]))
    before, after = preds
    was_lost = torch.isin(before, lost)
    return {
        "images": len(y),
        "predicted_forgotten_before": int(was_lost.sum()),
        "fixed": int((was_lost & (after == y)).sum()),
        "broken": int(((before == y) & (after != y)).sum()),
        "other_changes": int((~was_lost & (before != after)).sum()),
    }


def same_bytes(a: Path, b: Path) -> bool:
    return all(
        (a / p.relative_to(a)).read_bytes() == (b / p.relative_to(a)).read_bytes() for p in a.rglob("*") if p.is_file()
    )


def one_seed(seed: int, root: Path) -> dict:
    hub, d = root / "hub", root / f"seed{seed}"
    shutil.rmtree(d, ignore_errors=True)
    for who in ("alice", "bob"):
        if not (root / f"{who}.key").exists():
            cli("hub", "keygen", root / f"{who}.key")
    trusted = root / "trusted_keys"
    trusted.write_text((root / "alice.key.pub").read_text() + (root / "bob.key.pub").read_text())
    procs = []
    for t in range(5):  # five separate processes, two at a time (the machine has two cores)
        argv = [
            "run",
            "--quiet",
            "--tasks",
            t,
            "--seed",
            100 * seed + 10 + t,
            "--device",
            "cpu",
            "--out",
            d / f"task{t}",
        ]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "modulemesh.cli", *map(str, argv)],
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                stdout=subprocess.DEVNULL,
            )
        )
        if len(procs) == 2 or t == 4:
            if any(p.wait() != 0 for p in procs):
                raise SystemExit("a task process failed")
            procs = []
    for t in range(5):
        signer = "alice" if t < 3 else "bob"
        cli(
            "hub",
            "publish",
            d / f"task{t}" / "mesh" / "experts" / "expert0.json",
            hub,
            "--name",
            f"s{seed}-task{t}",
            "--sign",
            root / f"{signer}.key",
        )
        cli(
            "hub",
            "pull",
            f"s{seed}-task{t}",
            hub,
            "--out",
            d / "pulled" / f"task{t}",
            "--require-signed",
            "--trusted-keys",
            trusted,
        )
    identical = all(same_bytes(d / f"task{t}" / "mesh" / "experts", d / "pulled" / f"task{t}") for t in range(5))
    cli("compose", *(d / "pulled" / f"task{t}" / "expert0.json" for t in range(5)), "--out", d / "composed")
    cli("run", "--quiet", "--seed", seed, "--device", "cpu", "--out", d / "sequential")
    cli("forget", d / "sequential" / "mesh", "--classes", FORGET, "--out", d / "forgotten")
    forget = json.loads((d / "forgotten" / "forget.json").read_text())
    return {
        "composed": test_accuracy(d / "composed"),
        "sequential": test_accuracy(d / "sequential" / "mesh"),
        "bit_identical": identical,
        "forget": forget,
        "retain_shift": retain_shift(d / "sequential" / "mesh", d / "forgotten"),
    }


def mean_std(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(runs: dict[int, dict]) -> str:
    r = list(runs.values())
    comp, seq = [x["composed"] for x in r], [x["sequential"] for x in r]
    gap = [a - b for a, b in zip(comp, seq)]
    worst_gap = max(abs(g) for g in gap)
    ev = [x["forget"]["evaluation"] for x in r]
    col = {k: [e[k] for e in ev] for k in ("before", "after forgetting", "retrained from scratch")}
    forget_s = [x["forget"]["forget_time_s"] for x in r]
    retrain_s = [x["forget"]["retrain_time_s"] for x in r]
    speed = [x["forget"]["speedup"] for x in r]
    f_gap = max(
        a["forget_accuracy"] - b["forget_accuracy"]
        for a, b in zip(col["after forgetting"], col["retrained from scratch"])
    )
    r_change = [a["retain_accuracy"] - b["retain_accuracy"] for a, b in zip(col["after forgetting"], col["before"])]
    r_gap = max(abs(c) for c in r_change)
    r_drop = max(0.0, -min(r_change))
    shift = [x["retain_shift"] for x in r]
    m_gap = max(
        abs(a["forget_mia_auc"] - b["forget_mia_auc"])
        for a, b in zip(col["after forgetting"], col["retrained from scratch"])
    )
    ok = lambda c: "met" if c else "**not met**"  # noqa: E731
    lines = [
        "Split-MNIST 5x2 class-IL, default config (MLP 784-20-20 experts, density router, 1 epoch), "
        f"seeds {list(runs)}; accuracy on the full MNIST test set (10,000 images, all 10 classes). "
        "Mean ± std over seeds.",
        "",
        "## Goals (issue 13)",
        "",
        "| goal | measured | |",
        "|---|---|---|",
        f"| composed within 0.5 pt of sequential | largest gap {worst_gap:.2f} pt | {ok(worst_gap <= 0.5)} |",
        f"| forget-set acc <= retrained + 1 | largest excess {f_gap:.2f} pt | {ok(f_gap <= 1)} |",
        f"| retain-set acc at most 0.5 below before | largest drop {r_drop:.2f} pt | {ok(r_drop <= 0.5)} |",
        f"| retain-set acc within ±0.5 of before (read literally) | after - before: "
        f"{', '.join(f'{c:+.2f}' for c in r_change)} pt | {ok(r_gap <= 0.5)}: it rose (see below) |",
        f"| forget-set MIA AUC within 0.02 of retrained | largest gap {m_gap:.3f} | {ok(m_gap <= 0.02)} |",
        f"| forgetting >= 100x faster than retraining | smallest speed-up {min(speed):.0f}x | "
        f"{ok(min(speed) >= 100)} |",
        f"| publish/pull round trip bit-identical | {sum(x['bit_identical'] for x in r)}/{len(r)} seeds | "
        f"{ok(all(x['bit_identical'] for x in r))} |",
        "",
        "## Composition",
        "",
        "| mesh | test accuracy (%) |",
        "|---|---|",
        f"| one sequential run (5 tasks) | {mean_std(seq)} |",
        f"| 5 experts trained in 5 processes, published, pulled, composed | {mean_std(comp)} |",
        f"| composed - sequential (pt) | {mean_std(gap)} |",
        "",
        f"## Forgetting task 2 (classes {FORGET})",
        "",
        "| mesh | forget-set acc (%) | retain-set acc (%) | forget-set MIA AUC | time (s) |",
        "|---|---|---|---|---|",
    ]
    times = {"before": None, "after forgetting": forget_s, "retrained from scratch": retrain_s}
    for label, rows in col.items():
        t = "" if times[label] is None else mean_std(times[label], 3)
        accs = [mean_std([x[k] for x in rows]) for k in ("forget_accuracy", "retain_accuracy")]
        lines.append(f"| {label} | {accs[0]} | {accs[1]} | {mean_std([x['forget_mia_auc'] for x in rows], 3)} | {t} |")
    attack = ev[0]["attack"]
    fixed = ", ".join(f"{x['fixed']} of {x['predicted_forgotten_before']}" for x in shift)
    lines += [
        "",
        f"Why the retain-set accuracy rises: of the {shift[0]['images']} retain-set test images, the mesh before "
        f"forgetting answered {', '.join(str(x['predicted_forgotten_before']) for x in shift)} (per seed) with a "
        f"class of task 2 ({FORGET}), always wrongly, since none of them is a 4 or a 5. Each class has one expert and "
        "the routing weights renormalize over the experts left, so removing the task-2 expert changes only those "
        f"answers ({', '.join(str(x['other_changes']) for x in shift)} other answers changed); {fixed} of them are "
        f"right afterwards, and {', '.join(str(x['broken']) for x in shift)} right answers turned wrong. The rise is "
        "those images: an expert that no longer exists can no longer attract them. The mesh retrained from scratch "
        "without the task scores the same on the retain set, so forgetting lands where never having learned the "
        'task lands. Read as "does not hurt what is kept", the goal is met; read as |after - before| <= 0.5, '
        "it is not, and the cause is this upward shift.",
        "",
        f"Membership attack: offline LiRA with {attack['reference_models']} reference models (the experts' "
        f"architecture over all classes, trained on {attack['reference_examples']} validation images each), "
        f"{attack['members']} forget-set training images (members) against as many forget-class test images. "
        "Forgetting time: removing the expert and its router state and saving the mesh; retraining: the whole "
        "`modulemesh run` of the four remaining tasks.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/hub_bench")
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    runs = {}
    for s in args.seeds:
        done = root / f"seed{s}" / "result.json"  # a finished seed is reused when the script is rerun
        runs[s] = json.loads(done.read_text()) if done.exists() else one_seed(s, root)
        atomic_write_json(done, runs[s])
        print(s, {k: v for k, v in runs[s].items() if k != "forget"}, flush=True)
    publish("hub", "Sharing modules: compose experts trained apart, forget a task", report(runs))


if __name__ == "__main__":
    main()
