"""Benchmark: does Fisher transfer + KD reach 95% of a deprecated model's accuracy in <= 30% of the
steps that random init + KD needs (issue 4; seed 000 expects 30-50% fewer GPU hours)?

For each data set a teacher MLP (256-256) is trained with cross-entropy, then upgraded into three
students that differ in width AND depth, plus the shallower one again with
``transfer.fit_unmapped_output`` (its output layer fitted to the old logits by least squares).
Each upgrade is ``modulemesh.preserve.upgrade.run_upgrade`` (the code behind ``modulemesh
upgrade``) with the same step budget, minibatches and random init for every arm; accuracy is
measured on the full test split every ``--eval-every`` steps. A small ablation then asks whether
choosing units and parameters by Fisher matters (narrower+deeper student).

    python benchmarks/preservation.py     # MNIST + Fashion-MNIST, seeds 0 1 2: ~4.5 CPU-minutes per seed
    python benchmarks/preservation.py --datasets digits --steps 200 --teacher-steps 300 --seeds 0   # smoke run

Each seed's results go to OUT/seed<N>/preservation_seed.json as soon as that seed is done; a rerun
reads back the seeds already finished with the same settings, so an interrupted run resumes and a
rerun with all seeds done only renders. The table shows mean ± sd over the seeds.
Prints markdown tables and writes OUT/preservation.json (plus one upgrade report per case and seed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from modulemesh.tables import markdown_table
from publish import publish

TEACHER = {"type": "mlp", "hidden": [256, 256]}
STUDENTS = {
    "wider+deeper": {"type": "mlp", "hidden": [512, 512, 512]},
    "narrower+deeper": {"type": "mlp", "hidden": [128, 128, 128]},
    "narrower+shallower": {"type": "mlp", "hidden": [128]},
    # Same student; its output layer (unmappable: it reads other features) is fitted to the old logits.
    "narrower+shallower+fit": {"type": "mlp", "hidden": [128]},
}
# Ablation on the narrower+deeper student (transfer + KD): does choosing units and parameters by
# Fisher matter? "first units" ignores the Fisher (keeps units 0..k-1, an arbitrary choice).
ABLATION = [
    ("Fisher-ranked units, all parameters", {"fisher": True, "top_q": None}),
    ("first units (no Fisher), all parameters", {"fisher": False, "top_q": None}),
    ("Fisher-ranked units, top 50% of old parameters by Fisher", {"fisher": True, "top_q": 0.5}),
    ("Fisher-ranked units, top 10% of old parameters by Fisher", {"fisher": True, "top_q": 0.1}),
]


def run_ablation(teacher, ds, cache_dir, args, start) -> list[dict]:
    import torch

    from modulemesh.mesh.backbones import build_backbone
    from modulemesh.preserve.fisher import fisher_diagonal
    from modulemesh.preserve.mapping import transfer
    from modulemesh.preserve.train import steps_to_reach, train_steps
    from modulemesh.preserve.upgrade import dataset_tensors
    from modulemesh.training.evaluate import accuracy_fraction
    from modulemesh.training.teacher_logits import teacher_logits
    from modulemesh.utils import seed_everything

    data = dataset_tensors(ds)
    eval_data = (data["x_test"], data["y_test"])
    teacher_acc = accuracy_fraction(teacher, *eval_data)
    sub = torch.randperm(data["x_train"].shape[0], generator=torch.Generator().manual_seed(args.seed))[:2000]
    fisher = fisher_diagonal(teacher, (data["x_train"][sub], data["y_train"][sub]), batch_size=64)
    logits = teacher_logits(teacher, data["x_train"], cache_dir=cache_dir)
    rows = []
    for variant, opts in ABLATION:
        seed_everything(args.seed)
        student = build_backbone(STUDENTS["narrower+deeper"], ds.input_shape, ds.num_classes)
        report = transfer(teacher, student, fisher if opts["fisher"] else None, top_q=opts["top_q"], seed=args.seed)
        curve = train_steps(
            student,
            data["x_train"],
            data["y_train"],
            steps=args.ablation_steps,
            teacher_logits=logits,
            seed=args.seed,
            eval_data=eval_data,
            eval_every=args.eval_every,
        )
        mass = report.importance_mass_carried if opts["fisher"] else None  # without a Fisher there is no mass to count
        rows.append(
            {
                "data": ds.name,
                "variant": variant,
                "teacher_accuracy": teacher_acc,
                "fraction_transferred": report.fraction_transferred,
                "fisher_mass_carried": mass,
                "init_accuracy": curve[0]["accuracy"],
                "final_accuracy": curve[-1]["accuracy"],
                "steps_95": steps_to_reach(curve, 0.95 * teacher_acc),
                "steps_99": steps_to_reach(curve, 0.99 * teacher_acc),
            }
        )
    print(f"[{time.perf_counter() - start:6.1f}s] {ds.name} ablation: done", file=sys.stderr, flush=True)
    return rows


def config_of(args) -> dict:
    """What a seed's results depend on; a stored seed is reused only when this matches."""
    keys = ("datasets", "students", "steps", "teacher_steps", "eval_every", "ablation_steps")
    return {k: getattr(args, k) for k in keys}


