"""Issue 12's goals: routing that makes the experts count, against the router alone and DER++.

    python benchmarks/routing.py [--seeds 3] [--section-seeds fashion=1] [--sections mnist,fashion,permuted,transfer]

Every arm is ``modulemesh compare CONFIG --strategies ARMS`` on a shipped config, whose ``per_strategy`` blocks
hold each strategy's settings (ModuleMesh's density size was chosen on the validation split by
``benchmarks/routing_select.py``, its experts, rejection buffer and weights by ``benchmarks/routing_variants.py``,
its stored precision, density size and buffer within DER++'s bytes by ``benchmarks/routing_bytes.py``);
the same seeds in every row. Sections:

- mnist / fashion: Split-MNIST and Split-Fashion-MNIST class-IL (5x2, 1 epoch per task): modulemesh,
  router-only, ncm, derpp (buffer 500);
- permuted: Permuted-MNIST (domain-IL, 10 tasks, 10,000 training images per task): modulemesh, derpp;
- transfer: a small CNN (conv 16-32, FC 64) trained on 20,000 MNIST images (all classes, 1 epoch) as
  ``router.features`` for Split-Fashion-MNIST, and the reverse; modulemesh and router-only in that feature
  space (compare router-only on pixels above).

A finished run (same resolved config) is read back, not rerun. Writes benchmarks/results/routing.md
(rewritten after every section, so a partial run leaves readable tables).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from modulemesh.io import atomic_write_text
from modulemesh.runner import run_experiment
from modulemesh.sweep import finished_metrics, plan_runs
from modulemesh.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ARMS = ["modulemesh", "router-only", "ncm", "derpp"]
# Permuted-MNIST's second ModuleMesh row: int8 experts as wide as DER++'s model, with its own grid's lr / batch.
PERMUTED_100 = [
    "modulemesh.expert.backbone.hidden=[100,100]",
    "modulemesh.expert.storage=int8",
    "modulemesh.train.lr=0.2",
    "modulemesh.train.batch_size=32",
]
SECTIONS = {
    "mnist": ("Split-MNIST 5x2, class-IL", "split_mnist_class_il.yaml", ARMS, []),
    "fashion": ("Split-Fashion-MNIST 5x2, class-IL", "split_fashion_mnist.yaml", ARMS, []),
    "permuted": (
        "Permuted-MNIST, domain-IL, 10 tasks, 10,000 training images per task",
        "permuted_mnist.yaml",
        # The shipped block fits DER++'s bytes (784-125-125 skip-head int4 experts); the second row keeps int8
        # experts as wide as DER++'s model (the most accurate point of the earlier int8 grid,
        # routing_bytes_permuted_mnist.md), at the lr / batch its own validation grid chose
        # (routing_tuning_permuted_mnist_100x100.md).
        ["modulemesh", ("modulemesh-100-100", "modulemesh", PERMUTED_100), "derpp"],
        ["scenario.max_train_per_task=10000"],
    ),
}
PRETRAIN = [
    "strategy.name=joint",
    "scenario.n_tasks=1",
    "expert.backbone={type: cnn, channels: [16, 32], hidden: 64}",
    "scenario.max_train_per_task=20000",
    "train.batch_size=32",
    "train.lr=0.1",
    "seed=0",
]
TRANSFER = {  # name -> (title, target config, pretraining data set)
    "fashion_from_mnist": (
        "Split-Fashion-MNIST in the features of a CNN trained on MNIST",
        "split_fashion_mnist.yaml",
        "mnist",
    ),
    "mnist_from_fashion": (
        "Split-MNIST in the features of a CNN trained on Fashion-MNIST",
        "split_mnist_class_il.yaml",
        "fashion_mnist",
    ),
}


def run_arms(config: Path, arms: list, overrides: list[str], seeds: int, out: Path) -> dict[str, list[dict]]:
    """Each arm is a strategy name, or (row name, strategy, its own overrides): the same strategy a second
    time under other settings, in its own row and run directory."""
    results: dict[str, list[dict]] = {}
    for arm in arms:
        name, strategy, extra = arm if isinstance(arm, tuple) else (arm, arm, [])
        for _, seed, cfg in plan_runs(str(config), [*overrides, *extra], [strategy], seeds, "cpu"):
            where = out / name / f"seed{seed}"
            m = finished_metrics(where, cfg) or run_experiment(cfg, where)
            results.setdefault(name, []).append({**m, "kept_as": kept_as(strategy, cfg)})
            print(f"{config.name} {name} seed {seed}: {m['average_accuracy']:.2f}", flush=True)
    return results


def kept_as(arm: str, cfg) -> str:
    """What a method's bytes are made of, in words: methods differ in what they keep and in what precision."""
    r, n = cfg.router, cfg.strategy.buffer_size
    density = f"densities {r.clusters}x{r.components} {r.state_dtype}"
    if arm == "modulemesh":
        buffer = f", {n} uint8 images" if getattr(cfg.strategy, "reject_weight", 0) else ""
        b = cfg.expert.backbone
        width = "MLP " + "-".join(map(str, b["hidden"])) + " " if b.get("type") == "mlp" else ""  # rows differ in it
        return f"experts {width}{cfg.expert.storage} (frozen), {density}{buffer}"
    if arm == "router-only":
        return density
    if arm == "ncm":
        return "class means fp32"
    if arm in ("der", "derpp"):
        return f"model fp32 (trains every task), {n} uint8 images + fp32 logits"
    return "model fp32"


