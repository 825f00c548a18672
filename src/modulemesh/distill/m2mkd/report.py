"""The m2mKD report: every arm's IID and OOD accuracy, parameters, FLOPs and wall time per stage.

``build_summary(run)`` reads the manifests an ``M2MKD`` run wrote (re-evaluating a model only when
its stored evaluation was made on other data or OOD sets), and ``write_report(out, summary)``
writes ``report.md``, ``report.csv``, ``report.json`` and ``m2mkd.png`` atomically.

Step accounting: a *student step* is one optimizer step on one minibatch that updates student
parameters. m2mKD spends ``K * distill.steps`` of them on modules (each updates one module and its
stitches) plus ``assemble.finetune_steps`` on the assembled student; both baselines get the same
number of steps on the whole student. The meta model, the teacher and the teacher modules'
fitting are upstream costs, reported separately in steps, FLOPs and seconds.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ...checkpoint import module_paths, read_manifest
from ...io import atomic_save, atomic_write_json, atomic_write_text
from ...tables import markdown_table

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import M2MKD


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _g(v: Optional[float]) -> str:
    return "-" if not v else f"{v / 1e9:.3g}"


def _stage(stage: str, what: str, train: Optional[dict[str, Any]], jobs: Optional[int] = None) -> dict[str, Any]:
    train = train or {}
    return {
        "stage": stage,
        "what": what,
        "steps": int(train.get("steps", 0)),
        "flops": float(train.get("train_flops", 0.0)),
        "seconds": float(train.get("seconds", 0.0)),
        "jobs": jobs,
    }


def _fresh_eval(run: "M2MKD", manifest: dict[str, Any], load) -> dict[str, Any]:
    ev = manifest.get("eval")
    if ev and ev.get("key") == run.eval_key():
        return ev
    return run.eval_all(load())


def build_summary(run: "M2MKD") -> dict[str, Any]:
    from ..models import count_parameters

    cfg, K = run.cfg, run.K
    d = run.data
    meta, meta_m = run.load_meta()
    teacher, teacher_m = run.load_teacher()
    stages: list[dict[str, Any]] = []
    models: dict[str, Any] = {}

    models["teacher"] = {
        "label": "teacher",
        "spec": teacher_m["spec"],
        "parameters": count_parameters(teacher),
        "eval": _fresh_eval(run, teacher_m, lambda: teacher),
        "path": str(module_paths(run.teacher_path)[1]),
    }
    models["meta"] = {
        "label": f"meta model ({K} blocks)",
        "spec": meta_m["spec"],
        "parameters": count_parameters(meta),
        "eval": _fresh_eval(run, meta_m, lambda: meta),
    }
    stages.append(_stage("meta", f"meta model, {K} blocks", meta_m.get("train")))
    if not cfg.teacher.path and teacher_m.get("train"):
        what = "teacher fine-tune after incubation" if teacher_m.get("how") == "incubate" else "teacher, end to end"
        stages.append(_stage("teacher", what, teacher_m.get("train")))
    teacher_modules = []
    for i in range(K):
        tm = read_manifest(run.teacher_module_path(i))
        teacher_modules.append(
            {"index": i, "mode": tm.get("mode"), "hybrid_accuracy": tm.get("hybrid_accuracy"), "train": tm.get("train")}
        )
        mode = {
            "incubate_scratch": "incubated from scratch",
            "stitch": "stitches fitted",
            "incubate": "incubated",
            "none": "plugged in",
        }
        stages.append(
            _stage(
                "teacher",
                f"teacher module {i} in meta ({mode.get(tm.get('mode'), tm.get('mode'))})",
                tm.get("train"),
                cfg.jobs,
            )
        )

    arms: dict[str, Any] = {}
    budget = run.student_budget()
    upstream_m2mkd = sum(
        s["flops"] for s in stages if s["stage"] in ("meta",) or s["what"].startswith("teacher module")
    )
    teacher_flops = sum(
        s["flops"] for s in stages if s["stage"] == "teacher" and not s["what"].startswith("teacher module")
    )
    modules = []
    if module_paths(run.student_path)[1].exists():
        sm = run.student_view(run.student_path)

        def load_student():
            return run.load_student_net(run.student_path)

        for entry in sm.get("modules", []):
            i = entry["index"]
            modules.append(
                {
                    "index": i,
                    "student_hybrid_accuracy": entry.get("hybrid_accuracy"),
                    "teacher_hybrid_accuracy": teacher_modules[i]["hybrid_accuracy"],
                    "train": entry.get("train"),
                }
            )
            stages.append(_stage("modules", f"m2mKD student module {i}", entry.get("train"), cfg.jobs))
        stages.append(_stage("assemble", "fine-tune assembled student", sm.get("train")))
        module_flops = sum(s["flops"] for s in stages if s["stage"] == "modules")
        module_secs = sum(s["seconds"] for s in stages if s["stage"] == "modules")
        ft = sm.get("train") or {}
        arms["m2mkd_assembled"] = {
            "label": "m2mKD, assembled (no fine-tune)",
            "student_steps": K * cfg.distill.steps,
            "eval": sm.get("assembled_eval"),
            "parameters": sm.get("parameters"),
            "inference_flops": sm.get("inference_flops"),
            "train_flops": module_flops,
            "upstream_flops": upstream_m2mkd + teacher_flops,
            "seconds": module_secs,
        }
        arms["m2mkd"] = {
            "label": "m2mKD (assembled + fine-tune)",
            "student_steps": K * cfg.distill.steps + int(ft.get("steps", 0)),
            "eval": _fresh_eval(run, sm, load_student),
            "parameters": sm.get("parameters"),
            "inference_flops": sm.get("inference_flops"),
            "train_flops": module_flops + float(ft.get("train_flops", 0.0)),
            "upstream_flops": upstream_m2mkd + teacher_flops,
            "seconds": module_secs + float(ft.get("seconds", 0.0)),
            "fold": sm.get("fold"),
        }
    for arm, label in (("e2e", "end-to-end (same student)"), ("kd", "whole-model KD (same student)")):
        path = run.baseline_path(arm)
        if not module_paths(path)[1].exists():
            continue
        bm = run.student_view(path)

        def load_baseline(path=path):
            return run.load_student_net(path)

        tr = bm.get("train") or {}
        stages.append(_stage("baselines", f"baseline: {label}", tr))
        arms[arm] = {
            "label": label,
            "student_steps": int(tr.get("steps", 0)),
            "eval": _fresh_eval(run, bm, load_baseline),
            "parameters": bm.get("parameters"),
            "inference_flops": bm.get("inference_flops"),
            "train_flops": float(tr.get("train_flops", 0.0)),
            "upstream_flops": teacher_flops if arm == "kd" else 0.0,
            "seconds": float(tr.get("seconds", 0.0)),
        }
    missing = [a for a in ("m2mkd", "e2e", "kd") if a not in arms]
    comparisons = {}
    if "m2mkd" in arms:
        for base in ("e2e", "kd"):
            if base in arms:
                a, b = arms["m2mkd"]["eval"], arms[base]["eval"]
                ood = (a["ood_mean"] - b["ood_mean"]) if a.get("ood_mean") is not None else None
                comparisons[f"m2mkd_minus_{base}"] = {"iid": a["iid"] - b["iid"], "ood_mean": ood}
    return {
        "data": d["name"],
        "n_train": d["n_train"],
        "n_test": d["n_test"],
        "seed": run.seed,
        "device": str(run.device),
        "modules": K,
        "jobs": cfg.jobs,
        "ood_sets": list(cfg.eval.ood),
        "specs": {"teacher": teacher_m["spec"], "meta": meta_m["spec"], "student": run.student_spec()},
        "stitches": cfg.assemble.stitches,
        "budget": {
            "student_steps_per_arm": budget,
            "module_steps": cfg.distill.steps,
            "finetune_steps": cfg.assemble.finetune_steps,
            "accounting": (
                f"every arm updates the student for {budget} optimizer steps of batch "
                f"{cfg.optim.batch_size}: m2mKD spends "
                f"{K} x {cfg.distill.steps} on single modules (plus stitches) and "
                f"{cfg.assemble.finetune_steps} on the "
                "assembled student; the baselines spend all of them on the whole student. Meta "
                "model, teacher and "
                "teacher-module fitting are upstream costs (upstream FLOPs)."
            ),
        },
        "models": models,
        "arms": arms,
        "missing_arms": missing,
        "comparisons": comparisons,
        "teacher_modules": teacher_modules,
        "student_modules": modules,
        "stages": stages,
        "config": json.loads(json.dumps(run.cfg.model_dump(mode="json"))),
    }


def arm_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    ood = summary["ood_sets"]
    entries = [("teacher", summary["models"]["teacher"], None), ("meta", summary["models"]["meta"], None)]
    entries += [
        (k, summary["arms"][k], True) for k in ("m2mkd_assembled", "m2mkd", "e2e", "kd") if k in summary["arms"]
    ]
    for key, e, is_arm in entries:
        ev = e.get("eval") or {}
        row = {
            "model": e["label"],
            "student steps": e.get("student_steps", "-") if is_arm else "-",
            "IID acc (%)": _pct(ev.get("iid")),
            "OOD acc (%)": _pct(ev.get("ood_mean")),
        }
        for name in ood:
            row[f"{name} (%)"] = _pct((ev.get("ood") or {}).get(name))
        row["params"] = f"{e.get('parameters') or 0:,}"
        row["train GFLOPs"] = _g(e.get("train_flops")) if is_arm else "-"
        row["upstream GFLOPs"] = _g(e.get("upstream_flops")) if is_arm else "-"
        row["train s"] = f"{e['seconds']:.1f}" if is_arm else "-"
        rows.append(row)
    return rows


def write_report(out: str | Path, summary: dict[str, Any]) -> None:
    out = Path(out)
    rows = arm_rows(summary)
    stage_rows = [
        {
            "stage": s["stage"],
            "what": s["what"],
            "steps": s["steps"],
            "GFLOPs": _g(s["flops"]),
            "seconds": f"{s['seconds']:.1f}",
        }
        for s in summary["stages"]
    ]
    module_rows = [
        {
            "module": m["index"],
            "teacher hybrid acc (%)": _pct(m["teacher_hybrid_accuracy"]),
            "student hybrid acc (%)": _pct(m["student_hybrid_accuracy"]),
        }
        for m in summary["student_modules"]
    ]
    sp = summary["specs"]
    md = [
        f"# m2mKD report: {summary['data']}\n",
        f"{summary['n_train']} training and {summary['n_test']} test examples; OOD sets: "
        f"{', '.join(summary['ood_sets']) or 'none'}; "
        f"seed {summary['seed']}; device {summary['device']}; K = {summary['modules']} modules; stitches "
        f"{summary['stitches']}.\n",
        f"- teacher: `{json.dumps(sp['teacher'])}`",
        f"- meta model: `{json.dumps(sp['meta'])}`",
        f"- student: `{json.dumps(sp['student'])}`\n",
        "## Accuracy\n",
        markdown_table(rows),
        f"\n{summary['budget']['accounting']}\n",
    ]
    for name, c in summary["comparisons"].items():
        base = name.rsplit("_", 1)[-1]
        ood = "-" if c["ood_mean"] is None else f"{100 * c['ood_mean']:+.2f}"
        md.append(
            f"- m2mKD minus {'end-to-end' if base == 'e2e' else 'whole-model KD'}: IID {100 * c['iid']:+.2f} "
            f"points, OOD {ood} points"
        )
    if summary["missing_arms"]:
        md.append(f"\nNot run yet: {', '.join(summary['missing_arms'])}.")
    if module_rows:
        md += ["\n## Modules inside the meta model\n", markdown_table(module_rows)]
    md += ["\n## Stages\n", markdown_table(stage_rows)]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    atomic_write_json(out / "report.json", summary)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "report.csv", buf.getvalue())
    plot(out / "m2mkd.png", summary)


def plot(path: Path, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    entries = [("teacher", summary["models"]["teacher"]), ("meta", summary["models"]["meta"])]
    short = {"m2mkd_assembled": "m2mKD\n(no FT)", "m2mkd": "m2mKD", "e2e": "end-to-end", "kd": "whole KD"}
    entries += [
        (short[k], summary["arms"][k]) for k in ("m2mkd_assembled", "m2mkd", "e2e", "kd") if k in summary["arms"]
    ]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(entries))
    iid = [100 * (e["eval"] or {}).get("iid", 0) for _, e in entries]
    ood = [100 * ((e["eval"] or {}).get("ood_mean") or 0) for _, e in entries]
    ax.bar(x - 0.2, iid, 0.4, label="IID test")
    ax.bar(x + 0.2, ood, 0.4, label=f"OOD ({', '.join(summary['ood_sets'])})")
    for xi, a, b in zip(x, iid, ood):
        ax.text(xi - 0.2, a + 0.5, f"{a:.1f}", ha="center", fontsize=7)
        ax.text(xi + 0.2, b + 0.5, f"{b:.1f}", ha="center", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels([n for n, _ in entries], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{summary['data']}: {summary['budget']['student_steps_per_arm']} student steps per arm")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    st = summary["stages"]
    ax2.barh(np.arange(len(st)), [s["seconds"] for s in st], color="tab:gray")
    ax2.set_yticks(np.arange(len(st)))
    ax2.set_yticklabels([s["what"] for s in st], fontsize=7)
    ax2.invert_yaxis()
    ax2.set_xlabel("wall time (s)")
    ax2.set_title("stages")
    fig.tight_layout()
    atomic_save(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


__all__ = ["build_summary", "write_report", "arm_rows"]