def run_seed(seed: int, args, start: float) -> dict:
    """Every case and the ablation for one seed (teacher, students, minibatches and init all seeded)."""
    from modulemesh.data.datasets import load_dataset
    from modulemesh.preserve.train import load_model, steps_to_reach
    from modulemesh.preserve.upgrade import TeacherConfig, TrainSection, UpgradeConfig, run_upgrade, train_teacher

    args.seed = seed  # run_ablation reads it
    out = Path(args.out) / f"seed{seed}"
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    cases, ablation = [], []
    for name in args.datasets:
        ds = load_dataset(name)
        teacher_path = out / name / "teacher"
        if (teacher_path.with_suffix(".json")).exists():
            teacher, manifest = load_model(teacher_path)
        else:
            tcfg = TeacherConfig(
                backbone=TEACHER, train=TrainSection(steps=args.teacher_steps, eval_every=args.teacher_steps)
            )
            teacher, manifest = train_teacher(tcfg, ds, teacher_path, seed=seed)
        for student in args.students:
            cfg = UpgradeConfig(
                backbone=STUDENTS[student],
                train=TrainSection(steps=args.steps, eval_every=args.eval_every),
                transfer={"fit_unmapped_output": student.endswith("+fit")},
            )
            t0 = time.perf_counter()
            s = run_upgrade(
                teacher,
                manifest,
                cfg,
                ds,
                out / name / student.replace("+", "_"),
                seed=seed,
                arms=("kd", "transfer", "transfer_kd"),
            )
            teacher_acc = s["old_model"]["accuracy"]
            kd, tkd, tr = s["arms"]["kd"], s["arms"]["transfer_kd"], s["arms"]["transfer"]
            case = {
                "data": name,
                "student": student,
                "teacher_backbone": TEACHER,
                "student_backbone": STUDENTS[student],
                "teacher_accuracy": teacher_acc,
                "budget_steps": args.steps,
                "fraction_transferred": s["transfer"]["fraction_transferred"],
                "fisher_mass_carried": s["transfer"]["importance_mass_carried"],
                "seconds": round(time.perf_counter() - t0, 1),
            }
            for frac in (0.95, 0.99):
                a, b = steps_to_reach(kd["curve"], frac * teacher_acc), steps_to_reach(tkd["curve"], frac * teacher_acc)
                case[f"steps_{int(frac * 100)}_kd"] = a
                case[f"steps_{int(frac * 100)}_transfer_kd"] = b
                case[f"steps_{int(frac * 100)}_transfer"] = steps_to_reach(tr["curve"], frac * teacher_acc)
                case[f"ratio_{int(frac * 100)}"] = (b / a) if (a and b is not None) else None
            case["init_accuracy_transfer"] = tkd["init_accuracy"]
            case["final_accuracy_kd"] = kd["final_accuracy"]
            case["final_accuracy_transfer_kd"] = tkd["final_accuracy"]
            case["goal_met"] = (
                case["steps_95_transfer_kd"] is not None
                and case["steps_95_kd"] is not None
                and case["steps_95_transfer_kd"] <= 0.30 * case["steps_95_kd"]
            )
            cases.append(case)
            print(
                f"[{time.perf_counter() - start:6.1f}s] seed {seed} {name} {student}: done", file=sys.stderr, flush=True
            )
        if args.ablation_steps:
            ablation += run_ablation(teacher, ds, out / name / "cache", args, start)
    return {
        "seed": seed,
        "config": config_of(args),
        "threads": args.threads,
        "wall_time_s": round(time.perf_counter() - t_wall, 1),
        "cpu_time_s": round(time.process_time() - t_cpu, 1),
        "cases": cases,
        "ablation": ablation,
    }


