"""The Avalanche comparison's table: per-seed JSONs -> one combined JSON -> markdown.

``avalanche_side.py table`` calls ``collect`` (the work directory's ``ours_s<k>.json`` and
``avalanche_s<k>.json``) and ``render``; ``--from-json`` re-renders the committed
``benchmarks/results/vs_avalanche.json`` without the work directory. Every number in the markdown is
computed here from those JSONs (nothing typed).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

# (label, ModuleMesh strategy, Avalanche strategy)
PAIRS = [
    ("Naive / finetune", "finetune", "Naive"),
    ("EWC (online)", "ewc", "EWC"),
    ("LwF", "lwf", "LwF"),
    ("Replay / ER", "er", "Replay"),
    ("DER", "der", "DER"),
]


def collect(work: Path, seeds: int, settings: dict, notes: str = "") -> dict:
    """The seeds' results in one dict (Avalanche's only where every seed ran and no blocker was written)."""
    blocker = (work / "blocker.txt").read_text().strip() if (work / "blocker.txt").exists() else ""
    ours = [json.loads((work / f"ours_s{k}.json").read_text()) for k in range(seeds)]
    ava_files = [work / f"avalanche_s{k}.json" for k in range(seeds)]
    ava = [json.loads(p.read_text()) for p in ava_files] if not blocker and all(p.exists() for p in ava_files) else None
    if not blocker and ava is None:
        blocker = "the Avalanche side left no result for some seed (see the work directory's avalanche_s*.err)"
    return {
        "settings": {k: v for k, v in settings.items() if k != "seed"},
        "seeds": list(range(seeds)),
        "ours": ours,
        "avalanche": ava,
        "blocker": blocker,
        "notes": notes.strip(),
    }


def _ms(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _signed(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:+.2f}"
    return f"{statistics.mean(values):+.2f} ± {statistics.stdev(values):.2f}"


CPU = "train_cpu_s"  # the process's CPU seconds in the training calls: less disturbed by other jobs than wall time


def _per_seed(runs: list[dict], name: str, key: str) -> list[float]:
    return [r["strategies"][name][key] for r in runs]


def render(data: dict) -> str:
    s, seeds, ours, ava = data["settings"], data["seeds"], data["ours"], data["avalanche"]
    n = len(seeds)
    spread = "mean ± sample std over the seeds" if n > 1 else "one seed"
    lines = [
        "# ModuleMesh vs Avalanche on the same Split-MNIST stream",
        "",
        f"Written by `bash benchmarks/vs_avalanche.sh --seeds {n}` (re-render: `python benchmarks/avalanche_side.py "
        "table --from-json benchmarks/results/vs_avalanche.json --md benchmarks/results/vs_avalanche.md`). "
        "Split-MNIST 5x2 class-IL exported from ModuleMesh's scenario code for each seed "
        f"({', '.join(map(str, seeds))}: the seed of the split, of each model's initialization and of the "
        "training order, the same on both sides; 10% of each task held out), the same tensors handed to both "
        f"libraries; MLP 784-100-100-10, SGD lr {s['lr']}, batch {s['batch_size']}, {s['epochs']} epoch per "
        f"task, buffer {s['buffer']}, EWC lambda {s['ewc_lambda']:g} (online, gamma {s['ewc_gamma']:g}), LwF "
        f"alpha {s['lwf_alpha']:g} T {s['lwf_T']:g}, DER alpha {s['der_alpha']:g} (fixed settings, the same on "
        f"both sides, not tuned: this compares implementations, not methods); {spread}; one torch thread each; "
        "training time = the training calls only (after one warm-up optimizer step on each side), evaluation "
        "excluded, in CPU seconds of the process (wall-clock speed-up in the last column). Shared 2-core machine: "
        "wall times are noisy, CPU times less so.",
        "",
    ]
    if ava:
        lines += [
            f"Avalanche {ava[0]['avalanche_version']} on torch {ava[0]['torch_version']}; ModuleMesh on torch "
            f"{ours[0]['torch_version']}.",
            "",
        ]
    lines += [
        "| strategy | Avalanche acc (%) | ModuleMesh acc (%) | Δ acc (points, paired by seed) | Avalanche forgetting "
        "(%) | ModuleMesh forgetting (%) | Avalanche train CPU (s) | ModuleMesh train CPU (s) | speed-up (CPU) | "
        "speed-up (wall) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    both = []
    for label, o_name, a_name in PAIRS:
        if o_name not in ours[0]["strategies"]:
            continue
        o_acc, o_fg = _per_seed(ours, o_name, "average_accuracy"), _per_seed(ours, o_name, "forgetting")
        o_t, o_w = _per_seed(ours, o_name, CPU), _per_seed(ours, o_name, "train_time_s")
        if ava and a_name in ava[0]["strategies"]:
            a_acc, a_fg = _per_seed(ava, a_name, "average_accuracy"), _per_seed(ava, a_name, "forgetting")
            a_t, a_w = _per_seed(ava, a_name, CPU), _per_seed(ava, a_name, "train_time_s")
            delta = [o - a for o, a in zip(o_acc, a_acc)]
            speed = statistics.mean(a_t) / statistics.mean(o_t)
            both.append((label, delta, speed, a_acc, o_acc))
            lines.append(
                f"| {label} | {_ms(a_acc)} | {_ms(o_acc)} | {_signed(delta)} | {_ms(a_fg)} | {_ms(o_fg)} | "
                f"{_ms(a_t, 1)} | {_ms(o_t, 1)} | {speed:.1f}x | {statistics.mean(a_w) / statistics.mean(o_w):.1f}x |"
            )
        else:
            lines.append(
                f"| {label} | n/a | {_ms(o_acc)} | n/a | n/a | {_ms(o_fg)} | n/a | {_ms(o_t, 1)} | n/a | n/a |"
            )
    if data["blocker"]:
        lines += ["", "Avalanche could not be run here:", "", "```", data["blocker"], "```"]
    if both:
        lines += goals_and_differences(both, ours, ava, n)
    if data.get("notes"):
        lines += ["", data["notes"]]
    return "\n".join(lines) + "\n"


def _build(run: dict) -> str:
    cuda = run.get("torch_cuda")
    return f"its venv's CUDA {cuda} build, run on the CPU" if cuda else "its venv's CPU build"


def goals_and_differences(both, ours, ava, n: int) -> list[str]:
    close = [label for label, d, *_ in both if abs(statistics.mean(d)) <= 2.0]
    fast = [label for label, _, speed, *_ in both if speed >= 2.0]
    by = {label: (d, a, o) for label, d, _, a, o in both}
    er_d = by.get("Replay / ER", ([0.0],))[0]
    der_d, der_a, der_o = by.get("DER", ([0.0], [0.0], [0.0]))
    ewc = by.get("EWC (online)")
    over = f"over {n} seeds" if n > 1 else "on one seed"
    if n > 1 and "Replay / ER" in by:
        er_text = (
            f"ER's gap {over} is {_signed(er_d)} points (paired by seed); its seed-to-seed spread on each side "
            f"(±{statistics.stdev(by['Replay / ER'][1]):.2f} Avalanche, ±{statistics.stdev(by['Replay / ER'][2]):.2f} "
            "ModuleMesh) is the scale to weigh it against."
        )
    else:
        er_text = "One seed: no seed-to-seed spread was measured here, so a gap of a few points may be noise."
    if "DER" in by and statistics.mean(der_d) < 0:
        der_text = (
            f"Avalanche's DER is ahead by {-statistics.mean(der_d):.2f} points {over}; the end-of-task logits are "
            "the likely reason, not ablated here."
        )
    else:
        der_text = f"ModuleMesh's DER is not behind here ({_signed(der_d)} points {over})."
    ewc_text = (
        f"Both sit near 20% in class-IL ({statistics.mean(ewc[1]):.1f}% Avalanche, {statistics.mean(ewc[2]):.1f}% "
        "ModuleMesh), as the DER paper reports for EWC."
        if ewc
        else ""
    )
    return [
        "",
        "## Goals",
        "",
        f"- accuracy within 2 points of Avalanche (mean {over}): {len(close)} of {len(both)} "
        f"({', '.join(close) or 'none'}); the others are explained below.",
        f"- ModuleMesh's loop at least 2x faster (mean train CPU time {over}): {len(fast)} of {len(both)} "
        f"({', '.join(fast) or 'none'}).",
        "",
        "## Where the two implementations differ (read from both libraries' code)",
        "",
        "- Replay: Avalanche's `Replay` fills an experience-balanced buffer at the end of each experience and draws "
        "memory minibatches from it; ModuleMesh's `er` is Mammoth's ER, a reservoir buffer updated every step (the "
        f"stream's uniform sample). {er_text}",
        "- DER: Avalanche's `DER` keeps a class-balanced buffer filled at the end of each experience, with the logits "
        "of the model trained on the whole experience; ModuleMesh's `der` follows the paper and Mammoth: reservoir "
        "sampling during the stream, logits stored when the example is seen (mid-training, less accurate targets). "
        + der_text,
        "- EWC: Avalanche's importance is the squared gradient of each minibatch's mean loss, averaged over "
        "minibatches (about batch-size times smaller than the per-example Fisher); ModuleMesh computes the exact "
        "per-example Fisher (for an all-Linear net one matmul per layer, no per-example gradients stored), weighted "
        f"by p(y|x) as Mammoth does. {ewc_text}",
        "- Speed: a one-expert mesh skips its router, so the baselines run the bare MLP; what is left of the loop's "
        "own cost is measured against a bare PyTorch loop in benchmarks/results/overhead.md. EWC's and SI's "
        "penalties enter as their exact gradient after backward (fused foreach ops) rather than through autograd. "
        "Both sides ran on one thread on a 2-core machine shared with other jobs, so the wall times carry tens of "
        "percent of noise (the CPU times much less); Avalanche ran on torch "
        f"{ava[0]['torch_version']} ({_build(ava[0])}), ModuleMesh on torch {ours[0]['torch_version']}.",
    ]
