"""Benchmark: m2mKD in the paper's regime: modules learnt on a large source set, the end-to-end phase on a small target.

    python benchmarks/m2mkd_regime.py                 # MNIST, seeds 0 1 2, target 2% / 10% / 100%, meta 60 / 300 steps

The teacher (trained once, shared by every seed, as in benchmarks/m2mkd.py), the meta model and
the teacher modules learn on the whole training set (the source); student modules are distilled
on it too. Only the end-to-end phase (the assembled student's fine-tune) and its end-to-end twin
(the same network, the same number of student steps, from scratch) train on the target set:
``target.fraction`` of the training set (one subset, the same for every seed). Swept: the target
fraction and the meta model's quality (its training steps). Also measured, for one seed: the
training memory of one module job against whole-model KD, and the module stage's wall time with
K worker processes against one. Writes OUT/regime.json and benchmarks/results/m2mkd_regime.md
(from that JSON).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from m2mkd_regime_report import render
from publish import publish

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = ("meta.json", "meta.safetensors", "teacher_modules", "modules")


def copy_upstream(src: Path, dst: Path, parts=UPSTREAM) -> None:
    """Give a run directory the finished upstream stages of another (their hashes make them reused)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in parts:
        s, d = src / name, dst / name
        if d.exists():
            continue
        if s.is_dir():
            shutil.copytree(s, d)
        elif s.exists():
            shutil.copy2(s, d)


def training_memory(model, params_trained, loss_fn, xb, yb) -> dict:
    """Bytes one training step holds: every parameter, gradients and two AdamW moments of the trained ones,
    and the activations autograd saves for the backward pass of one batch (counted through
    ``saved_tensors_hooks``, each storage once)."""
    import torch

    seen, saved = set(), [0]

    def pack(t):
        try:
            key = t.untyped_storage().data_ptr()
        except RuntimeError:
            key = id(t)
        if key not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(key)
            saved[0] += t.untyped_storage().nbytes()
        return t

    trained = {id(p) for p in params_trained}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(xb, yb)
    loss.backward()
    all_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    trained_bytes = sum(p.numel() * p.element_size() for p in params_trained)
    return {
        "parameters_bytes": all_bytes,
        "trained_parameters": sum(p.numel() for p in params_trained),
        "grad_and_adam_bytes": 3 * trained_bytes,
        "activation_bytes": saved[0],
        "total_bytes": all_bytes + 3 * trained_bytes + saved[0],
    }


