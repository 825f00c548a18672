"""The continual benchmark's tables, goals and notes: rows from run metrics, markdown and its JSON twin.

Everything printed is computed from the runs' metrics (or from the JSON a run wrote); ``continual.py``
plans and trains, this file renders.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
from pathlib import Path

import torch

from modulemesh.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]

# Buzzega et al. 2020, "Dark Experience for General Continual Learning: a Strong, Simple Baseline"
# (NeurIPS 2020), Table 2, Split-MNIST (S-MNIST), class-IL, MLP 784-100-100-10, 1 epoch per task.
REFERENCE_SOURCE = "Buzzega et al. 2020 (DER), Table 2, S-MNIST class-IL"
REFERENCES = {  # arm -> {buffer: accuracy}; None = any buffer (the method keeps no buffer)
    "joint": {None: "95.6"},
    "ewc": {None: "≈ 20 (oEWC)"},
    "si": {None: "≈ 20"},
    "lwf": {None: "≈ 20"},
    "er": {200: "80.4", 500: "86.1"},
    "der": {200: "84.6", 500: "90.5"},
    "derpp": {200: "85.6", 500: "91.0"},
}

JOINT_NOTE = (
    "joint retrains on tasks 0..t at every step. With batch 10 the final union has 54,001 rows, so its last minibatch "
    "was one row: the loop's mean loss gave that single example the weight of a whole batch, and that one "
    "SGD step undid much of the epoch on seed 0 (tests/test_training_loop.py checks the folding). The training "
    "loop now folds a trailing minibatch smaller than half a batch into the one before it; joint here runs with "
    "batch 32 / lr 0.1 (Mammoth's lr/batch ratio) where it is not tuned (buffer 200)."
)


TUNING_MD = "benchmarks/results/continual_tuning_class_il.md"
TUNING_MD_FASHION = "benchmarks/results/continual_tuning_fashion.md"
TUNING_MD_TASK_IL = "benchmarks/results/continual_tuning_task_il.md"
TUNING_MD_PERMUTED = "benchmarks/results/continual_tuning_permuted.md"

# ---------------------------------------------------------------- tables


def mean_std(values: list[float], digits: int = 1) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarize(section, results, settings: dict[str, str] | None = None) -> list[dict]:
    settings = settings or {}
    rows = []
    for arm in section.arms:
        ms = [results[k] for k in sorted(results) if k[0] == arm.label]
        failed = [m["failed"] for m in ms if "failed" in m]
        ms = [m for m in ms if "failed" not in m]
        if failed and not ms:
            rows.append(
                {
                    "arm": arm.label,
                    "strategy": arm.strategy,
                    "overrides": arm.overrides,
                    "failed": failed,
                    "note": f"all {len(failed)} run(s) failed: {failed[0]}",
                }
            )
            continue
        if not ms:
            continue
        if failed:
            arm.note = (arm.note + "; " if arm.note else "") + f"{len(failed)} run(s) failed: {failed[0]}"
        ref = REFERENCES.get(arm.label, {})
        ref_text = ref.get(section.buffer, ref.get(None, "")) if section.key.startswith("class_il") else ""
        rows.append(
            {
                "arm": arm.label,
                "strategy": arm.strategy,
                "overrides": arm.overrides,
                "note": arm.note,
                "lr_batch": settings.get(arm.label, ""),
                "seeds": len(ms),
                "seed_list": sorted(k[1] for k in results if k[0] == arm.label and "failed" not in results[k]),
                "average_accuracy": [m["average_accuracy"] for m in ms],
                "forgetting": [m["forgetting"] for m in ms],
                "bwt": [m["bwt"] for m in ms],
                "params_trained_per_task": statistics.mean(statistics.mean(m["params_trained_per_task"]) for m in ms),
                "expert_parameters": int(sum(ms[0]["expert_parameters"])),
                "router_state_elements": int(ms[0]["router_state_elements"]),
                "router_parameters": int(ms[0]["total_parameters"] - sum(ms[0]["expert_parameters"])),
                "train_time_s": [m["train_time_s"] for m in ms],
                "wall_time_s": [m["wall_time_s"] for m in ms],
                "reference": ref_text,
            }
        )
    return rows


def keep_rows(section, new_rows: list[dict], saved: dict, only: set[str]) -> list[dict]:
    """The section's rows in arm order: the arms of ``only`` from this run, every other arm's row as ``saved``
    (the markdown's JSON) has it, its note naming the command that computed it."""
    sec = saved["sections"][section.key]
    command = " ".join(sec.get("command") or saved["command"])
    old = {r["arm"]: r for r in sec["rows"]}
    new = {r["arm"]: r for r in new_rows}
    rows = []
    for arm in section.arms:
        if arm.strategy in only:
            rows += [new[arm.label]] if arm.label in new else []
        elif arm.label in old:
            r = dict(old[arm.label])
            before = r.get("note", "")
            # a row kept twice keeps the command that computed it
            origin = (
                before[before.index("kept from `") :] if "kept from `" in before else f"kept from `python {command}`"
            )
            note = arm.note or before.split("kept from `")[0].rstrip("; ")  # the arm's note as the code now has it
            r["note"] = (note + "; " if note else "") + origin
            rows.append(r)
    return rows


def section_markdown(section, rows: list[dict], command: list[str] | None = None) -> str:
    seeds = sorted({r["seeds"] for r in rows if "failed" not in r}) or [0]
    seed_lists = sorted({tuple(r.get("seed_list") or range(r["seeds"])) for r in rows if "failed" not in r})
    same = "the same seeds in every row" if len(seed_lists) == 1 else "seeds differ between rows"
    lines = [
        f"### {section.title}",
        "",
        f"Mean ± sample std over {'/'.join(map(str, seeds))} seed(s) "
        f"(seeds {', '.join(str(list(x)) for x in seed_lists)}; {same}). Config "
        f"`{Path(section.config).relative_to(ROOT)}`"
        + (f" with `{' '.join('--set ' + o for o in section.overrides)}`" if section.overrides else "")
        + "."
        + (f" Command: `python {' '.join(command)}`." if command else ""),
    ]
    if section.caption:
        lines += ["", section.caption]
    has_ref = any(r.get("reference") for r in rows)
    has_lr = any(r.get("lr_batch") for r in rows)
    head = (
        ["method", "seeds"]
        + (["lr / batch"] if has_lr else [])
        + ["avg acc (%)"]
        + (["published (%)"] if has_ref else [])
        + ["forgetting (%)", "BWT (%)", "params (experts + router)", "params trained / task", "train time (s)", "note"]
    )
    lines += ["", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---"]) + "|"]
    for r in rows:
        if "failed" in r:
            lines.append(
                "| "
                + " | ".join([r["arm"], "0"] + (["—"] if has_lr else []) + ["—"] * (7 if has_ref else 6) + [r["note"]])
                + " |"
            )
            continue
        router = r["router_parameters"] + r["router_state_elements"]
        params = f"{r['expert_parameters']:,}" + (f" + {router:,}" if router and r["strategy"] == "modulemesh" else "")
        cells = (
            [r["arm"], str(r["seeds"])]
            + ([r.get("lr_batch", "")] if has_lr else [])
            + [mean_std(r["average_accuracy"])]
            + ([r["reference"]] if has_ref else [])
            + [
                mean_std(r["forgetting"]),
                mean_std(r["bwt"]),
                params,
                f"{r['params_trained_per_task']:,.0f}",
                mean_std(r["train_time_s"]),
                r["note"],
            ]
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def published_gap_note(rows: list[dict]) -> str:
    """Our class-IL buffer-500 rows against the published ones, computed from this run (no typed numbers)."""
    gaps = []
    for r in rows:
        ref = REFERENCES.get(r["arm"], {})
        pub = ref.get(500) or ref.get(None)
        if not pub or not pub.replace(".", "").isdigit():
            continue
        acc = r["average_accuracy"]
        spread = f", seed std {statistics.stdev(acc):.1f}" if len(acc) > 1 else ""
        gaps.append(f"{r['arm']} {statistics.mean(acc) - float(pub):+.1f} points{spread}")
    if not gaps:
        return "- No buffer-500 class-IL rows to hold against the published numbers in this run."
    return (
        "- Against the published numbers (class-IL, buffer 500; ours minus theirs): " + "; ".join(gaps) + ". "
        "Differences we know of: 10% of each task's training data is held out for validation here (Mammoth trains "
        "on all of it) and we average few seeds; no gap was ablated. EWC, SI and LwF sit near 20% as in the paper "
        "(class-IL without replay keeps only the last task)."
    )


def _tuned(rows: list[dict], md: str) -> bool:
    return any(md in r.get("note", "") for r in rows)


def other_settings_note(all_rows: dict[str, list[dict]]) -> str:
    """Where the other tables' baseline settings come from, read off the rows' own notes (only for the
    sections this file holds)."""
    out, untuned = [], []
    if "fashion" in all_rows:
        out.append(
            " Split-Fashion-MNIST likewise runs every row as `modulemesh compare configs/split_fashion_mnist.yaml` "
            "runs it"
            + (
                f"; its baselines' lr and batch size were chosen by the same grid on its own validation split (first "
                f"seed; {TUNING_MD_FASHION}) and written into its per_strategy blocks."
                if _tuned(all_rows["fashion"], TUNING_MD_FASHION)
                else ", but its blocks hold Mammoth's seq-mnist settings, not tuned ones."
            )
        )
    if "task_il_500" in all_rows:
        if _tuned(all_rows["task_il_500"], TUNING_MD_TASK_IL):
            out.append(
                " Split-MNIST task-IL: the baselines' lr and batch size were chosen by the same grid on its "
                f"validation split (first seed; {TUNING_MD_TASK_IL}) and written into "
                "configs/split_mnist_task_il.yaml's per_strategy blocks; its ModuleMesh arms run their overrides in "
                "benchmarks/continual.py (not tuned)."
            )
        else:
            untuned.append("Split-MNIST task-IL")
    if "class_il_200" in all_rows:
        out.append(
            " Split-MNIST class-IL, buffer 200: not re-tuned; the baselines run the class-IL config's per_strategy "
            "blocks (chosen at buffer 500) with Mammoth's buffer-200 best_args on top where they differ (the "
            "'Mammoth:' notes)."
        )
    if "permuted" in all_rows:
        if _tuned(all_rows["permuted"], TUNING_MD_PERMUTED):
            out.append(
                " Permuted-MNIST: the baselines' lr and batch size were chosen on its validation split (first seed) "
                f"among lr 0.03 / 0.2 x batch 32 / 128 ({TUNING_MD_PERMUTED}) and written into "
                "configs/permuted_mnist.yaml's per_strategy blocks."
            )
        else:
            untuned.append("Permuted-MNIST")
    if untuned:
        out.append(
            f" {' and '.join(untuned)}: not tuned; baselines use the config's Mammoth settings"
            + (
                " plus Mammoth's per-method best_args for seq-mnist where they differ (the 'Mammoth:' notes)"
                if "Split-MNIST task-IL" in untuned
                else ""
            )
            + "."
        )
    if any(k in all_rows for k in ("class_il_200", "permuted")) or untuned:
        out.append(" ModuleMesh's arms there run their overrides in benchmarks/continual.py (784-20-20 experts).")
    return "".join(out)


def permuted_note(rows: list[dict]) -> str:
    """The Permuted-MNIST grid's diverged points, read from its tuning JSON (nothing typed)."""
    path = ROOT / TUNING_MD_PERMUTED.replace(".md", ".json")
    if not _tuned(rows, TUNING_MD_PERMUTED) or not path.exists():
        return (
            "- Permuted-MNIST: EWC (lambda 90, tuned for Split-MNIST at lr 0.03) diverges at the config's shared lr "
            "0.2 (the loss becomes NaN in task 2), so its arm runs at lr 0.03."
        )
    table = json.loads(path.read_text())["strategies"]
    failed = [
        f"{s} at lr {g['point']['train.lr']} / batch {g['point']['train.batch_size']}"
        for s, e in table.items()
        for g in e["grid"]
        if g.get("failed")
    ]
    return (
        "- Permuted-MNIST: grid points whose training diverged (NaN/inf loss or Fisher), recorded as failed and never "
        f"chosen: {', '.join(failed) or 'none'} ({TUNING_MD_PERMUTED})."
    )


def goals(all_rows: dict[str, list[dict]]) -> list[str]:
    def row(sec, arm):
        return next((r for r in all_rows.get(sec, []) if r["arm"] == arm and "failed" not in r), None)

    out = []
    mm, ewc = row("class_il_500", "modulemesh (density)"), row("class_il_500", "ewc")
    if mm:
        acc, fg = statistics.mean(mm["average_accuracy"]), statistics.mean(mm["forgetting"])
        out.append(
            f"- Split-MNIST class-IL, buffer 500: ModuleMesh (density router) {acc:.2f}% average accuracy "
            f"(goal >= 93: **{'met' if acc >= 93 else 'not met'}**), {fg:.2f}% forgetting "
            f"(goal <= 5: **{'met' if fg <= 5 else 'not met'}**), {mm['seeds']} seeds."
        )
        if ewc:
            gap = acc - statistics.mean(ewc["average_accuracy"])
            out.append(
                f"- ModuleMesh minus EWC on the same benchmark: {gap:+.2f} points (goal >= +15: "
                f"**{'met' if gap >= 15 else 'not met'}**)."
            )
        size = mm["expert_parameters"] + mm["router_state_elements"]
        out.append(
            f"- ModuleMesh's size: {mm['expert_parameters']:,} expert parameters + "
            f"{mm['router_state_elements']:,} density-router "
            f"state elements = {mm['expert_parameters'] + mm['router_state_elements']:,}, vs 89,610 parameters "
            "of the "
            f"784-100-100-10 MLP ({(mm['expert_parameters'] + mm['router_state_elements']) / 89610:.2f}x; "
            f"limit 2x: **{'met' if size <= 2 * 89610 else 'not met'}**)."
        )
    for arm in ("modulemesh (density)", "modulemesh (oracle router)", "modulemesh (oracle router, CNN experts)"):
        til = row("task_il_500", arm)
        if til:
            acc = statistics.mean(til["average_accuracy"])
            size = til["expert_parameters"] + til["router_parameters"] + til["router_state_elements"]
            out.append(
                f"- Split-MNIST task-IL: {arm} {mean_std(til['average_accuracy'], 2)}% average accuracy over "
                f"{til['seeds']} seed(s) (goal >= 99.5: **{'met' if acc >= 99.5 else 'not met'}**); "
                f"{size:,} parameters (experts + router) = {size / 89610:.2f}x the 784-100-100-10 MLP (limit "
                "2x)."
            )
    return out


def write(md_path: Path, secs: list, all_rows: dict, commands: dict, args, elapsed: float, done: bool) -> None:
    """``secs``/``all_rows``/``commands``: every section in the file, each with the command that computed it
    (sections this invocation did not run are kept from the file's JSON)."""
    kept = sorted(k for k, c in commands.items() if c != sys.argv and k in all_rows)
    parts = [
        "# Continual-learning benchmarks",
        "",
        f"Written by `python benchmarks/continual.py {' '.join(sys.argv[1:])}`"
        + (f" (sections {', '.join(kept)} kept from an earlier invocation: the command under each)" if kept else "")
        + f" ({'complete' if done else 'PARTIAL: still running or interrupted'}; this invocation "
        f"{elapsed / 60:.0f} min, runs "
        f"finished earlier read back; train times below are per run, on "
        f"{platform.machine()} CPU, torch {torch.__version__}, one torch thread per run, {args.jobs} run(s) in "
        "parallel on a "
        "shared 2-core machine, so wall times are noisy)."
        + (
            " Rows whose note says 'kept from' were not rerun: they are the named command's rows."
            if any("kept from `" in r.get("note", "") for rows in all_rows.values() for r in rows)
            else ""
        ),
        "",
        f"Published numbers: {REFERENCE_SOURCE} (Mammoth, same MLP, 1 epoch/task, batch 10, 10% less training "
        "data here: "
        "we hold out 10% of each task for validation). 'params' of ModuleMesh = expert parameters + router "
        "parameters "
        "and density-router state (PPCA means/factors, not trained by SGD).",
        "",
    ]
    g = goals(all_rows)
    if g:
        parts += ["## Goals (issue 3)", ""] + g + [""]
    parts += ["## Results", ""]
    for sec in secs:
        if sec.key in all_rows:
            parts += [section_markdown(sec, all_rows[sec.key], commands.get(sec.key))]
    parts += [
        "## Notes",
        "",
        "- " + JOINT_NOTE,
        "- Split-MNIST class-IL, buffer 500: every row runs as `modulemesh compare configs/split_mnist_class_il.yaml` "
        "runs it (no overrides). The baselines' lr and batch size (column 'lr / batch') were chosen by "
        f"`modulemesh compare --tune` on the validation split of the first seed ({TUNING_MD}) and written into the "
        "config's per_strategy blocks; ModuleMesh's block got its lr and batch size from the same grid run on it alone "
        "(benchmarks/results/routing_tuning_*.md, Split-Fashion-MNIST too); its gate ablation keeps 0.1 / 32."
        + other_settings_note(all_rows)
        + " The column 'lr / batch' (where present) is read from each run's resolved config. Same data, split, "
        "1 epoch per task.",
        published_gap_note(all_rows.get("class_il_500", [])),
        *(
            [
                "- 'does not use the buffer': finetune, joint, EWC, SI, LwF and ModuleMesh with the density router "
                "never read the replay buffer, so those buffer-200 rows are that run's buffer-500 runs."
            ]
            if any("does not use the buffer" in r.get("note", "") for r in all_rows.get("class_il_200", []))
            else []
        ),
        "- Task-IL: with the task id given, the oracle router picks the task's own expert, so its accuracy is "
        "the "
        "experts' own: one epoch of a 784-20-20-2 MLP is not enough for the hardest pairs (2-vs-3, 8-vs-9). "
        "Small CNN experts (conv 16-32-32 + FC 64), trained with the config's shared settings (batch 10, lr 0.03, "
        "one epoch; not tuned), "
        "are the arm 'modulemesh (oracle router, CNN experts)'; its size is in the table.",
        permuted_note(all_rows.get("permuted", [])),
        "",
    ]
    atomic_write_text(md_path, "\n".join(parts))
    atomic_write_json(
        md_path.with_suffix(".json"),
        {
            "complete": done,
            "command": sys.argv,
            "elapsed_s": elapsed,
            "reference_source": REFERENCE_SOURCE,
            "joint_note": JOINT_NOTE,
            "sections": {
                s.key: {"title": s.title, "command": commands.get(s.key), "rows": all_rows[s.key]}
                for s in secs
                if s.key in all_rows
            },
            "goals": g,
        },
    )
