"""Benchmark: m2mKD's practical gains: memory of one module job against whole-model KD, and the
module stage's wall time with K worker processes against one.

    python benchmarks/m2mkd_practical.py             # upstream from benchmarks/m2mkd.py's runs/m2mkd_bench/seed0

Memory (CPU): each job runs alone in a fresh child process (`--child`), the way the pipeline runs
it: student module i's distillation (``distill_module``) and the whole-model KD baseline of the same
student (``run_baselines(["kd"])``). The child's baseline is its RSS after imports, data loading
and a tiny warm-up fit; the kernel's peak RSS counter (VmHWM) is then reset
(``/proc/self/clear_refs``) and read at the last optimizer step (training peak) and after evaluation
and saving (whole job). Next to it, counted by torch: the activations autograd saves in the job's
last step (``saved_tensors_hooks``), the weights held with gradients and AdamW moments of the
trained ones (``m2mkd_regime.memory_rows``), and FLOPs (``torch.utils.flop_counter``). Wall time:
``modulemesh m2mkd CONFIG --stage modules --jobs N`` as a subprocess from the same upstream files,
N = 1 and K alternating (1, K, K, 1, ...), with the machine's load from /proc/stat. Writes
OUT/practical.json and benchmarks/results/m2mkd_practical.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = ("meta.json", "meta.safetensors", "teacher_modules")
MIB = 2**20


def status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def child(spec: dict) -> dict:
    """One job in this (fresh) process; returns its memory, FLOPs and time."""
    import torch

    from modulemesh.distill.m2mkd import M2MKD, M2MKDConfig
    from modulemesh.distill.m2mkd.recipe import fit

    torch.set_num_threads(1)
    cfg = M2MKDConfig.model_validate(spec["config"])
    run = M2MKD(cfg, spec["dir"], seed=spec["seed"], device="cpu")
    run.data  # noqa: B018  (loads the data set: part of the baseline, as every job needs it)
    # The first fit in a process loads code (FLOP counter, optimizer machinery) once; a 2-step fit of
    # a tiny net takes that out of the job's share.
    cold_kib = status_kib("VmRSS")
    tiny = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    fit(
        list(tiny.parameters()),
        lambda xb, yb, idx: torch.nn.functional.cross_entropy(tiny(xb), yb),
        torch.randn(64, 8),
        torch.randint(0, 2, (64,)),
        steps=2,
        optim=cfg.optim,
        lr=1e-3,
        seed=0,
    )
    base_kib = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    train_peak = [0]
    # Activations autograd saves in each optimizer step of the real job (each storage once per step):
    # the interval closed by on_step(N) holds step N alone.
    seen: set = set()
    step_saved = [0, 0]  # [running, at the last step]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                step_saved[0] += storage.nbytes()
        return t

    def on_step(step: int) -> None:
        train_peak[0] = status_kib("VmHWM")
        step_saved[1], step_saved[0] = step_saved[0], 0
        seen.clear()

    t0, c0 = time.perf_counter(), time.process_time()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if spec["job"] == "kd":
            run.progress = lambda label, total: on_step
            m = run.run_baselines(["kd"])["kd"]
        else:
            m = run.distill_module(int(spec["job"]), on_step)
    stats = m["train"]
    out = {
        "baseline_rss_bytes": base_kib * 1024,
        "warmup_rss_bytes": (base_kib - cold_kib) * 1024,
        "train_peak_above_bytes": (train_peak[0] - base_kib) * 1024,
        "job_peak_above_bytes": (status_kib("VmHWM") - base_kib) * 1024,
        "saved_activation_bytes": step_saved[1],
        "flops_per_step": stats["flops_per_step"],
        "train_flops": stats["train_flops"],
        "teacher_logit_pass": "teacher_logits" in stats,
        "steps": stats["steps"],
        "train_seconds": stats["seconds"],
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
    }
    return out


def run_child(spec: dict, work: Path) -> dict:
    path = work / f"child_{spec['job']}.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, __file__, "--child", str(path)], check=True, env=env)
    return json.loads((work / f"child_{spec['job']}.out.json").read_text())


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    f = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = f[3] + f[4]  # idle + iowait
    return sum(f[:8]) - idle, sum(f[:8])


def timed_stage(cmd: list[str]) -> dict:
    """Run the modules stage once; wall and CPU time, and how busy the machine was meanwhile."""
    ru0, (b0, t0j), load = resource.getrusage(resource.RUSAGE_CHILDREN), cpu_jiffies(), os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    ru1, (b1, t1j) = resource.getrusage(resource.RUSAGE_CHILDREN), cpu_jiffies()
    ours = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    cores = os.cpu_count() or 1
    busy_cores = cores * (b1 - b0) / max(t1j - t0j, 1)
    return {
        "wall_s": wall,
        "cpu_s": ours,
        "load_1min_before": load,
        "busy_cores": busy_cores,
        "others_cores": max(busy_cores - ours / wall, 0.0),
    }


def render(doc: dict) -> str:
    mem, par, K = doc["memory"], doc["parallel"], doc["modules"]
    order = ", ".join(str(r["jobs"]) for r in par)
    warm = max(r["warmup_rss_bytes"] for r in mem.values()) / MIB
    lines = [
        f"Upstream (meta model, teacher, its modules) from `{doc['upstream']}`, seed {doc['seed']}; "
        f"{doc['data']}, K = {K}, batch {doc['batch_size']}; student `{doc['student']}`. "
        f"CPU, one torch thread per process; the machine had {doc['cores']} cores, "
        "shared with other jobs.",
        "",
        "**Memory of one job** (each alone in a fresh child process; MiB). Peak RSS above baseline: the "
        "kernel's peak resident set (VmHWM, reset after imports, data loading and a 2-step warm-up fit "
        f"of a tiny net, which loads the FLOP counter's and optimizer's code: +{warm:.0f} MiB) minus the RSS then; "
        "training = at the last optimizer step, whole job = after evaluation and saving too. Saved "
        "activations: the bytes autograd saved for the backward pass of the job's last step, counted in "
        "the job by `saved_tensors_hooks` (each storage once). Weights + AdamW: every parameter the job "
        "holds, gradients and two AdamW moments of the trained ones (counted from the nets). FLOPs per "
        "step (forward + backward) and of the whole training from `torch.utils.flop_counter` in the job; a job "
        "that sees at least one epoch (marked *) runs its teacher once over the training set and reads cached "
        "logits (that pass is in its training FLOPs, not per step); a shorter one runs the teacher per batch.",
        "",
        "| job | steps | trained parameters | GFLOPs per step | training GFLOPs | weights + AdamW | "
        "saved activations | peak RSS above baseline, training | peak RSS above baseline, whole job | "
        "baseline RSS | CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in mem.items():
        t = doc["tensors"][name]
        lines.append(
            f"| {name}{' *' if r['teacher_logit_pass'] else ''} | {r['steps']} | {t['trained_parameters']:,} | "
            f"{r['flops_per_step'] / 1e9:.2f} | {r['train_flops'] / 1e9:.0f} | "
            f"{(t['parameters_bytes'] + t['grad_and_adam_bytes']) / MIB:.1f} | "
            f"{r['saved_activation_bytes'] / MIB:.1f} | {r['train_peak_above_bytes'] / MIB:.1f} | "
            f"{r['job_peak_above_bytes'] / MIB:.1f} | {r['baseline_rss_bytes'] / MIB:.0f} | {r['cpu_s']:.1f} |"
        )
    mods = [n for n in mem if n != "whole-model KD"]

    def ratio(get) -> str:
        return f"{max(get(mem[n]) for n in mods) / get(mem['whole-model KD']):.2f}x"

    lines += [
        "",
        "Largest module job / whole-model KD: "
        f"training peak RSS {ratio(lambda r: r['train_peak_above_bytes'])}, "
        f"whole-job peak RSS {ratio(lambda r: r['job_peak_above_bytes'])}, "
        f"saved activations {ratio(lambda r: r['saved_activation_bytes'])}, "
        f"FLOPs per step {ratio(lambda r: r['flops_per_step'])}, "
        f"training FLOPs {ratio(lambda r: r['train_flops'])}.",
        "",
        f"**Wall time of the modules stage** (`{doc['stage_command']}`, N = 1 and {K} in the order {order}, "
        "each from the same upstream files in a fresh directory; N = 1 trains the modules one after the "
        f"other in the command's process, N = {K} in {K} spawned worker processes). CPU s: all processes "
        "of the command; busy cores: the whole machine's mean during the run (/proc/stat), others: "
        "busy cores minus this command's.",
        "",
        "| run | --jobs | wall s | CPU s | per-module training s | load (1 min) before | busy cores | others |",
        "|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for i, r in enumerate(par, 1):
        per = ", ".join(f"{s:.1f}" for s in r["module_seconds"])
        lines.append(
            f"| {i} | {r['jobs']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {per} | {r['load_1min_before']:.2f} | "
            f"{r['busy_cores']:.2f} | {r['others_cores']:.2f} |"
        )
    w1 = [r["wall_s"] for r in par if r["jobs"] == 1]
    wk = [r["wall_s"] for r in par if r["jobs"] == K]
    m1, mk = sum(w1) / len(w1), sum(wk) / len(wk)
    c1 = sum(r["cpu_s"] for r in par if r["jobs"] == 1) / len(w1)
    ck = sum(r["cpu_s"] for r in par if r["jobs"] == K) / len(wk)
    others = sum(r["others_cores"] for r in par) / len(par)
    lines += [
        "",
        f"Mean wall time: {m1:.1f} s with --jobs 1, {mk:.1f} s with --jobs {K}: {m1 / mk:.2f}x "
        f"({'faster' if mk < m1 else 'slower'} with {K} workers; ideal {K}x on {K} idle cores). Other processes "
        f"kept {others:.2f} of the {doc['cores']} cores busy on average, so the ratio is noisy. "
        f"CPU time: {c1:.1f} s with --jobs 1, {ck:.1f} s with --jobs {K} (each worker process imports torch and "
        "loads the data set again).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "m2mkd_mnist.yaml"))
    p.add_argument("--bench", default=str(ROOT / "runs" / "m2mkd_bench"), help="benchmarks/m2mkd.py's --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--repeats", type=int, default=2, help="wall-time runs per --jobs setting (order 1, K, K, 1, ...)")
    p.add_argument("--out", default=str(ROOT / "runs" / "m2mkd_practical"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        Path(args.child.replace(".json", ".out.json")).write_text(json.dumps(child(spec)))
        return 0

    import torch

    from m2mkd_regime import memory_rows
    from modulemesh.checkpoint import read_manifest
    from modulemesh.config import load_config
    from modulemesh.distill.m2mkd import M2MKD, M2MKDConfig
    from modulemesh.io import atomic_write_json
    from publish import publish

    torch.set_num_threads(1)
    bench, out = Path(args.bench), Path(args.out)
    base = load_config(M2MKDConfig, args.config, args.overrides)
    teacher = bench / "teacher" / "teacher"
    if not (bench / "teacher" / "teacher.json").exists():  # as benchmarks/m2mkd.py would train it
        M2MKD(base, bench / "teacher", seed=0, device="cpu", log=print).train_teacher()
    cfg = base.model_copy(update={"teacher": base.teacher.model_copy(update={"path": str(teacher)})})
    up = M2MKD(cfg, bench / f"seed{args.seed}", seed=args.seed, device="cpu", log=print)
    up.run_meta()
    up.run_teacher(jobs=1)

    def fresh(name: str) -> Path:
        d = out / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for part in UPSTREAM:
            src = up.out / part
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, d / part)
        return d

    memory = {}
    for job, name in [*((str(i), f"module {i} job") for i in range(up.K)), ("kd", "whole-model KD")]:
        spec = {
            "config": json.loads(cfg.model_dump_json()),
            "dir": str(fresh(f"mem_{job}")),
            "seed": args.seed,
            "job": job,
        }
        memory[name] = run_child(spec, out)
        print(f"{name}: {memory[name]}", flush=True)
    tensors = memory_rows(up)

    sets = [a for o in args.overrides for a in ("--set", o)]
    stage = ["m2mkd", os.path.relpath(args.config, ROOT), "--teacher", str(teacher), *sets]
    stage += ["--stage", "modules", "--seed", str(args.seed), "--quiet", "--device", "cpu"]
    parallel = []
    order = []
    for r in range(args.repeats):
        order += [1, up.K] if r % 2 == 0 else [up.K, 1]
    for n, jobs in enumerate(order):
        d = fresh(f"stage_{n}_jobs{jobs}")
        cmd = [sys.executable, "-c", "import sys; from modulemesh.cli import main; sys.exit(main())"]
        r = timed_stage(cmd + stage + ["--jobs", str(jobs), "--out", str(d)])
        r["jobs"] = jobs
        made = M2MKD(cfg, d, seed=args.seed)
        r["module_seconds"] = [read_manifest(made.student_module_path(i))["train"]["seconds"] for i in range(up.K)]
        print(f"modules stage, --jobs {jobs}: {r}", flush=True)
        parallel.append(r)

    doc = {
        "command": " ".join(["python", "benchmarks/m2mkd_practical.py", *(argv if argv is not None else sys.argv[1:])]),
        "stage_command": " ".join(["modulemesh", *stage[: stage.index("--stage")], "--stage modules --jobs N"]),
        "upstream": str(up.out),
        "seed": args.seed,
        "data": up.data["name"],
        "modules": up.K,
        "batch_size": cfg.optim.batch_size,
        "student": json.dumps(up.student_spec()),
        "cores": os.cpu_count(),
        "memory": memory,
        "tensors": tensors,
        "parallel": parallel,
    }
    atomic_write_json(out / "practical.json", doc)
    md = render(doc)
    print(md)
    publish(
        "m2mkd_practical", "m2mKD's practical gains: memory of one module job, wall time of K parallel jobs", md, argv
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