def _ms(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def table(results: dict[str, list[dict]]) -> str:
    rows = []
    for arm, ms in results.items():
        rows.append(
            {
                "method": arm,
                "seeds": len(ms),
                "avg acc (%)": _ms([m["average_accuracy"] for m in ms]),
                "forgetting (%)": _ms([m["forgetting"] for m in ms]),
                "task-id acc (%)": _ms([m["task_id_accuracy"] for m in ms]),
                "within-expert acc (%)": _ms([m["within_expert_accuracy"] for m in ms]),
                "bytes kept": f"{statistics.mean(m['total_bytes'] for m in ms):,.0f}",
                "kept as": ms[0]["kept_as"],
                "train time (s)": _ms([m["train_time_s"] for m in ms]),
            }
        )
    return markdown_table(rows, right=[k for k in rows[0] if k not in ("method", "kept as")])


def mean(results, arm, key):
    return statistics.mean(m[key] for m in results[arm]) if arm in results else float("nan")


def goals(done: dict[str, dict[str, list[dict]]]) -> list[str]:
    lines = []

    def verdict(ok):
        return "**met**" if ok else "**not met**"

    if "mnist" in done:
        r = done["mnist"]
        acc, ro, fg = (
            mean(r, "modulemesh", "average_accuracy"),
            mean(r, "router-only", "average_accuracy"),
            mean(r, "modulemesh", "forgetting"),
        )
        b, bd = mean(r, "modulemesh", "total_bytes"), mean(r, "derpp", "total_bytes")
        lines += [
            f"- Split-MNIST class-IL: ModuleMesh {acc:.2f}% (goal >= 96.5: {verdict(acc >= 96.5)}), "
            f"{acc - ro:+.2f} points vs router-only {ro:.2f}% (goal >= +1.5: {verdict(acc - ro >= 1.5)}), "
            f"forgetting {fg:.2f}% (goal <= 3: {verdict(fg <= 3)}).",
            f"- Bytes on Split-MNIST: ModuleMesh {b:,.0f} vs DER++ (buffer 500) {bd:,.0f} "
            f"(goal <=: {verdict(b <= bd)}).",
        ]
    if "fashion" in done:
        r = done["fashion"]
        acc, ro = mean(r, "modulemesh", "average_accuracy"), mean(r, "router-only", "average_accuracy")
        b, bd = mean(r, "modulemesh", "total_bytes"), mean(r, "derpp", "total_bytes")
        lines += [
            f"- Split-Fashion-MNIST class-IL: ModuleMesh {acc:.2f}% (goal >= 84: {verdict(acc >= 84)}), "
            f"{acc - ro:+.2f} points vs router-only {ro:.2f}% (goal >= +1.5: {verdict(acc - ro >= 1.5)}).",
            f"- Bytes on Split-Fashion-MNIST: ModuleMesh {b:,.0f} vs DER++ (buffer 500) {bd:,.0f} "
            f"(goal <=: {verdict(b <= bd)}).",
        ]
    if "permuted" in done:
        r = done["permuted"]
        bd = mean(r, "derpp", "total_bytes")
        for arm in [a for a in r if a.startswith("modulemesh")]:  # the shipped block, then any second row
            acc, b = mean(r, arm, "average_accuracy"), mean(r, arm, "total_bytes")
            name = "ModuleMesh" if arm == "modulemesh" else f"ModuleMesh ({arm})"
            lines.append(
                f"- Permuted-MNIST, 10 tasks: {name} {acc:.2f}% (goal >= 93: {verdict(acc >= 93)}); "
                f"bytes {b:,.0f} vs DER++ {bd:,.0f} ({verdict(b <= bd)})."
            )
    return lines


def wall_note(seconds: float) -> str:
    # A render that only reads finished runs back took no training time; say so rather than "0 min".
    if seconds < 60:
        return "every run read back from earlier runs of this command; each row's train time is its own"
    return f"{seconds / 60:.0f} min for the runs not read back"


def write(done, titles, args, started) -> None:
    extra = f" --section-seeds {args.section_seeds}" if args.section_seeds else ""
    head = (
        "# Routing benchmarks (issue 12)\n\n"
        f"Written by `python benchmarks/routing.py --seeds {args.seeds}{extra} --sections "
        f"{args.sections}` ({platform.machine()} CPU, torch {torch.__version__}, one thread, "
        f"{wall_note(time.time() - started)}). Mean ± sample std over the seeds in "
        "each table's 'seeds' column (0, 1, ...; the same seeds in every row of a table). "
        "Task-id accuracy: share of test inputs whose top expert "
        "owns their task (for router-only/ncm: whose predicted class is in their task); within-expert accuracy: "
        "each task's expert alone on its task; bytes kept: parameters + router state + replay buffer/logits/means.\n"
    )
    body = ["## Goals", "", *goals(done), ""]
    for key, results in done.items():
        body += [f"## {titles[key]}", "", table(results)]
    results = ROOT / "benchmarks" / "results"
    # How ModuleMesh's settings were chosen, on validation (each script's own file).
    bytes_tables = sorted(p.name for p in results.glob("routing_bytes_*.md"))  # routing_bytes.py, one per config
    for name in ["routing_variants.md", *bytes_tables]:
        if (results / name).exists():
            title, *lines = (results / name).read_text().splitlines()  # each file's own title, one level down
            body += ["#" + title, *["#" + ln if ln.startswith("## ") else ln for ln in lines]]
    atomic_write_text(ROOT / "benchmarks" / "results" / "routing.md", head + "\n" + "\n".join(body))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--section-seeds", default="", help="fewer seeds for some sections, e.g. fashion=1,permuted=1")
    ap.add_argument("--sections", default="mnist,fashion,permuted,transfer")
    ap.add_argument("--out", default="runs/benchmarks/routing")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out, started = Path(args.out), time.time()
    known = [*SECTIONS, "transfer"]
    pairs = [p.partition("=") for p in args.section_seeds.split(",") if p]
    # Checked before anything trains: a typo found after an hour's sections would waste them.
    if bad := [k for k in args.sections.split(",") if k not in known] + [k for k, _, _ in pairs if k not in known]:
        print(f"unknown section {bad[0]!r}; choose from {', '.join(known)}", file=sys.stderr)
        return 2
    if bad := [f"{k}={v}" for k, _, v in pairs if not v.isdigit() or int(v) < 1]:
        print(f"--section-seeds {bad[0]!r}: give SECTION=N with N >= 1, e.g. fashion=1", file=sys.stderr)
        return 2
    section_seeds = {k: int(v) for k, _, v in pairs}
    done, titles = {}, {}
    for key in args.sections.split(","):
        if key in SECTIONS:
            title, config, arms, overrides = SECTIONS[key]
            titles[key] = title
            done[key] = run_arms(CONFIGS / config, arms, overrides, section_seeds.get(key, args.seeds), out / key)
        elif key == "transfer":
            for name, (title, config, source) in TRANSFER.items():
                (pre_cfg,) = [
                    c
                    for _, _, c in plan_runs(
                        str(CONFIGS / config), [*PRETRAIN, f"data.name={source}"], ["joint"], 1, "cpu"
                    )
                ]
                pre = out / "pretrain" / source
                finished_metrics(pre, pre_cfg) or run_experiment(pre_cfg, pre)
                titles[name] = title
                done[name] = run_arms(
                    CONFIGS / config,
                    ["modulemesh", "router-only"],
                    [f"router.features={pre / 'mesh'}"],
                    section_seeds.get("transfer", args.seeds),
                    out / name,
                )
        write(done, titles, args, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
