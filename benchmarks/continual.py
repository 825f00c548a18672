"""The issue's standard continual-learning benchmarks through the library's compare machinery.

    python benchmarks/continual.py [--seeds 3] [--jobs 2] [--out runs/benchmarks/continual]
    python benchmarks/continual.py --quick          # Split-Digits smoke run, one seed, seconds
    python benchmarks/continual.py --sections task_il_500 --modulemesh-seeds 3 --jobs 1 \
        --md benchmarks/results/continual_task_il.md   # one section into its own files
    python benchmarks/continual.py --sections fashion --other-seeds 3 --arms er,der   # only these arms;
        # the section's other rows are kept from the markdown's JSON, each naming its command

Sections (each a group of arms = strategy + overrides, planned with ``modulemesh compare``'s
``plan_runs`` and trained by ``modulemesh.sweep.execute``, so every run is exactly what
``modulemesh compare`` would train and lands in ``OUT/<section>/<arm>/seed<k>/``):

- Split-MNIST class-IL, buffer 500 and 200 (every strategy; ModuleMesh with the density router and
  small experts, plus the learned top-1 gate trained on replay as an ablation);
- Split-MNIST task-IL, buffer 500 (plus ModuleMesh with one small-CNN expert per task and the
  oracle router: the arm for the issue's 99.5% task-IL goal); Permuted-MNIST (domain-IL, a
  subsample per task); Split-Fashion-MNIST.

A finished run (same resolved config, ``metrics.json`` present) is read back, not rerun, so an
interrupted benchmark continues where it stopped. The markdown (``--md``, default
``benchmarks/results/continual.md``) and its JSON twin are rewritten atomically after every
section, so a partial run still leaves readable tables. The arms are defined in ``continual_arms.py``,
the tables rendered by ``continual_report.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from continual_arms import MM_CNN_ORACLE, MM_DENSITY, MM_GATE, Arm, Section, baseline_arms, config_arms, tuned_arms
from continual_report import TUNING_MD_FASHION, TUNING_MD_PERMUTED, TUNING_MD_TASK_IL, keep_rows, summarize, write
from modulemesh.sweep import execute as sweep_execute
from modulemesh.sweep import plan_runs, split_finished

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


# The continual table's Permuted ModuleMesh arms: the block's experts (skip head, refit head) at 784-20-20, kept
# fp32, at lr 0.1 / batch 32 as their rows were run; the block itself (125-125 int4 experts within DER++'s bytes)
# is benchmarks/routing.py's row.
PM_MESH = [
    "expert.backbone={type: mlp, hidden: [20, 20]}",
    "expert.storage=fp32",
    "router.state_dtype=float16",
    "train.lr=0.1",
    "train.batch_size=32",
]


def sections(args) -> list[Section]:
    s, few = args.seeds, args.other_seeds
    if args.quick:
        cfg = str(CONFIGS / "split_digits.yaml")
        return [
            Section("digits_class_il", "Split-Digits class-IL (quick smoke run)", cfg, [], baseline_arms(), 1, 200),
            Section(
                "digits_task_il",
                "Split-Digits task-IL (quick smoke run)",
                cfg,
                ["scenario.kind=task_incremental"],
                [Arm("finetune", "finetune"), Arm("er", "er"), Arm("modulemesh (density)", "modulemesh", MM_DENSITY)],
                1,
                200,
            ),
        ]
    # Every buffer-200 arm is trained (the buffer-500 runs now carry tuned settings, so none is shared).
    arms200 = baseline_arms(mammoth=200)
    pm_sub = args.permuted_train
    return [
        Section(
            "class_il_500",
            "Split-MNIST 5x2, class-IL, buffer 500",
            str(CONFIGS / "split_mnist_class_il.yaml"),
            [],  # the config's own buffer (500) and per_strategy blocks: what `modulemesh compare` runs
            tuned_arms(),
            s,
            500,
            tuned=True,
        ),
        Section(
            "class_il_200",
            "Split-MNIST 5x2, class-IL, buffer 200",
            str(CONFIGS / "split_mnist_class_il.yaml"),
            ["strategy.buffer_size=200"],
            arms200,
            args.seeds_200 or s,
            200,
        ),
        Section(
            "task_il_500",
            "Split-MNIST 5x2, task-IL, buffer 500",
            str(CONFIGS / "split_mnist_task_il.yaml"),
            ["strategy.buffer_size=500"],
            [
                a
                for a in config_arms(f"lr / batch chosen on validation ({TUNING_MD_TASK_IL})")
                if a.strategy != "modulemesh"
            ]
            + [
                Arm("modulemesh (density)", "modulemesh", MM_DENSITY, note="headline config"),
                Arm("modulemesh (top-1 gate + replay)", "modulemesh", MM_GATE, note="ablation"),
                Arm(
                    "modulemesh (oracle router)",
                    "modulemesh",
                    MM_DENSITY[:1] + ["router.type=oracle"] + MM_DENSITY[3:],
                    note="the task id picks the expert",
                ),
                Arm(
                    "modulemesh (oracle router, CNN experts)",
                    "modulemesh",
                    MM_CNN_ORACLE,
                    note="one conv 16-32-32 + FC 64 expert per task (32,834 params each, 1.83x the MLP in all); "
                    "the config's shared batch 10 / lr 0.03",
                ),
            ],
            few,
            500,
        ),
        Section(
            "permuted",
            f"Permuted-MNIST, domain-IL, 10 tasks, {pm_sub:,} training images per task, buffer 500",
            str(CONFIGS / "permuted_mnist.yaml"),
            ["strategy.buffer_size=500", f"scenario.max_train_per_task={pm_sub}"],
            [
                Arm(s, s, note=f"lr / batch chosen on validation ({TUNING_MD_PERMUTED})")
                for s in ("finetune", "joint", "ewc", "si", "lwf", "er", "der", "derpp")
            ]
            + [
                Arm(
                    "modulemesh (density)",
                    "modulemesh",
                    [*PM_MESH, "router.type=density", "router.components=10"],
                ),
                Arm(
                    "modulemesh (top-1 gate + replay)",
                    "modulemesh",
                    [*PM_MESH, "router.type=topk", "router.components=2"],
                ),
            ],
            few,
            500,
            caption=f"Subsampled: {pm_sub:,} of the ~54,000 training images per task (the full test set), to fit "
            "a shared CPU. "
            "The baselines' lr and batch size were chosen on the validation split of the first seed among lr "
            f"0.03 / 0.2 x batch 32 / 128 ({TUNING_MD_PERMUTED}; Mammoth's perm-mnist setting is lr 0.2, batch 128) "
            "and written into the config's per_strategy blocks. ModuleMesh adds one 784-20-20-10 expert per "
            "permutation (10 experts; the 2x size limit of the issue is for Split-MNIST only), with the train settings "
            "of the config's per_strategy.modulemesh block (not tuned).",
        ),
        Section(
            "fashion",
            "Split-Fashion-MNIST 5x2, class-IL, buffer 500",
            str(CONFIGS / "split_fashion_mnist.yaml"),
            [],  # the config's own buffer (500) and per_strategy blocks: what `modulemesh compare` runs
            config_arms(f"lr / batch chosen on validation ({TUNING_MD_FASHION})"),
            few,
            500,
        ),
    ]


# ---------------------------------------------------------------- running


def plan(
    section: Section, out: Path, modulemesh_seeds: int = 0, only: set[str] = frozenset()
) -> list[tuple[str, int, object, Path]]:
    runs = []
    for arm in section.arms:
        if only and arm.strategy not in only:
            continue
        seeds = arm.seeds or (modulemesh_seeds if modulemesh_seeds and arm.strategy == "modulemesh" else section.seeds)
        cfgs = plan_runs(section.config, section.overrides + arm.overrides, [arm.strategy], seeds, "cpu")
        for strategy, seed, cfg in cfgs:
            runs.append((arm.label, seed, cfg, out / section.key / slug(arm.label) / f"seed{seed}"))
    return runs


def train_settings(runs) -> dict[str, str]:
    """arm -> 'lr / batch' of its planned runs (read from the resolved configs, not typed)."""
    return {label: f"{cfg.train.lr:g} / {cfg.train.batch_size}" for label, _, cfg, _ in runs}


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_").replace("__", "_")


def execute(runs, jobs: int, log) -> dict[tuple[str, int], dict]:
    results, todo = split_finished([((label, seed), cfg, path) for label, seed, cfg, path in runs])
    if len(todo) < len(runs):
        log(f"  {len(runs) - len(todo)} of {len(runs)} runs already finished; reading them back")

    def done(key, m):
        results[key] = m
        log(f"  {key[0]} seed {key[1]}: {m['average_accuracy']:.2f}% ({m['wall_time_s']:.0f} s)")

    def failed(key, e):  # a diverged run is a result too: reported, not fatal
        results[key] = {"failed": f"{type(e).__name__}: {e}"}
        log(f"  {key[0]} seed {key[1]}: FAILED {e}")

    sweep_execute(todo, jobs, done, on_error=failed, threads=1)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="seeds for Split-MNIST class-IL (buffer 500 and 200)")
    ap.add_argument("--seeds-200", type=int, default=0, help="seeds for class-IL buffer 200 (default: --seeds)")
    ap.add_argument("--other-seeds", type=int, default=1, help="seeds for task-IL, Permuted-MNIST, Split-Fashion-MNIST")
    ap.add_argument("--permuted-train", type=int, default=10000, help="training images per Permuted-MNIST task")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (at most 2 on the shared machine)")
    ap.add_argument("--quick", action="store_true", help="Split-Digits smoke run (one seed)")
    ap.add_argument(
        "--only",
        "--sections",
        dest="only",
        default="",
        help="comma-separated section keys to run (default: all): class_il_500, class_il_200, task_il_500, "
        "permuted, fashion (--quick: digits_class_il, digits_task_il)",
    )
    ap.add_argument(
        "--modulemesh-seeds", type=int, default=0, help="seeds for every ModuleMesh arm (default: its section's seeds)"
    )
    ap.add_argument(
        "--arms",
        default="",
        help="comma-separated strategies: train only their arms in the chosen sections and keep the other arms' "
        "rows from the markdown's JSON (each kept row names the command that computed it)",
    )
    ap.add_argument("--out", default="runs/benchmarks/continual", help="run directories")
    ap.add_argument(
        "--md",
        default=None,
        help="markdown output (default benchmarks/results/continual.md; --quick: OUT/continual.md)",
    )
    ap.add_argument(
        "--render-from",
        metavar="JSON",
        help="rewrite the markdown (and its notes) from a finished run's JSON without training anything",
    )
    args = ap.parse_args()
    if args.render_from:
        return render_from(Path(args.render_from), ap)
    out = Path(args.out)
    default_md = out / "continual.md" if args.quick else ROOT / "benchmarks" / "results" / "continual.md"
    md = Path(args.md) if args.md else default_md
    secs = sections(args)
    if args.only:
        keep = set(args.only.split(","))
        unknown = keep - {s.key for s in secs}
        if unknown:
            ap.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(s.key for s in secs)}")
        secs = [s for s in secs if s.key in keep]
    start = time.perf_counter()
    all_rows: dict[str, list[dict]] = {}
    commands: dict[str, list[str]] = {s.key: sys.argv for s in secs}
    shown = list(secs)
    saved = json.loads(md.with_suffix(".json").read_text()) if md.with_suffix(".json").exists() else None
    only_arms = set(filter(None, args.arms.split(",")))
    if only_arms and not (saved and all(s.key in saved["sections"] for s in secs)):
        ap.error(
            f"--arms keeps the other arms' rows from {md.with_suffix('.json')}, which lacks a chosen section; "
            "run the whole section once first"
        )
    if args.only and saved:  # keep the sections this invocation does not run
        for key, sec in saved["sections"].items():
            if key not in commands:
                cmd = sec.get("command") or saved["command"]
                shown.append(section_defs(ap, cmd)[key])
                all_rows[key], commands[key] = sec["rows"], cmd
        order = [s.key for s in sections(args)]
        shown.sort(key=lambda s: order.index(s.key) if s.key in order else len(order))

    def log(msg):
        print(f"[{time.perf_counter() - start:6.0f} s] {msg}", flush=True)

    for sec in secs:
        log(f"{sec.title}")
        runs = plan(sec, out, args.modulemesh_seeds, only_arms)
        results = execute(runs, args.jobs, log)
        all_rows[sec.key] = summarize(sec, results, train_settings(runs))
        if only_arms:
            all_rows[sec.key] = keep_rows(sec, all_rows[sec.key], saved, only_arms)
        write(md, shown, all_rows, commands, args, time.perf_counter() - start, done=False)
    write(md, shown, all_rows, commands, args, time.perf_counter() - start, done=True)
    print(md.read_text())
    return 0


def section_defs(ap: argparse.ArgumentParser, command: list[str]) -> dict[str, Section]:
    """The sections as the given command line defined them (titles and captions depend on its options)."""
    return {sec.key: sec for sec in sections(ap.parse_args(command[1:]))}


def render_from(path: Path, ap: argparse.ArgumentParser) -> int:
    """Re-render a finished run's markdown from its JSON, each section under the command that produced it."""
    saved = json.loads(path.read_text())
    sys.argv = list(saved["command"])
    args = ap.parse_args(sys.argv[1:])
    commands = {k: v.get("command") or saved["command"] for k, v in saved["sections"].items()}
    order = [sec.key for sec in sections(args)]
    keys = sorted(saved["sections"], key=lambda k: order.index(k) if k in order else len(order))
    secs = [section_defs(ap, commands[k])[k] for k in keys]
    all_rows = {k: v["rows"] for k, v in saved["sections"].items()}
    md = Path(args.md) if args.md else path.with_suffix(".md")
    write(md, secs, all_rows, commands, args, saved["elapsed_s"], done=saved["complete"])
    print(f"re-rendered {md} from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
