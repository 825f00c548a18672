"""Benchmark: does the assembled m2mKD student keep what its modules scored in their hybrids (issue 17 item 5)?

    python benchmarks/m2mkd_assembly.py          # digits and a tiny CIFAR-100-format set, seeds 0 1 2 each

For each setting the meta model, teacher and teacher modules are trained once per seed; the student
modules are distilled three times: with the seed's method (``distill.boundary_weight=0``), with the
boundary loss (the default), each set assembled with and without the stitch calibration
(``assemble.calibrate``), and one after another on the distilled modules' outputs
(``distill.prefix=student``). No fine-tune: the table compares the assembled student's test accuracy
with its modules' hybrid accuracies (``meta[:i] + student_i + meta[i+1:]``). The CIFAR-format
set is written by benchmarks/gpu_check.py's writer (class templates plus noise, 100 classes), and
the CIFAR config is configs/m2mkd_cifar100.yaml's layout (K = 4, equal teacher/meta width) shrunk.
Writes OUT/assembly.json and benchmarks/results/m2mkd_assembly.md (from that JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from publish import publish

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "digits": """data: {name: digits}
teacher: {spec: "vit:dim=32,depth=2,heads=2,patch=4", steps: 200, adapt_steps: 80}
meta: {steps: 150}
student: "moe_vit:dim=24,depth=2,heads=2,experts=2,k=1"
modules: 2
distill: {steps: 150}
assemble: {finetune_steps: 0}
optim: {batch_size: 64}
eval: {ood: []}
""",
    "cifar100-format (tiny)": """data: {name: cifar100, root: DATA}
