"""Shared pieces of the federated benchmarks: the named variants, the split, one timed run -> a JSON record."""

from __future__ import annotations

import os
import resource
import time

# class-count weighted ensemble (FedGen / FedFTG) with DS-FL's sharpening and FedDF's Adam distillation, picked on
# the validation split (benchmarks/results/federated_select.md): the per-class weights fix the ensemble's argmax but
# flatten its soft labels, which sharpening undoes
CLASS_COUNTS = {
    "class_weights": "counts",
    "score": "uniform",
    "sharpen": 0.1,
    "student_optimizer": "adam",
    "student_lr": 0.001,
    "student_epochs": 10.0,
}

# name -> (label, overrides of federation.*; "distill" holds overrides of federation.distill.*)
VARIANTS = {
    "central": ("centralized (pooled private data)", {"mode": "central", "batch_size": 128, "lr": 0.2}),
    "fedavg": ("FedAvg", {"mode": "fedavg"}),
    "fd": ("FD, seed 004 (confidence-weighted logits)", {"mode": "distill"}),
    "fd_sharpen": ("FD + DS-FL sharpening (T 0.1)", {"mode": "distill", "distill": {"sharpen": 0.1}}),
    "fd_ema": ("FD + EMA of the global model (0.5)", {"mode": "distill", "distill": {"ema": 0.5}}),
    "fd_proxy20k": ("FD + 20,000 proxy images", {"mode": "distill", "distill": {"proxy_size": 20000}}),
    "feddf": ("FedDF (FedAvg init + ensemble distillation)", {"mode": "distill", "distill": {"feddf": True}}),
    "feddf_sharpen": (
        "FedDF + DS-FL sharpening (T 0.1)",
        {"mode": "distill", "distill": {"feddf": True, "sharpen": 0.1}},
    ),
    "feddf_ema": ("FedDF + EMA (0.5)", {"mode": "distill", "distill": {"feddf": True, "ema": 0.5}}),
    "feddf_counts": (
        "FedDF + class-count weights, sharpening, Adam student",
        {"mode": "distill", "distill": {"feddf": True, **CLASS_COUNTS}},
    ),
    "fd_counts": ("FD + class-count weights, sharpening, Adam student", {"mode": "distill", "distill": CLASS_COUNTS}),
    "fd_counts_digest": (
        "FD + class-count weights, sharpening, Adam student + FedMD digest (1 epoch)",
        {"mode": "distill", "distill": {**CLASS_COUNTS, "digest_epochs": 1.0}},
    ),
    # the same runs with every weight message (broadcast and upload) int8-quantized per tensor: a quarter of the
    # bytes; FedAvg with the same codec is the reference that says how much of a saving is the codec's alone
    "feddf_int8": ("FedDF, int8 weights both ways", {"mode": "distill", "codec": "int8", "distill": {"feddf": True}}),
    "fedavg_int8": ("FedAvg, int8 weights both ways", {"mode": "fedavg", "codec": "int8"}),
    # SCAFFOLD's control variates against client drift (Karimireddy et al. 2020) with FedAvgM's server momentum 0.5
    # (Hsu et al. 2019), picked on the validation split (benchmarks/results/federated_select.md; FedProx hurt there).
    # FedAvg gets the same fixes, so the table separates what they add from what distillation adds. Controls are int8.
    "feddf_int8_scaffold_m05": (
        "FedDF + SCAFFOLD + server momentum 0.5, int8 both ways",
        {"mode": "distill", "codec": "int8", "scaffold": True, "server_momentum": 0.5, "distill": {"feddf": True}},
    ),
    "fedavg_int8_scaffold_m05": (
        "FedAvg + SCAFFOLD + server momentum 0.5, int8 both ways",
        {"mode": "fedavg", "codec": "int8", "scaffold": True, "server_momentum": 0.5},
    ),
    "feddf_proxy20k": (
        "FedDF + 20,000 proxy images",
        {"mode": "distill", "distill": {"feddf": True, "proxy_size": 20000}},
    ),
}

# how every table names the split it used (partition.py has both Dirichlet conventions)
PARTITION_NAME = {
    "dirichlet": "Dirichlet per class (one Dir(alpha) draw per class over the clients)",
    "dirichlet_clientwise": "Dirichlet per client (one Dir(alpha) label mix per client, balanced sizes)",
    "iid": "IID",
    "task": "whole tasks per client",
}


def machine_load() -> str:
    """How busy the machine was (wall times are only comparable on an otherwise idle machine)."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} cores when the run ended"


def federation_for(base, name: str, **extra):
    """The validated federation config of variant ``name`` on top of the base config."""
    fed = dict(VARIANTS[name][1])
    dist = {**base.federation.distill.model_dump(), **fed.pop("distill", {})}
    cfg = base.federation.model_copy(update={**fed, **extra})
    return type(cfg).model_validate({**cfg.model_dump(), "distill": dist})


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    """CPU time of this process, all threads (on a shared machine, wall time alone overstates the cost)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_one(cfg, data, seed: int, runner=None) -> dict:
    """One simulated run; the record every table reads. Pass ``runner`` to read its final model afterwards."""
    from modulemesh.federated.sim import make_runner, simulate

    runner = make_runner(cfg, data, seed) if runner is None else runner
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    hist = simulate(cfg, data, seed, runner=runner)
    return {
        "mode": cfg.mode,
        "final_accuracy": hist[-1]["accuracy"],
        "accuracy": [h["accuracy"] for h in hist],
        "teacher_proxy_accuracy": [h.get("teacher_proxy_accuracy") for h in hist],
        "bytes_cumulative": [h["bytes_cumulative"] for h in hist],
        "bytes_received_total": sum(h["bytes_received"] for h in hist),
        "seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(cpu_seconds() - cpu0, 1),
    }


def bytes_to_reach(run: dict, target: float):
    for acc, b in zip(run["accuracy"], run["bytes_cumulative"]):
        if acc >= target:
            return b
    return None
