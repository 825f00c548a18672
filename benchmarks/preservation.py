"""Benchmark: does Fisher transfer + KD reach 95% of a deprecated model's accuracy in <= 30% of the
steps that random init + KD needs (issue 4; seed 000 expects 30-50% fewer GPU hours)?

For each data set a teacher MLP (256-256) is trained with cross-entropy, then upgraded into three
students that differ in width AND depth, plus the shallower one again with
``transfer.fit_unmapped_output`` (its output layer fitted to the old logits by least squares).
Each upgrade is ``modulemesh.preserve.upgrade.run_upgrade`` (the code behind ``modulemesh
upgrade``) with the same step budget, minibatches and random init for every arm; accuracy is
measured on the full test split every ``--eval-every`` steps. A small ablation then asks whether
choosing units and parameters by Fisher matters (narrower+deeper student).

    python benchmarks/preservation.py     # MNIST + Fashion-MNIST: ~4.5 CPU-minutes, ~7 min on a busy 2-core box
    python benchmarks/preservation.py --datasets digits --steps 200 --teacher-steps 300   # smoke run

Prints a markdown table and writes OUT/preservation.json (plus one upgrade report per case).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    p.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    p.add_argument("--steps", type=int, default=1000, help="training steps per student arm")
    p.add_argument("--teacher-steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ablation-steps", type=int, default=300, help="steps per ablation variant (0 = skip the ablation)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the machine is shared)")
    p.add_argument("--out", default="runs/benchmarks/preservation")
    args = p.parse_args(argv)

    import torch

    from modulemesh.data.datasets import load_dataset
    from modulemesh.io import atomic_write_json, atomic_write_text
    from modulemesh.preserve.train import load_model, steps_to_reach
    from modulemesh.preserve.upgrade import TeacherConfig, TrainSection, UpgradeConfig, run_upgrade, train_teacher
    from modulemesh.tables import markdown_table

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    start = time.perf_counter()
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
            teacher, manifest = train_teacher(tcfg, ds, teacher_path, seed=args.seed)
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
                seed=args.seed,
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
            print(f"[{time.perf_counter() - start:6.1f}s] {name} {student}: done", file=sys.stderr, flush=True)
        if args.ablation_steps:
            ablation += run_ablation(teacher, ds, out / name / "cache", args, start)

    def steps(v, budget=None):
        return f"> {budget or args.steps}" if v is None else str(v)

    rows = [
        {
            "data": c["data"],
            "teacher -> student": f"{'-'.join(map(str, TEACHER['hidden']))} -> "
            f"{'-'.join(map(str, c['student_backbone']['hidden']))} ({c['student']})",
            "teacher acc": f"{c['teacher_accuracy']:.2%}",
            "transfer acc at step 0": f"{c['init_accuracy_transfer']:.2%}",
            "steps to 95% of teacher: random+KD / transfer+KD": f"{steps(c['steps_95_kd'])} / "
            f"{steps(c['steps_95_transfer_kd'])}",
            "ratio (goal <= 0.30)": "-" if c["ratio_95"] is None else f"{c['ratio_95']:.2f}",
            "steps to 99%: random+KD / transfer+KD": f"{steps(c['steps_99_kd'])} / {steps(c['steps_99_transfer_kd'])}",
            f"acc after {args.steps} steps: random+KD / transfer+KD": f"{c['final_accuracy_kd']:.2%} / "
            f"{c['final_accuracy_transfer_kd']:.2%}",
            "goal met": "yes" if c["goal_met"] else "no",
        }
        for c in cases
    ]
    table = markdown_table(rows)
    abl_rows = [
        {
            "data": a["data"],
            "variant (narrower+deeper, transfer+KD)": a["variant"],
            "params transferred": f"{a['fraction_transferred']:.0%}",
            "Fisher mass carried": "n/a" if a["fisher_mass_carried"] is None else f"{a['fisher_mass_carried']:.0%}",
            "acc at step 0": f"{a['init_accuracy']:.2%}",
            "steps to 95% / 99% of teacher": f"{steps(a['steps_95'])} / {steps(a['steps_99'], args.ablation_steps)}",
            f"acc after {args.ablation_steps} steps": f"{a['final_accuracy']:.2%}",
        }
        for a in ablation
    ]
    abl_table = markdown_table(abl_rows)
    cmd = "python benchmarks/preservation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "command": cmd.strip(),
        "seed": args.seed,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "threads": args.threads,
        "wall_time_s": round(time.perf_counter() - start, 1),
        "cpu_time_s": round(time.process_time(), 1),
        "cases": cases,
        "ablation": ablation,
        "table_markdown": table,
        "ablation_markdown": abl_table,
    }
    atomic_write_json(out / "preservation.json", result)
    atomic_write_text(out / "preservation.md", table + ("\n" + abl_table if abl_table else ""))
    publish(
        "preservation",
        "Knowledge preservation: Fisher transfer + KD vs random init + KD",
        f"Accuracy on the full test split every {args.eval_every} steps; steps = first evaluation at or above the "
        "threshold. "
        f"Wall time {result['wall_time_s']} s.\n\n{table}\n"
        + (f"\nAblation: does choosing by Fisher matter?\n\n{abl_table}" if abl_table else ""),
        argv,
    )
    print(table)
    if abl_table:
        print(abl_table)
    print(
        f"Accuracy on the full test split every {args.eval_every} steps; steps = first evaluation at or above the "
        "threshold. "
        f"Wall time {result['wall_time_s']} s, CPU time {result['cpu_time_s']} s. Results: "
        f"{out / 'preservation.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