def mean_sd(values: list[float], fmt: str = "{:.2f}") -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(sd)}"


def pct(values: list[float], digits: int = 2) -> str:
    return mean_sd([100 * v for v in values], f"{{:.{digits}f}}") + "%"


def steps_cell(values: list, budget: int) -> str:
    """Mean ± sd over the seeds that reached the threshold; a seed that never did is counted apart."""
    reached = [v for v in values if v is not None]
    if not reached:
        return f"> {budget} (all seeds)"
    cell = mean_sd(reached, "{:.0f}")
    return cell if len(reached) == len(values) else f"{cell} (> {budget} in {len(values) - len(reached)}/{len(values)})"


def goal_cell(group: list[dict]) -> str:
    """Judged on the seed mean (mean steps of transfer+KD <= 0.30 x mean steps of random+KD) and per seed."""
    n, k = len(group), sum(c["goal_met"] for c in group)
    kd, tkd = [c["steps_95_kd"] for c in group], [c["steps_95_transfer_kd"] for c in group]
    on_mean = None not in kd + tkd and statistics.fmean(tkd) <= 0.30 * statistics.fmean(kd)
    return f"{'yes' if on_mean else 'no'} (met in {k}/{n} seeds)"


def grouped(rows: list[dict], key: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["data"], r[key]), []).append(r)
    return out


def render(per_seed: list[dict], args) -> tuple[str, str]:
    cases = [c for s in per_seed for c in s["cases"]]
    rows = []
    for (data, student), g in grouped(cases, "student").items():
        ratios = [c["ratio_95"] for c in g if c["ratio_95"] is not None]
        rows.append(
            {
                "data": data,
                "teacher -> student": f"{'-'.join(map(str, TEACHER['hidden']))} -> "
                f"{'-'.join(map(str, STUDENTS[student]['hidden']))} ({student})",
                "teacher acc": pct([c["teacher_accuracy"] for c in g]),
                "transfer acc at step 0": pct([c["init_accuracy_transfer"] for c in g]),
                "steps to 95% of teacher: random+KD / transfer+KD": steps_cell(
                    [c["steps_95_kd"] for c in g], args.steps
                )
                + " / "
                + steps_cell([c["steps_95_transfer_kd"] for c in g], args.steps),
                "ratio (goal <= 0.30)": mean_sd(ratios) if len(ratios) == len(g) else "-",
                "steps to 99%: random+KD / transfer+KD": steps_cell([c["steps_99_kd"] for c in g], args.steps)
                + " / "
                + steps_cell([c["steps_99_transfer_kd"] for c in g], args.steps),
                f"acc after {args.steps} steps: random+KD / transfer+KD": pct([c["final_accuracy_kd"] for c in g])
                + " / "
                + pct([c["final_accuracy_transfer_kd"] for c in g]),
                "goal met (on the mean; per seed)": goal_cell(g),
            }
        )
    abl_rows = []
    for (data, variant), g in grouped([a for s in per_seed for a in s["ablation"]], "variant").items():
        mass = [a["fisher_mass_carried"] for a in g if a["fisher_mass_carried"] is not None]
        abl_rows.append(
            {
                "data": data,
                "variant (narrower+deeper, transfer+KD)": variant,
                "params transferred": pct([a["fraction_transferred"] for a in g], 0),
                "Fisher mass carried": pct(mass, 0) if mass else "n/a",
                "acc at step 0": pct([a["init_accuracy"] for a in g]),
                "steps to 95% / 99% of teacher": steps_cell([a["steps_95"] for a in g], args.ablation_steps)
                + " / "
                + steps_cell([a["steps_99"] for a in g], args.ablation_steps),
                f"acc after {args.ablation_steps} steps": pct([a["final_accuracy"] for a in g]),
            }
        )
    return markdown_table(rows), markdown_table(abl_rows) if abl_rows else ""


