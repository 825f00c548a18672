"""Deterministic in-process simulation of federated and decentralized training (the ``sim`` engine).

All clients of a run share one architecture, so their parameters are stacked along a leading
client axis and trained together with ``torch.func.vmap`` (``stacked``). Every client still sees
only its own examples: each SGD step draws a minibatch per client from that client's index set,
and a client stops updating after its own number of local steps (``ceil(epochs * n_k / B)``).

* ``data`` - the split (``FedData``), minibatch sampling, per-round random streams;
* ``stacked`` - stacked experts and the vmapped SGD step;
* ``runner`` - failures, poisoning, the byte ledger, round records;
* ``weight_runners`` - FedAvg, local and central baselines; ``distill_runner`` - federated
  distillation; ``modules_runner`` - peers hosting mesh experts on a topology.

Peers that fail mid-round train but send nothing; their neighbours / the server complete the
round with the rest. Poisoned peers send a sign-flipped, ``poison_scale``-times update (weights)
or confidently wrong logits (distillation).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ...errors import ConfigError
from ..config import FederationConfig
from .data import FedData, fed_data_from_experiment, make_fed_data
from .distill_runner import DistillRunner, Student
from .modules_runner import ModulesRunner
from .runner import Runner
from .weight_runners import CentralRunner, FedAvgRunner, LocalRunner

RUNNERS = {
    "fedavg": FedAvgRunner,
    "local": LocalRunner,
    "central": CentralRunner,
    "distill": DistillRunner,
    "modules": ModulesRunner,
}


def make_runner(cfg: FederationConfig, data: FedData, seed: int = 0) -> Runner:
    if cfg.mode not in RUNNERS:
        raise ConfigError(f"unknown mode {cfg.mode!r}; choose one of {', '.join(RUNNERS)}")
    return RUNNERS[cfg.mode](cfg, data, seed)


def simulate(
    cfg: FederationConfig,
    data: FedData,
    seed: int = 0,
    on_round: Optional[Callable[[dict], None]] = None,
    runner: Optional[Runner] = None,
    start_round: int = 0,
    bytes_before: int = 0,
) -> list[dict[str, Any]]:
    """Run ``cfg.rounds`` rounds and return the per-round records (with cumulative bytes sent)."""
    torch.manual_seed(seed)
    runner = runner or make_runner(cfg, data, seed)
    history: list[dict[str, Any]] = []
    cum = bytes_before
    for r in range(start_round, cfg.rounds):
        rec = runner.run_round(r)
        cum += rec["bytes_sent"]
        rec["bytes_cumulative"] = cum
        history.append(rec)
        if on_round:
            on_round(rec)
    return history


__all__ = [
    "FedData",
    "make_fed_data",
    "fed_data_from_experiment",
    "make_runner",
    "simulate",
    "RUNNERS",
    "Runner",
    "FedAvgRunner",
    "LocalRunner",
    "CentralRunner",
    "DistillRunner",
    "Student",
    "ModulesRunner",
]
