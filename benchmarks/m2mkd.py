"""Benchmark: does the m2mKD student beat its end-to-end twin at equal student steps (IID and OOD)?

    python benchmarks/m2mkd.py                       # configs/m2mkd_mnist.yaml, seeds 0 1 2
    python benchmarks/m2mkd.py --config configs/m2mkd_fashion.yaml --seeds 0 1 2 --jobs 2

One teacher is trained once (the "pretrained monolithic model", seed ``--teacher-seed``) and shared
by every seed; per seed the meta model, the teacher modules' fitting, the m2mKD student and both
baselines (end-to-end, whole-model KD: the same network, the same number of student steps) are
trained from that seed. Prints a markdown table of mean +- std over seeds and writes
``OUT/benchmark.json`` and ``OUT/benchmark.md``; each seed's full report is in ``OUT/seed<S>/``.
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


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], scale: float = 100.0) -> str:
    m, s = mean_std([scale * v for v in values])
    return f"{m:.2f} ± {s:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "m2mkd_mnist.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--teacher-seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--jobs", type=int, default=1, help="worker processes for the module jobs")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads in this process (default 1: the CPU is shared)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(ROOT / "runs" / "m2mkd_bench"))
    args = p.parse_args(argv)

    import torch

    from modulemesh.config import load_config
    from modulemesh.distill.m2mkd import M2MKD, STAGES, M2MKDConfig
    from modulemesh.io import atomic_write_json, atomic_write_text
    from modulemesh.utils import resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out = Path(args.out)
    base = load_config(M2MKDConfig, args.config, args.overrides, jobs=args.jobs)
    if base.teacher.path:
        teacher_path = base.teacher.path
    else:
        t0 = time.perf_counter()
        tm = M2MKD(base, out / "teacher", seed=args.teacher_seed, device=device, log=print).train_teacher()
        teacher_path = str(out / "teacher" / "teacher")
        print(f"teacher: {100 * tm['eval']['iid']:.2f}% IID ({time.perf_counter() - t0:.0f} s incl. reuse)", flush=True)
    cfg = base.model_copy(update={"teacher": base.teacher.model_copy(update={"path": teacher_path})})

    summaries = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        s = M2MKD(
            cfg,
            out / f"seed{seed}",
            seed=seed,
            device=device,
            log=lambda text: print(f"[seed {seed}] {text}", flush=True),
        ).run(STAGES)
        print(f"[seed {seed}] done in {time.perf_counter() - t0:.0f} s", flush=True)
        summaries.append(s)

    first = summaries[0]
    ood_sets = first["ood_sets"]
    names = [("teacher", "teacher (shared)"), ("meta", "meta model")]
    arms = [
        ("m2mkd_assembled", "m2mKD, assembled, no fine-tune"),
        ("m2mkd", "m2mKD"),
        ("e2e", "end-to-end"),
        ("kd", "whole-model KD"),
    ]

    def evals(key: str) -> list[dict]:
        return [(s["models"][key] if key in s["models"] else s["arms"][key])["eval"] for s in summaries]

    cols = ["model", "student steps", "IID acc (%)", "OOD acc (%)"] + [f"{o} (%)" for o in ood_sets] + ["train s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    table = {}
    for key, label in names + arms:
        ev = evals(key)
        steps = "-" if key in ("teacher", "meta") else str(summaries[0]["arms"][key]["student_steps"])
        secs = (
            "-"
            if key in ("teacher", "meta")
            else f"{statistics.fmean(s['arms'][key]['seconds'] for s in summaries):.0f}"
        )
        row = [label, steps, fmt([e["iid"] for e in ev]), fmt([e["ood_mean"] for e in ev])]
        row += [fmt([e["ood"][o] for e in ev]) for o in ood_sets] + [secs]
        lines.append("| " + " | ".join(row) + " |")
        table[key] = {
            "iid": [e["iid"] for e in ev],
            "ood_mean": [e["ood_mean"] for e in ev],
            "ood": {o: [e["ood"][o] for e in ev] for o in ood_sets},
        }

    deltas = {}
    for base_arm in ("e2e", "kd"):
        d_iid = [a - b for a, b in zip(table["m2mkd"]["iid"], table[base_arm]["iid"])]
        d_ood = [a - b for a, b in zip(table["m2mkd"]["ood_mean"], table[base_arm]["ood_mean"])]
        deltas[base_arm] = {
            "iid": d_iid,
            "ood_mean": d_ood,
            "iid_wins": sum(d > 0 for d in d_iid),
            "ood_wins": sum(d > 0 for d in d_ood),
        }
    n = len(summaries)
    verdict = []
    for base_arm, label in (("e2e", "its end-to-end twin"), ("kd", "whole-model KD")):
        dl = deltas[base_arm]
        verdict.append(
            f"m2mKD vs {label}: IID {fmt(dl['iid'])} points (better in {dl['iid_wins']}/{n} seeds), "
            f"OOD {fmt(dl['ood_mean'])} points (better in {dl['ood_wins']}/{n} seeds)"
        )
    beats = deltas["e2e"]["iid_wins"] == n and deltas["e2e"]["ood_wins"] == n
    verdict.append(
        "claim (m2mKD beats end-to-end on IID and OOD at equal student steps, every seed): "
        + ("holds here" if beats else "does NOT hold here")
    )
    header = (
        f"m2mKD benchmark on {first['data']} ({first['n_train']} train / {first['n_test']} test), "
        f"K={first['modules']}, "
        f"seeds {args.seeds}, {first['budget']['student_steps_per_arm']} student steps per arm; mean ± std over "
        "seeds.\n\n"
        f"teacher `{json.dumps(first['specs']['teacher'])}`, meta `{json.dumps(first['specs']['meta'])}`, "
        f"student `{json.dumps(first['specs']['student'])}`\n"
    )
    verdicts = "\n".join(f"- {v}" for v in verdict)
    md = header + "\n" + "\n".join(lines) + "\n\n" + verdicts + "\n\n" + first["budget"]["accounting"] + "\n"
    print()
    print(md)
    atomic_write_text(out / "benchmark.md", md)
    publish(Path(args.config).stem.replace("m2mkd_mnist", "m2mkd"), "m2mKD vs end-to-end vs whole-model KD", md, argv)
    atomic_write_json(
        out / "benchmark.json",
        {
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "config": json.loads(cfg.model_dump_json()),
            "seeds": args.seeds,
            "table": table,
            "deltas": deltas,
            "verdict": verdict,
            "per_seed": summaries,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