def memory_rows(run) -> dict:
    """One module job (student module i inside the frozen meta model, teacher hybrid frozen) against
    whole-model KD (the whole student trained, the whole teacher frozen), one batch of optim.batch_size."""
    import torch

    from modulemesh.data.scenarios import as_float
    from modulemesh.distill.models import Hybrid, cut
    from modulemesh.training.losses import kd_loss

    d, cfg = run.data, run.cfg
    xb = as_float(d["x_train"][: cfg.optim.batch_size])
    yb = d["y_train"][: cfg.optim.batch_size]
    meta, mm = run.load_meta()
    teacher, _ = run.load_teacher()
    out = {}
    for i in range(run.K):
        t_module, _ = run.load_teacher_module(i, mm["sha256"])
        student = run.build_student()
        module = student.parts[i]
        segs = cut(meta, run.K)
        s_h, t_h = Hybrid(segs, i, module), Hybrid(segs, i, t_module)
        holder = torch.nn.ModuleList([s_h, t_h])

        def loss_fn(x, y, s_h=s_h, t_h=t_h):
            with torch.no_grad():
                t = t_h(x)
            return kd_loss(s_h(x), t, y, alpha=cfg.distill.alpha, T=cfg.distill.temperature)

        out[f"module {i} job"] = training_memory(holder, list(module.parameters()), loss_fn, xb, yb)
    student = run.build_student()
    holder = torch.nn.ModuleList([student, teacher])

    def kd_fn(x, y):
        with torch.no_grad():
            t = teacher(x)
        return kd_loss(student(x), t, y, alpha=cfg.distill.alpha, T=cfg.distill.temperature)

    out["whole-model KD"] = training_memory(holder, list(student.parameters()), kd_fn, xb, yb)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "m2mkd_mnist.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.02, 0.1, 1.0])
    p.add_argument("--meta-steps", type=int, nargs="+", default=[60, 300], help="meta model qualities to sweep")
    p.add_argument("--teacher-seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-parallel", action="store_true", help="skip the K-worker wall-time measurement")
    p.add_argument(
        "--equal-total",
        type=float,
        nargs="*",
        default=[0.02],
        help="target fractions where the end-to-end twin is also trained for every student step m2mKD spent "
        "(K x distill.steps + finetune, modules included)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "runs" / "m2mkd_regime"))
    args = p.parse_args(argv)

    import torch

    from modulemesh.checkpoint import read_manifest
    from modulemesh.config import load_config
    from modulemesh.distill.m2mkd import M2MKD, M2MKDConfig
    from modulemesh.io import atomic_write_json

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    base = load_config(M2MKDConfig, args.config, args.overrides)
    base = base.model_copy(update={"baselines": base.baselines.model_copy(update={"kd": False})})
    t0 = time.perf_counter()
    tm = M2MKD(base, out / "teacher", seed=args.teacher_seed, log=print).train_teacher()
    teacher_path = str(out / "teacher" / "teacher")
    print(f"teacher: {100 * tm['eval']['iid']:.2f}% IID ({time.perf_counter() - t0:.0f} s incl. reuse)", flush=True)
    base = base.model_copy(update={"teacher": base.teacher.model_copy(update={"path": teacher_path})})

    def with_(cfg, meta_steps=None, fraction=None):
        upd = {}
        if meta_steps is not None:
            upd["meta"] = cfg.meta.model_copy(update={"steps": meta_steps})
        if fraction is not None:
            upd["target"] = cfg.target.model_copy(update={"fraction": fraction})
        return cfg.model_copy(update=upd)

    results: list[dict] = []
    timing: dict = {}

    def write(partial: bool) -> None:
        """JSON and markdown from what is done so far (after every seed and meta level, so an interrupted
        sweep still leaves its finished part, marked as such)."""
        done_seeds = sorted({r["seed"] for r in results})
        doc = {
            "command": " ".join(
                ["python", "benchmarks/m2mkd_regime.py", *(argv if argv is not None else sys.argv[1:])]
            ),
            "config": json.loads(base.model_dump_json()),
            "teacher": tm["eval"],
            "seeds": done_seeds if partial else args.seeds,
            "planned_seeds": args.seeds,
            "partial": partial,
            "fractions": args.fractions,
            "meta_steps": args.meta_steps,
            "results": results,
            "costs": timing,
        }
        atomic_write_json(out / "regime.json", doc)
        md = render(doc)
        if not partial:
            print(md)
        publish("m2mkd_regime", "m2mKD in the paper's regime: source-trained modules, small target set", md, argv)

    for seed in args.seeds:
        for ms in args.meta_steps:
            cfg = with_(base, meta_steps=ms, fraction=1.0)
            up = out / f"seed{seed}" / f"meta{ms}" / "upstream"

            def log(text, seed=seed, ms=ms):
                print(f"[seed {seed} meta {ms}] {text}", flush=True)

            run = M2MKD(cfg, up, seed=seed, log=log)
            run.run_meta()
            run.run_teacher(jobs=1)
            run.run_modules(jobs=1)
            meta_m = read_manifest(run.meta_path)
            mods = [read_manifest(run.student_module_path(i)) for i in range(run.K)]
            tmods = [read_manifest(run.teacher_module_path(i)) for i in range(run.K)]
            if seed == args.seeds[0] and ms == max(args.meta_steps):
                timing["memory"] = memory_rows(run)
                timing["module_seconds"] = [m["train"]["seconds"] for m in mods]
                par = out / f"seed{seed}" / f"meta{ms}" / "parallel"
                done = par / "timing.json"
                if done.exists():  # measured by an earlier invocation (a rerun reuses every stage)
                    timing.update(json.loads(done.read_text()))
                elif not args.no_parallel:
                    # Both timed here, back to back from the same upstream files, so the ratio is
                    # measured under the same machine load (the stage above may have been reused).
                    for name, jobs in (("serial", 1), ("parallel", run.K)):
                        d = out / f"seed{seed}" / f"meta{ms}" / name
                        shutil.rmtree(d, ignore_errors=True)
                        copy_upstream(up, d, ("meta.json", "meta.safetensors", "teacher_modules"))
                        start = time.perf_counter()
                        M2MKD(cfg, d, seed=seed).run_modules(jobs=jobs)
                        timing[f"modules_{name}_s"] = time.perf_counter() - start
                    timing["jobs"] = run.K
                    keep = ("modules_serial_s", "module_seconds", "modules_parallel_s", "jobs")
                    atomic_write_json(done, {k: timing[k] for k in keep})
            for frac in args.fractions:
                cfg_f = with_(cfg, fraction=frac)
                fdir = out / f"seed{seed}" / f"meta{ms}" / f"target{frac:g}"
                copy_upstream(up, fdir)
                rf = M2MKD(cfg_f, fdir, seed=seed, log=log)
                sm = rf.run_assemble()
                # The end-to-end twin does not depend on the meta model: trained once per seed and fraction.
                bdir = out / f"seed{seed}" / f"e2e_target{frac:g}"
                bm = M2MKD(cfg_f, bdir, seed=seed, log=log).run_baselines()["e2e"]
                total = None
                if frac in args.equal_total:
                    steps = run.K * cfg.distill.steps + cfg.assemble.finetune_steps
                    cfg_t = cfg_f.model_copy(update={"baselines": cfg_f.baselines.model_copy(update={"steps": steps})})
                    tdir = out / f"seed{seed}" / f"e2e_total_target{frac:g}"
                    total = M2MKD(cfg_t, tdir, seed=seed, log=log).run_baselines()["e2e"]
                results.append(
                    {
                        "seed": seed,
                        "meta_steps": ms,
                        "fraction": frac,
                        "n_target": len(rf.target_rows()) if rf.target_rows() is not None else rf.data["n_train"],
                        "meta": meta_m["eval"],
                        "teacher_hybrid": [m["hybrid_accuracy"] for m in tmods],
                        "student_hybrid": [m["hybrid_accuracy"] for m in mods],
                        "assembled": sm["assembled_eval"],
                        "calibration": sm.get("calibration"),
                        "m2mkd": sm["eval"],
                        "e2e": bm["eval"],
                        "e2e_total": None
                        if total is None
                        else {"eval": total["eval"], "steps": total["train"]["steps"]},
                        "student_steps": rf.student_budget(),
                        "seconds": {"assemble": sm["train"]["seconds"], "e2e": bm["train"]["seconds"]},
                    }
                )
                log(
                    f"target {frac:g}: m2mKD {sm['eval']['iid']:.2%} / OOD {sm['eval']['ood_mean']:.2%}, "
                    f"end-to-end {bm['eval']['iid']:.2%} / OOD {bm['eval']['ood_mean']:.2%}"
                )
            write(partial=True)
    write(partial=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
