"""m2mKD's independent module jobs, run in this process or in worker processes (``training.pool``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ...checkpoint import module_paths, read_manifest
from ...config import to_dict
from ...training.pool import WorkerPool, report

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import M2MKD


def job_worker(payload: dict[str, Any]) -> dict[str, Any]:
    """Entry point of one module job in a worker process (``training.pool``: one torch thread)."""
    from .config import M2MKDConfig
    from .pipeline import M2MKD

    index = payload["index"]
    cfg = M2MKDConfig.model_validate(payload["config"])
    run = M2MKD(cfg, payload["out"], seed=payload["seed"], device=payload["device"], cache_dir=payload["cache_dir"])

    def on_step(step: int) -> None:
        if step % 10 == 0:
            report(index, step)

    start = time.perf_counter()
    m = run.make_teacher_module(index, on_step) if payload["kind"] == "teacher" else run.distill_module(index, on_step)
    return {"index": index, "manifest": m, "seconds": time.perf_counter() - start}


def run_jobs(run: "M2MKD", kind: str, indices: Sequence[int], jobs: int = 1) -> list[dict[str, Any]]:
    """Run module jobs (``teacher``: fit teacher modules; ``student``: m2mKD) serially or in ``jobs`` processes."""
    indices = list(indices)
    if kind == "teacher":
        t = run.cfg.teacher
        incubate = not t.path and t.train == "incubate"
        teacher_steps = t.incubate_steps if incubate else (t.adapt_steps if t.adapt != "none" else 0)

        def steps_of(i: int) -> int:
            return teacher_steps

        work, label = run.make_teacher_module, "teacher module {} in meta"
        key_of = run.teacher_module_key
        path_of = run.teacher_module_path
    elif run.cfg.distill.prefix == "student":
        # Module i reads modules 0..i-1: in order, in this process; distill_module reuses a module
        # only when its inputs, the modules before it included, are unchanged.
        out = []
        for i in sorted(indices):
            start = time.perf_counter()
            m = run.distill_module(i, run.progress(f"m2mKD student module {i}", run.cfg.distill.steps))
            out.append({"index": i, "manifest": m, "seconds": time.perf_counter() - start})
            run.log(f"m2mKD student module {i}: hybrid accuracy {m['hybrid_accuracy']:.2%}")
        return out
    else:
        work, label = run.distill_module, "m2mKD student module {}"
        meta_m = read_manifest(run.meta_path)

        def steps_of(i: int) -> int:
            return run.cfg.distill.steps

        def key_of(i: int) -> str:
            return run.student_module_key(i, read_manifest(run.teacher_module_path(i))["sha256"], meta_m["sha256"])

        path_of = run.student_module_path
    todo = [i for i in indices if run.existing(path_of(i), key_of(i)) is None]
    for i in indices:
        if i not in todo:
            run.log(f"{label.format(i)}: reusing {module_paths(path_of(i))[1]}")
    results = {i: {"index": i, "manifest": read_manifest(path_of(i)), "reused": True} for i in indices if i not in todo}
    if jobs <= 1 or len(todo) <= 1:
        for i in todo:
            start = time.perf_counter()
            m = work(i, run.progress(label.format(i), steps_of(i)))
            results[i] = {"index": i, "manifest": m, "seconds": time.perf_counter() - start}
    else:
        results.update(run_parallel(run, kind, todo, jobs, label, steps_of))
    for i in indices:
        m = results[i]["manifest"]
        if "hybrid_accuracy" in m and not results[i].get("reused"):
            run.log(f"{label.format(i)}: hybrid accuracy {m['hybrid_accuracy']:.2%}")
    return [results[i] for i in indices]


def run_parallel(
    run: "M2MKD", kind: str, todo: list[int], jobs: int, label: str, steps_of: Callable[[int], int]
) -> dict[int, dict[str, Any]]:
    bars = {i: run.progress(label.format(i), steps_of(i)) for i in todo}
    results: dict[int, dict[str, Any]] = {}
    base = {
        "kind": kind,
        "config": to_dict(run.cfg),
        "out": str(run.out),
        "seed": run.seed,
        "device": str(run.device),
        "cache_dir": str(run.cache_dir),
    }
    with WorkerPool(min(jobs, len(todo)), progress=True) as pool:
        futures = {pool.submit(job_worker, {**base, "index": i}): i for i in todo}
        for f in pool.as_completed(futures, on_message=lambda i, step: bars[i](step)):
            i = futures[f]
            results[i] = f.result()  # re-raises a worker's ModuleMeshError with its message
            bars[i](steps_of(i))
    return results
