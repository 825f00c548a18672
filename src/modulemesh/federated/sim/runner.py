"""What every simulated runner shares: peer failures and poisoning, the byte ledger, round records, state.

Runners (one per mode) share one interface: ``run_round(r) -> dict`` with the round's accuracy,
per-client accuracy and bytes; ``state()`` / ``load_state()`` (flat tensors for a safetensors
file) for resuming. Randomness is derived from ``(seed, round)``, so a resumed run continues
exactly as an uninterrupted one would, and the same seed gives the same numbers.

Bytes (``Traffic``): every transfer is recorded once, with its sender and its receiver. A peer's
``sent`` and ``received`` are separate columns; the round's ``bytes_sent`` is the sum over all
senders (server included), i.e. each transfer counted once, and ``bytes_received`` what arrived
(less when a receiver vanished mid-round). A message's size is ``len()`` of its codec encoding.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch

from ...errors import ConfigError
from .. import weights as wmod
from ..config import FederationConfig
from .data import FedData


class Traffic:
    """Bytes of one round, each transfer recorded once: who sent it, who received it."""

    def __init__(self, k: int):
        self.sent, self.received = [0] * k, [0] * k
        self.server_sent = self.server_received = 0

    def peer_to_peer(self, src: int, dst: int, n: int, delivered: bool = True) -> None:
        self.sent[src] += n
        if delivered:
            self.received[dst] += n

    def server_to_peer(self, dst: int, n: int, delivered: bool = True) -> None:
        self.server_sent += n
        if delivered:
            self.received[dst] += n

    def peer_to_server(self, src: int, n: int) -> None:
        self.sent[src] += n
        self.server_received += n

    def fields(self) -> dict[str, Any]:
        return {
            "bytes_sent": sum(self.sent) + self.server_sent,
            "bytes_received": sum(self.received) + self.server_received,
            "peer_bytes_sent": list(self.sent),
            "peer_bytes_received": list(self.received),
            "server_bytes_sent": self.server_sent,
            "server_bytes_received": self.server_received,
        }


def record(
    r: int, acc: float, client_acc: Sequence[float], traffic: Traffic, failed: Sequence[int], t0: float, **extra: Any
) -> dict[str, Any]:
    """One round's record, the same keys on every engine."""
    return {
        "round": r + 1,
        "accuracy": float(acc),
        "client_accuracy": [float(a) for a in client_acc],
        **traffic.fields(),
        "failed": list(failed),
        "seconds": round(time.perf_counter() - t0, 4),
        **extra,
    }


class Runner:
    mode = "base"

    def __init__(self, cfg: FederationConfig, data: FedData, seed: int = 0):
        self.cfg, self.data, self.seed = cfg, data, seed
        self.k = len(data.parts)
        self.device = data.device
        self.counts = data.counts
        rng = np.random.default_rng([seed, 99])
        if cfg.poisoned > self.k:
            raise ConfigError(f"poisoned={cfg.poisoned} exceeds the {self.k} clients")
        self.poisoned = sorted(int(i) for i in rng.choice(self.k, cfg.poisoned, replace=False)) if cfg.poisoned else []
        self.dead: set[int] = set()
        g = torch.Generator().manual_seed(seed)
        n_eval = len(data.x_test) if cfg.client_eval_size is None else min(cfg.client_eval_size, len(data.x_test))
        self.client_eval_idx = torch.randperm(len(data.x_test), generator=g)[:n_eval]

    # -- failures
    def failed_this_round(self, r: int) -> list[int]:
        """Peers that vanish mid-round: they receive and train, but send nothing."""
        rate = self.cfg.failure_rate
        if rate <= 0:
            return sorted(self.dead)
        rng = np.random.default_rng([self.seed, r, 3])
        alive = [i for i in range(self.k) if i not in self.dead]
        n_fail = (
            min(int(round(rate * self.k)) - len(self.dead), len(alive) - 1)
            if self.cfg.failure_mode == "permanent"
            else min(int(round(rate * self.k)), self.k - 1)
        )
        if self.cfg.failure_mode == "permanent":
            new = [int(i) for i in rng.choice(alive, max(n_fail, 0), replace=False)] if n_fail > 0 else []
            return sorted(self.dead | set(new))
        return sorted(int(i) for i in rng.choice(self.k, n_fail, replace=False)) if n_fail > 0 else []

    def end_round_failures(self, failed: list[int]) -> None:
        if self.cfg.failure_mode == "permanent":
            self.dead |= set(failed)

    def evaluates(self, r: int) -> bool:
        return (r + 1) % self.cfg.eval_every == 0 or r + 1 == self.cfg.rounds

    def state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def run_round(self, r: int) -> dict[str, Any]:
        raise NotImplementedError


def poisoned_update(
    start: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], scale: float
) -> dict[str, torch.Tensor]:
    """What a poisoned peer sends: its update sign-flipped and scaled."""
    return {n: start[n] - scale * (trained[n] - start[n]) for n in trained}


def save_stacked(prefix: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stacked training tensors for the resume file, as ``<prefix>/<param>``."""
    return wmod.flatten({prefix: params})


def load_stacked(prefix: str, state: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
    saved = wmod.unflatten(state).get(prefix, {})
    for n in params:
        if n not in saved or saved[n].shape != params[n].shape:
            raise ConfigError(
                f"resume state lacks {prefix}/{n} or has another shape; the saved run used a different config"
            )
        params[n] = saved[n].to(params[n].device).clone()