teacher: {spec: "vit:dim=64,depth=4,heads=4,patch=8", steps: 300, adapt: stitch, adapt_steps: 100}
meta: {steps: 200}
student: "moe_vit:dim=48,depth=4,heads=4,experts=4,k=2,moe_every=2,patch=8"
modules: 4
distill: {steps: 100}
assemble: {finetune_steps: 0}
optim: {batch_size: 64}
eval: {ood: []}
""",
}
VARIANTS = (
    ("seed's method", ["distill.boundary_weight=0", "assemble.calibrate=false"]),
    ("+ calibration", ["distill.boundary_weight=0", "assemble.calibrate=true"]),
    ("+ boundary loss", ["assemble.calibrate=false"]),
    ("+ both (default)", []),
    ("prefix: student", ["distill.prefix=student"]),
)


def pct(values: list[float]) -> str:
    v = [100 * x for x in values]
    return f"{statistics.fmean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cifar-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(ROOT / "runs" / "m2mkd_assembly"))
    p.add_argument("--render-only", action="store_true", help="re-render the md from OUT/assembly.json")
    args = p.parse_args(argv)
    if args.render_only:
        doc_path = Path(args.out) / "assembly.json"
        if not doc_path.exists():
            print(f"error: {doc_path} not found; run without --render-only first", file=sys.stderr)
            return 2
        md = render(json.loads(doc_path.read_text()))
        print(md)
        publish("m2mkd_assembly", "m2mKD: the assembled student against its modules' hybrids", md, argv)
        return 0

    import torch

    from gpu_check import write_cifar100
    from modulemesh.checkpoint import read_manifest
    from modulemesh.config import load_config
    from modulemesh.distill.m2mkd import M2MKD, M2MKDConfig
    from modulemesh.io import atomic_write_json

    torch.set_num_threads(1)
    out = Path(args.out)
    data = out / "cifar"
    if not (data / "cifar-100-python" / "meta").exists():
        write_cifar100(data, 20, 5)
    rows = []
    for name, text in SETTINGS.items():
        path = out / f"{name.split()[0]}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("DATA", str(data)))
        for seed in args.cifar_seeds if name.startswith("cifar") else args.seeds:
            # A (setting, seed) finished earlier with the same config is read back: the run resumes.
            done = out / name.split()[0] / f"seed{seed}" / "assembly_rows.json"
            if done.exists() and json.loads(done.read_text())["config"] == path.read_text():
                rows += json.loads(done.read_text())["rows"]
                print(f"{name} seed {seed}: read back {done}", flush=True)
                continue
            seed_rows, t_cpu = [], time.process_time()
            for variant, overrides in VARIANTS:
                cfg = load_config(M2MKDConfig, path, overrides)
                run = M2MKD(cfg, out / name.split()[0] / f"seed{seed}", seed=seed)
                run.run(["meta", "teacher", "modules", "assemble"])
                sm = run.student_view(run.student_path)
                seed_rows.append(
                    {
                        "setting": name,
                        "seed": seed,
                        "variant": variant,
                        "meta": read_manifest(run.meta_path)["eval"]["iid"],
                        "teacher_hybrid": [
                            read_manifest(run.teacher_module_path(i))["hybrid_accuracy"] for i in range(run.K)
                        ],
                        "student_hybrid": [m["hybrid_accuracy"] for m in sm["modules"]],
                        "assembled": sm["assembled_eval"]["iid"],
                        "calibration": sm.get("calibration"),
                    }
                )
                print(f"{name} seed {seed} {variant}: {seed_rows[-1]}", flush=True)
            cpu = round(time.process_time() - t_cpu, 1)
            atomic_write_json(done, {"config": path.read_text(), "cpu_time_s": cpu, "rows": seed_rows})
            rows += seed_rows
    doc = {"command": " ".join(["python", "benchmarks/m2mkd_assembly.py", *(argv or sys.argv[1:])]), "rows": rows}
    atomic_write_json(out / "assembly.json", doc)
    md = render(doc)
    print(md)
    publish("m2mkd_assembly", "m2mKD: the assembled student against its modules' hybrids", md, argv)
    return 0


def render(doc: dict) -> str:
    lines = [
        "Test accuracy (%) with no fine-tune; mean ± std over seeds. Hybrid i = meta[:i] + student module i + "
        "meta[i+1:]; gap = assembled - worst hybrid (points).",
        "",
        "| setting | seeds | modules distilled with | calibration | student hybrids | worst hybrid | assembled | gap |",
        "|---|---|---|---|---|---:|---:|---:|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in doc["rows"]:
        groups.setdefault((r["setting"], r["variant"]), []).append(r)
    for (setting, variant), rs in groups.items():
        k = len(rs[0]["student_hybrid"])
        hyb = " / ".join(pct([r["student_hybrid"][i] for r in rs]) for i in range(k))
        worst = [min(r["student_hybrid"]) for r in rs]
        asm = [r["assembled"] for r in rs]
        boundary = "seed's loss" if variant in ("seed's method", "+ calibration") else "+ boundary loss"
        if variant == "prefix: student":
            boundary = "+ boundary loss, on the distilled modules' tokens (`prefix: student`)"
        cal = "yes" if rs[0]["calibration"] else "no"
        lines.append(
            f"| {setting} | {len(rs)} | {boundary} | {cal} | {hyb} | {pct(worst)} | {pct(asm)} "
            f"| {pct([a - w for a, w in zip(asm, worst)])} |"
        )
    seeds: dict[str, set] = {}
    for r in doc["rows"]:
        seeds.setdefault(r["setting"], set()).add(r["seed"])
    most = max(len(v) for v in seeds.values())
    for setting, v in seeds.items():
        if len(v) < most:
            lines += [
                "",
                f"The {setting} rows are {len(v)} seed{'s' if len(v) > 1 else ''} "
                f"(seed {' '.join(map(str, sorted(v)))}), not {most} like the others: the run asked for fewer "
                "(`--seeds`, `--cifar-seeds`; 0 1 2 by default), so their spread is not measured.",
            ]
    # Meta model and teacher hybrids are trained once per (setting, seed): one record per seed.
    per_seed: dict[str, dict] = {}
    for r in doc["rows"]:
        per_seed.setdefault(r["setting"], {}).setdefault(r["seed"], r)
    lines.append("")
    for setting, by_seed in per_seed.items():
        rs = list(by_seed.values())
        k = len(rs[0]["teacher_hybrid"])
        lines.append(
            f"- {setting}, seeds {' '.join(map(str, by_seed))}: meta model {pct([r['meta'] for r in rs])}%, "
            "teacher hybrids " + " / ".join(pct([r["teacher_hybrid"][i] for r in rs]) for i in range(k)) + "%"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