def note(per_seed: list[dict], args) -> str:
    seeds = " ".join(str(s["seed"]) for s in per_seed)
    wall = sum(s["wall_time_s"] for s in per_seed)
    cpu = sum(s["cpu_time_s"] for s in per_seed)
    return (
        f"Seeds {seeds} (each seed trains its own teacher, students, minibatches and init); mean ± sd over the "
        f"seeds. Accuracy on the full test split every {args.eval_every} steps; steps = first evaluation at or "
        "above the threshold, averaged over the seeds that reached it (a seed that did not within the budget is "
        "counted in brackets). Ratio = transfer+KD steps / random+KD steps to 95% of the teacher, per seed. Goal "
        "met on the mean: mean transfer+KD steps <= 0.30 x mean random+KD steps; per seed: the same test in each "
        f"seed. Wall time {wall:.0f} s, CPU time {cpu:.0f} s over the seeds (1 torch thread, a shared 2-core box)."
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    p.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    p.add_argument("--steps", type=int, default=1000, help="training steps per student arm")
    p.add_argument("--teacher-steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--seeds", "--seed", nargs="+", type=int, default=[0, 1, 2], dest="seeds")
    p.add_argument("--ablation-steps", type=int, default=300, help="steps per ablation variant (0 = skip the ablation)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the machine is shared)")
    p.add_argument("--out", default="runs/benchmarks/preservation")
    args = p.parse_args(argv)

    import json

    import torch

    from modulemesh.io import atomic_write_json

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    per_seed = []
    for seed in args.seeds:
        path = Path(args.out) / f"seed{seed}" / "preservation_seed.json"
        if path.exists() and json.loads(path.read_text()).get("config") == config_of(args):
            per_seed.append(json.loads(path.read_text()))  # finished earlier with the same settings
            print(f"seed {seed}: read back {path}", file=sys.stderr, flush=True)
            continue
        per_seed.append(run_seed(seed, args, start))
        atomic_write_json(path, per_seed[-1])

    table, abl_table = render(per_seed, args)
    text = note(per_seed, args)
    cmd = "python benchmarks/preservation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": cmd.strip(), "seeds": args.seeds, "per_seed": per_seed, "note": text}
    result |= {"table_markdown": table, "ablation_markdown": abl_table}
    atomic_write_json(Path(args.out) / "preservation.json", result)
    publish(
        "preservation",
        "Knowledge preservation: Fisher transfer + KD vs random init + KD",
        f"{text}\n\n{table}\n" + (f"\nAblation: does choosing by Fisher matter?\n\n{abl_table}" if abl_table else ""),
        argv,
    )
    print(table)
    if abl_table:
        print(abl_table)
    print(f"{text} Results: {Path(args.out) / 'preservation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
