"""The markdown of benchmarks/m2mkd_regime.py, rendered from its JSON (``python benchmarks/m2mkd_regime_report.py
OUT/regime.json`` prints it again without rerunning anything)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def ms(values: list[float], scale: float = 100.0) -> str:
    v = [scale * x for x in values]
    return f"{statistics.fmean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.2f}"


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def render(doc: dict) -> str:
    res, seeds = doc["results"], doc["seeds"]
    cfg = doc["config"]
    groups: dict[tuple, list[dict]] = {}
    for r in res:
        groups.setdefault((r["meta_steps"], r["fraction"]), []).append(r)
    note = []
    if doc.get("partial"):
        note = [
            f"**Interrupted sweep**: planned seeds {doc['planned_seeds']}; the rows below hold the seeds finished "
            "for each (meta steps, target) pair (the wins column says how many).",
            "",
        ]
    lines = note + [
        f"Source: the whole {cfg['data']['name']} training set (teacher, meta model, teacher and student modules). "
        f"Target: `target.fraction` of it (one subset for every seed) for the end-to-end phase: the assembled "
        f"student's {cfg['assemble']['finetune_steps']}-step fine-tune, and the end-to-end twin (same network, "
        f"{res[0]['student_steps']} steps on the target set, from scratch; m2mKD's K modules took "
        f"{cfg['distill']['steps']} steps each on the source set before, an upstream cost like the meta model). "
        f"Seeds {seeds}; full test set (IID) and its shifted copies {cfg['eval']['ood']} (OOD, "
        f"mean). Teacher (shared): {100 * doc['teacher']['iid']:.2f}% IID, {100 * doc['teacher']['ood_mean']:.2f}% "
        "OOD. Mean ± std over seeds; Δ = m2mKD - end-to-end in points, wins = seeds where m2mKD is ahead.",
        "",
        "| meta steps | target | meta IID | worst student hybrid | assembled, no FT | m2mKD IID | end-to-end IID "
        "| Δ IID (wins) | m2mKD OOD | end-to-end OOD | Δ OOD (wins) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    winners, best = [], None
    for (meta_steps, frac), rs in sorted(groups.items()):
        d_iid = [r["m2mkd"]["iid"] - r["e2e"]["iid"] for r in rs]
        d_ood = [r["m2mkd"]["ood_mean"] - r["e2e"]["ood_mean"] for r in rs]
        wi, wo = sum(d > 0 for d in d_iid), sum(d > 0 for d in d_ood)
        if wi == len(rs) == len(doc.get("planned_seeds", seeds)) and wo == len(rs):
            winners.append((meta_steps, frac))
        score = min(statistics.fmean(d_iid), statistics.fmean(d_ood))
        if best is None or score > best[0]:
            best = (score, meta_steps, frac, statistics.fmean(d_iid), statistics.fmean(d_ood))
        lines.append(
            f"| {meta_steps} | {100 * frac:g}% ({rs[0]['n_target']}) | {ms([r['meta']['iid'] for r in rs])} "
            f"| {ms([min(r['student_hybrid']) for r in rs])} | {ms([r['assembled']['iid'] for r in rs])} "
            f"| {ms([r['m2mkd']['iid'] for r in rs])} | {ms([r['e2e']['iid'] for r in rs])} "
            f"| {ms(d_iid)} ({wi}/{len(rs)}) | {ms([r['m2mkd']['ood_mean'] for r in rs])} "
            f"| {ms([r['e2e']['ood_mean'] for r in rs])} | {ms(d_ood)} ({wo}/{len(rs)}) |"
        )
    lines.append("")
    if winners:
        lines.append(
            "- m2mKD beats its end-to-end twin on IID and OOD accuracy in every seed at (meta steps, target): "
            + ", ".join(f"({m}, {100 * f:g}%)" for m, f in winners)
        )
    else:
        lines.append("- no swept regime where m2mKD beats its end-to-end twin on IID and OOD accuracy in every seed")
    if best:
        lines.append(
            f"- closest regime (largest worse-of-two mean Δ): meta {best[1]} steps, target {100 * best[2]:g}%: "
            f"Δ IID {100 * best[3]:+.2f}, Δ OOD {100 * best[4]:+.2f} points"
        )
    totals = [r for r in res if r.get("e2e_total")]
    if totals:
        lines += [
            "",
            "The end-to-end twin again, trained for every student step m2mKD spent, modules included "
            f"({totals[0]['e2e_total']['steps']} steps on the target set):",
            "",
            "| meta steps | target | m2mKD IID | end-to-end IID | Δ IID (wins) | m2mKD OOD | end-to-end OOD "
            "| Δ OOD (wins) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        tg: dict[tuple, list[dict]] = {}
        for r in totals:
            tg.setdefault((r["meta_steps"], r["fraction"]), []).append(r)
        for (meta_steps, frac), rs in sorted(tg.items()):
            d_iid = [r["m2mkd"]["iid"] - r["e2e_total"]["eval"]["iid"] for r in rs]
            d_ood = [r["m2mkd"]["ood_mean"] - r["e2e_total"]["eval"]["ood_mean"] for r in rs]
            lines.append(
                f"| {meta_steps} | {100 * frac:g}% | {ms([r['m2mkd']['iid'] for r in rs])} "
                f"| {ms([r['e2e_total']['eval']['iid'] for r in rs])} | {ms(d_iid)} ({sum(d > 0 for d in d_iid)}/"
                f"{len(rs)}) | {ms([r['m2mkd']['ood_mean'] for r in rs])} "
                f"| {ms([r['e2e_total']['eval']['ood_mean'] for r in rs])} | {ms(d_ood)} "
                f"({sum(d > 0 for d in d_ood)}/{len(rs)}) |"
            )
    costs = doc.get("costs") or {}
    if costs.get("memory"):
        lines += [
            "",
            f"Training memory of one step (batch {cfg['optim']['batch_size']}, seed {seeds[0]}, "
            f"meta {max(doc['meta_steps'])} steps): every parameter held, gradients + two AdamW moments of the "
            "trained ones, activations autograd saves (counted by `saved_tensors_hooks`). In MiB.",
            "",
            "| job | trained parameters | parameters | grads + AdamW | saved activations | total |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, m in costs["memory"].items():
            lines.append(
                f"| {name} | {m['trained_parameters']:,} | {_mib(m['parameters_bytes'])} "
                f"| {_mib(m['grad_and_adam_bytes'])} | {_mib(m['activation_bytes'])} | {_mib(m['total_bytes'])} |"
            )
        kd = costs["memory"]["whole-model KD"]["total_bytes"]
        worst = max(m["total_bytes"] for k, m in costs["memory"].items() if k != "whole-model KD")
        lines.append("")
        lines.append(f"- largest module job / whole-model KD: {worst / kd:.2f}x")
    if costs.get("modules_parallel_s"):
        lines.append(
            f"- module stage wall time: {costs['modules_serial_s']:.1f} s with one process, "
            f"{costs['modules_parallel_s']:.1f} s with {costs['jobs']} worker processes "
            f"({costs['modules_serial_s'] / costs['modules_parallel_s']:.2f}x; per-module training "
            f"{', '.join(f'{s:.1f}' for s in costs['module_seconds'])} s; on a 2-core machine shared with other jobs)"
        )
    cal = [b for r in res for b in ((r.get("calibration") or {}).get("boundaries") or [])]
    if cal and all(b.get("r2_after") is not None for b in cal):
        lines.append(
            f"- assembly calibration: R² of the tokens handed to the next module against the meta model's, "
            f"{statistics.fmean(b['r2_before'] for b in cal):.3f} before, "
            f"{statistics.fmean(b['r2_after'] for b in cal):.3f} after (mean over boundaries and runs)"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    """``m2mkd_regime_report.py OUT/regime.json [--publish]``: print the table again (and rewrite
    benchmarks/results/m2mkd_regime.md, naming the command that computed the JSON)."""
    import os
    import platform

    import torch

    from modulemesh.io import atomic_write_text

    doc = json.loads(Path(argv[0]).read_text())
    md = render(doc)
    print(md)
    if "--publish" in argv:
        header = (
            "# m2mKD in the paper's regime: source-trained modules, small target set\n\n"
            f"Written by `{doc['command']}` (torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores; "
            "the table rendered from its JSON by "
            "`python benchmarks/m2mkd_regime_report.py OUT/regime.json --publish`).\n\n"
        )
        atomic_write_text(Path(__file__).resolve().parent / "results" / "m2mkd_regime.md", header + md)


if __name__ == "__main__":
    main(sys.argv[1:])
