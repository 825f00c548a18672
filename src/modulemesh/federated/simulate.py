"""Deterministic in-process simulation of federated and decentralized training.

All clients of a run share one architecture, so their parameters are stacked along a leading
client axis and trained together with ``torch.func.vmap`` (``Stack``). Every client still sees
only its own examples: each SGD step draws a minibatch per client from that client's index set,
and a client stops updating after its own number of local steps (``ceil(epochs * n_k / B)``).

Runners (one per mode) share the same interface: ``run_round(r) -> dict`` with the round's
accuracy, per-client accuracy and per-peer byte counters; ``state()`` / ``load_state()`` for
resuming. Randomness is derived from ``(seed, round)``, so a resumed run continues exactly as an
uninterrupted one would, and the same seed gives the same numbers.

* ``FedAvgRunner`` - one model, server-side FedAvg (or a robust rule) of client weights.
* ``LocalRunner`` - standalone local models, no communication (lower baseline).
* ``CentralRunner`` - one model on the pooled client data (upper baseline; bytes = raw data once).
* ``DistillRunner`` - federated distillation (seed 004): clients send proxy-set logits, the server
  aggregates them with confidence weights, a student learns by KD at temperature T; clients
  distill last round's global soft labels alongside their own data (``client_weight``).
* ``ModulesRunner`` - peers on a topology host expert modules (seed 000 §3.3D): local loss
  ``L_task + alpha L_distill + beta L_sparse``, modules sent only to neighbours that host them and
  only if changed (selective update), consensus FedAvg of duplicates over holders.

Byte counting: a message is ``compress.encode_state`` / ``compress.encode`` of what is sent, and
``len()`` of it is added to the sender's ``sent`` and to the receiver's ``received`` counters.
Peers that fail mid-round train but send nothing; their neighbours / the server complete the
round with the rest. Poisoned peers send a sign-flipped, ``poison_scale``-times update (weights)
or confidently wrong logits (distillation).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, replace_all_batch_norm_modules_, vmap

from ..errors import ConfigError, DataError, TrainingError
from ..mesh.backbones import build_backbone
from . import partition as part_mod
from . import topology as topo_mod
from .aggregate import aggregate, aggregate_modules
from .compress import decode, encode, encode_state, decode_state
from .config import FederationConfig
from .distill import aggregate_logits, kd_loss

Params = dict[str, torch.Tensor]


# ---------------------------------------------------------------- data


@dataclass
class FedData:
    """Training pool split over clients, plus a public proxy set and a test set (all tensors)."""

    x: torch.Tensor
    y: torch.Tensor
    parts: list[torch.Tensor]
    x_proxy: torch.Tensor
    y_proxy: torch.Tensor  # for diagnostics only; never used for training
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]

    @property
    def counts(self) -> list[int]:
        return [len(p) for p in self.parts]


def as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def make_fed_data(x_train, y_train, x_test, y_test, num_clients: int, partition: str = "dirichlet", alpha: float = 1.0,
                  proxy_size: int = 0, seed: int = 0, num_classes: Optional[int] = None, min_size: int = 1,
                  max_train: Optional[int] = None, max_test: Optional[int] = None, device: str | torch.device = "cpu") -> FedData:
    """Hold out ``proxy_size`` random training examples as the unlabelled public set; split the rest."""
    x_train, y_train = torch.as_tensor(x_train), torch.as_tensor(y_train).long()
    x_test, y_test = torch.as_tensor(x_test), torch.as_tensor(y_test).long()
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise DataError("features and labels differ in length")
    rng = np.random.default_rng([seed, 7])
    if max_train is not None and max_train < len(x_train):
        keep = torch.as_tensor(np.sort(rng.permutation(len(x_train))[:max_train]))
        x_train, y_train = x_train[keep], y_train[keep]
    if max_test is not None and max_test < len(x_test):
        keep = torch.as_tensor(np.sort(rng.permutation(len(x_test))[:max_test]))
        x_test, y_test = x_test[keep], y_test[keep]
    if proxy_size >= len(x_train):
        raise DataError(f"proxy_size {proxy_size} leaves no training data out of {len(x_train)} examples; lower it")
    perm = torch.as_tensor(rng.permutation(len(x_train)))
    proxy_idx, pool_idx = perm[:proxy_size].sort().values, perm[proxy_size:].sort().values
    x_pool, y_pool = x_train[pool_idx], y_train[pool_idx]
    parts = part_mod.partition(partition, y_pool.numpy(), num_clients, alpha=alpha, seed=seed, min_size=min_size)
    c = int(num_classes or int(max(y_train.max(), y_test.max())) + 1)
    dev = torch.device(device)
    return FedData(x_pool.to(dev), y_pool.to(dev), [torch.as_tensor(p) for p in parts],
                   x_train[proxy_idx].to(dev), y_train[proxy_idx].to(dev), x_test.to(dev), y_test.to(dev), c,
                   tuple(int(s) for s in x_train.shape[1:]))


# ---------------------------------------------------------------- stacked models


def _build(spec: dict, input_shape, num_classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = build_backbone(spec, input_shape, num_classes)
    # vmap cannot update BatchNorm running statistics in place: use batch statistics throughout.
    replace_all_batch_norm_modules_(m)
    return m


class Stack:
    """K same-architecture models as stacked parameters ``{name: (K, ...)}``."""

    def __init__(self, spec: dict, input_shape, num_classes: int, k: int, seed: int, same_init: bool = True,
                 device: str | torch.device = "cpu"):
        self.spec, self.input_shape, self.num_classes, self.k = dict(spec), tuple(input_shape), num_classes, k
        self.base = _build(self.spec, input_shape, num_classes, seed).to(device)
        names = [n for n, _ in self.base.named_parameters()]
        if same_init:
            self.params = {n: p.detach().unsqueeze(0).repeat(k, *([1] * p.dim())).clone() for n, p in self.base.named_parameters()}
        else:
            models = [_build(self.spec, input_shape, num_classes, seed * 1000003 + i).to(device) for i in range(k)]
            self.params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n in names}
        self.base.requires_grad_(False)

    def fwd(self, p: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base, p, (x,))

    @torch.no_grad()
    def logits(self, x: torch.Tensor, params: Optional[Params] = None, batch: int = 2048) -> torch.Tensor:
        """``(K, N, C)`` logits of every stacked model on the same inputs."""
        params = self.params if params is None else params
        f = vmap(self.fwd, in_dims=(0, None))
        return torch.cat([f(params, as_float(x[i:i + batch])) for i in range(0, len(x), batch)], dim=1)

    def member(self, k: int) -> Params:
        return {n: v[k] for n, v in self.params.items()}

    def set_member(self, k: int, state: Params) -> None:
        for n in self.params:
            self.params[n][k] = state[n]

    def nbytes_fp32(self) -> int:
        return sum(v[0].numel() * 4 for v in self.params.values())


def sgd_train(params: Params, loss_fn: Callable, batch_fn: Callable[[int], tuple], steps: torch.Tensor, lr: float,
              momentum: float = 0.0, sq_grads: Optional[Params] = None) -> tuple[Params, float]:
    """vmapped SGD: ``loss_fn(p_k, *batch_k)`` per client; client k stops after ``steps[k]`` steps.

    ``sq_grads`` (optional, zeros like params) accumulates the mean squared gradient per client,
    a cheap diagonal empirical Fisher estimate. Returns the new params and the last mean loss.
    """
    total = int(steps.max()) if len(steps) else 0
    g_fn = vmap(grad_and_value(loss_fn))
    params = {n: v.clone() for n, v in params.items()}
    steps = steps.to(next(iter(params.values())).device)
    buf = {n: torch.zeros_like(v) for n, v in params.items()} if momentum else None
    last = float("nan")
    for t in range(total):
        active = (steps > t).to(next(iter(params.values())).dtype)
        grads, loss = g_fn(params, *batch_fn(t))
        if not torch.isfinite(loss).all():
            raise TrainingError(f"local training diverged (loss {loss.tolist()[:4]}...) at step {t}; lower lr")
        last = float((loss * active).sum() / active.sum().clamp_min(1))
        for n, g in grads.items():
            a = active.view(-1, *([1] * (g.dim() - 1)))
            if sq_grads is not None:
                sq_grads[n] += a * g * g / steps.clamp_min(1).view_as(a)
            if buf is not None:
                buf[n].mul_(momentum).add_(g)
                g = buf[n]
            params[n] -= lr * a * g
    return params, last


class BatchSampler:
    """Draws, per client and step, B indices (with replacement) from that client's own index set."""

    def __init__(self, parts: Sequence[torch.Tensor], batch_size: int, gen: torch.Generator):
        self.flat = torch.cat(list(parts))
        sizes = torch.tensor([len(p) for p in parts])
        self.starts = torch.cumsum(sizes, 0) - sizes
        self.sizes, self.b, self.gen = sizes, batch_size, gen

    def __call__(self) -> torch.Tensor:
        u = torch.rand(len(self.sizes), self.b, generator=self.gen)
        r = (u * self.sizes[:, None]).long().clamp_max(self.sizes[:, None] - 1) + self.starts[:, None]
        return self.flat[r]


def local_steps(counts: Sequence[int], epochs: float, batch_size: int) -> torch.Tensor:
    return torch.tensor([max(1, math.ceil(epochs * n / batch_size)) for n in counts])


@torch.no_grad()
def accuracy_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Accuracy per leading index of ``(..., N, C)`` logits."""
    return (logits.argmax(-1) == y).float().mean(-1)


def _gen(seed: int, r: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, r, stream]).integers(2**62)))


# ---------------------------------------------------------------- runners


class Runner:
    mode = "base"

    def __init__(self, cfg: FederationConfig, data: FedData, seed: int = 0):
        self.cfg, self.data, self.seed = cfg, data, seed
        self.k = len(data.parts)
        self.device = data.x.device
        self.counts = data.counts
        rng = np.random.default_rng([seed, 99])
        if cfg.poisoned > self.k:
            raise ConfigError(f"poisoned={cfg.poisoned} exceeds the {self.k} clients")
        self.poisoned = sorted(int(i) for i in rng.choice(self.k, cfg.poisoned, replace=False)) if cfg.poisoned else []
        self.dead: set[int] = set()
        g = torch.Generator().manual_seed(seed)
        n_eval = min(cfg.client_eval_size, len(data.x_test))
        self.client_eval_idx = torch.randperm(len(data.x_test), generator=g)[:n_eval]

    # -- failures
    def failed_this_round(self, r: int) -> list[int]:
        """Peers that vanish mid-round: they receive and train, but send nothing."""
        rate = self.cfg.failure_rate
        if rate <= 0:
            return sorted(self.dead)
        rng = np.random.default_rng([self.seed, r, 3])
        alive = [i for i in range(self.k) if i not in self.dead]
        n_fail = min(int(round(rate * self.k)) - len(self.dead), len(alive) - 1) if self.cfg.failure_mode == "permanent" \
            else min(int(round(rate * self.k)), self.k - 1)
        if self.cfg.failure_mode == "permanent":
            new = [int(i) for i in rng.choice(alive, max(n_fail, 0), replace=False)] if n_fail > 0 else []
            return sorted(self.dead | set(new))
        return sorted(int(i) for i in rng.choice(self.k, n_fail, replace=False)) if n_fail > 0 else []

    def end_round_failures(self, failed: list[int]) -> None:
        if self.cfg.failure_mode == "permanent":
            self.dead |= set(failed)

    def record(self, r: int, acc: float, client_acc: Sequence[float], sent: Sequence[int], received: Sequence[int],
               failed: Sequence[int], t0: float, **extra: Any) -> dict[str, Any]:
        return {"round": r + 1, "accuracy": float(acc), "client_accuracy": [float(a) for a in client_acc],
                "bytes_up": int(sum(sent)), "bytes_down": int(sum(received)),
                "peer_bytes_sent": [int(b) for b in sent], "peer_bytes_received": [int(b) for b in received],
                "failed": list(failed), "seconds": round(time.perf_counter() - t0, 4), **extra}

    def state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def run_round(self, r: int) -> dict[str, Any]:
        raise NotImplementedError


def _to(state: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {n: v.to(device) for n, v in state.items()}


def _stack_state(prefix: str, params: Params) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{n}": v for n, v in params.items()}


def _unstack_state(prefix: str, state: dict[str, torch.Tensor], params: Params) -> None:
    for n in params:
        key = f"{prefix}.{n}"
        if key not in state or state[key].shape != params[n].shape:
            raise ConfigError(f"resume state lacks {key!r} or has another shape; the saved run used a different config")
        params[n] = state[key].clone()


class _ClientTraining:
    """Shared by the weight-based runners: local CE training of a Stack on the clients' data."""

    def _ce_train(self, stack: Stack, r: int, extra_kd: Optional[tuple[torch.Tensor, torch.Tensor, float, float]] = None,
                  sq_grads: Optional[Params] = None) -> float:
        cfg, d = self.cfg, self.data
        gen = _gen(self.seed, r, 1)
        sampler = BatchSampler(d.parts, cfg.batch_size, gen)
        steps = local_steps(self.counts, cfg.local_epochs, cfg.batch_size)

        if extra_kd is None:
            def loss_fn(p, xb, yb):
                return F.cross_entropy(stack.fwd(p, xb), yb)

            def batch_fn(t):
                idx = sampler()
                return as_float(d.x[idx]), d.y[idx]
        else:
            xp, soft, w, temp = extra_kd

            def loss_fn(p, xb, yb, xq, tq):
                return F.cross_entropy(stack.fwd(p, xb), yb) + w * kd_loss(stack.fwd(p, xq), tq, temp)

            def batch_fn(t):
                idx = sampler()
                q = torch.randint(0, len(xp), (self.k, cfg.batch_size), generator=gen)
                return as_float(d.x[idx]), d.y[idx], as_float(xp[q]), soft[q]

        stack.params, last = sgd_train(stack.params, loss_fn, batch_fn, steps, cfg.lr, cfg.momentum, sq_grads)
        return last

    def _client_acc(self, stack: Stack) -> list[float]:
        idx = self.client_eval_idx
        return accuracy_of(stack.logits(self.data.x_test[idx]), self.data.y_test[idx]).tolist()


class FedAvgRunner(Runner, _ClientTraining):
    """FedAvg of one model: broadcast, local epochs, upload weights, aggregate over the clients that reported."""

    mode = "fedavg"

    def __init__(self, cfg, data, seed=0):
        super().__init__(cfg, data, seed)
        self.stack = Stack(cfg.backbone, data.input_shape, data.num_classes, self.k, seed, same_init=True)
        self.global_params = self.stack.member(0)
        self.global_params = {n: v.clone() for n, v in self.global_params.items()}

    def run_round(self, r: int) -> dict[str, Any]:
        cfg, t0 = self.cfg, time.perf_counter()
        failed = self.failed_this_round(r)
        sent, received = [0] * self.k, [0] * self.k
        # download: every client gets the global model (round 0: same seeded init everywhere, nothing sent)
        if r > 0:
            blob = encode_state(self.global_params, cfg.codec)
            got = _to(decode_state(blob), self.device)
            for i in range(self.k):
                if i not in self.dead:
                    received[i] += len(blob)
                    self.stack.set_member(i, got)
        sq = {n: torch.zeros_like(v) for n, v in self.stack.params.items()} if cfg.aggregator == "fisher" else None
        start = self.global_params
        self._ce_train(self.stack, r, sq_grads=sq)
        client_acc = self._client_acc(self.stack) if (r + 1) % cfg.eval_every == 0 or r + 1 == cfg.rounds else []
        contribs: list[Optional[Params]] = [None] * self.k
        fishers: list[Optional[Params]] = [None] * self.k
        for i in range(self.k):
            if i in failed:
                continue
            st = self.stack.member(i)
            if i in self.poisoned:
                st = {n: start[n] - cfg.poison_scale * (st[n] - start[n]) for n in st}
            blob = encode_state(st, cfg.codec)
            sent[i] += len(blob)
            contribs[i] = _to(decode_state(blob), self.device)
            if sq is not None:
                fblob = encode_state({n: v[i] for n, v in sq.items()}, cfg.codec)
                sent[i] += len(fblob)
                fishers[i] = _to(decode_state(fblob), self.device)
        self.global_params = aggregate(contribs, self.counts, cfg.aggregator, cfg.trim, fishers if sq is not None else None)
        self.end_round_failures(failed)
        acc = float(accuracy_of(self.stack.logits(self.data.x_test, {n: v[None] for n, v in self.global_params.items()})[0],
                                self.data.y_test))
        return self.record(r, acc, client_acc, sent, received, failed, t0)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack.fwd(self.global_params, as_float(x))

    def state(self):
        return _stack_state("global", self.global_params)

    def load_state(self, state):
        _unstack_state("global", state, self.global_params)
        for i in range(self.k):
            self.stack.set_member(i, self.global_params)


class LocalRunner(Runner, _ClientTraining):
    """Standalone local models; no communication. Accuracy = mean over clients (on the client eval subset)."""

    mode = "local"

    def __init__(self, cfg, data, seed=0):
        super().__init__(cfg, data, seed)
        self.stack = Stack(cfg.backbone, data.input_shape, data.num_classes, self.k, seed, same_init=True)

    def run_round(self, r):
        t0 = time.perf_counter()
        self._ce_train(self.stack, r)
        client_acc = self._client_acc(self.stack)
        return self.record(r, float(np.mean(client_acc)), client_acc, [0] * self.k, [0] * self.k, [], t0)

    def state(self):
        return _stack_state("clients", self.stack.params)

    def load_state(self, state):
        _unstack_state("clients", state, self.stack.params)


class CentralRunner(Runner, _ClientTraining):
    """One model on the pooled data of all clients (a round = ``local_epochs`` epochs over the pool).

    Bytes: every client uploads its raw examples once (round 1), at their stored size.
    """

    mode = "central"

    def __init__(self, cfg, data, seed=0):
        super().__init__(cfg, data, seed)
        self.stack = Stack(cfg.backbone, data.input_shape, data.num_classes, 1, seed)

    def run_round(self, r):
        cfg, d, t0 = self.cfg, self.data, time.perf_counter()
        sent = [0] * self.k
        if r == 0:
            per_ex = d.x[0].numel() * d.x.element_size() + 8
            sent = [c * per_ex for c in self.counts]
        pool = torch.cat(d.parts)
        gen = _gen(self.seed, r, 1)
        sampler = BatchSampler([pool], cfg.batch_size, gen)
        steps = local_steps([len(pool)], cfg.local_epochs, cfg.batch_size)

        def loss_fn(p, xb, yb):
            return F.cross_entropy(self.stack.fwd(p, xb), yb)

        def batch_fn(t):
            idx = sampler()
            return as_float(d.x[idx]), d.y[idx]

        self.stack.params, _ = sgd_train(self.stack.params, loss_fn, batch_fn, steps, cfg.lr, cfg.momentum)
        acc = float(accuracy_of(self.stack.logits(d.x_test)[0], d.y_test))
        return self.record(r, acc, [acc] * self.k, sent, [0] * self.k, [], t0)

    def predict(self, x):
        return self.stack.fwd(self.stack.member(0), as_float(x))

    def state(self):
        return _stack_state("model", self.stack.params)

    def load_state(self, state):
        _unstack_state("model", state, self.stack.params)


class DistillRunner(Runner, _ClientTraining):
    """Federated distillation with confidence-weighted logit aggregation (seed 004).

    Round r: clients train on their data (+ KD toward round r-1's global soft labels on the
    proxy set, weight ``client_weight``); each reporting client sends its proxy logits (codec);
    the server aggregates them and trains the student by KD on the proxy set; the global soft
    labels are broadcast (codec) at the start of round r+1.
    """

    mode = "distill"

    def __init__(self, cfg, data, seed=0):
        super().__init__(cfg, data, seed)
        dc = cfg.distill
        if len(data.x_proxy) == 0:
            raise ConfigError("federated distillation needs a public proxy set; set federation.distill.proxy_size > 0")
        self.stack = Stack(cfg.backbone, data.input_shape, data.num_classes, self.k, seed, same_init=False)
        self.student = Stack(dc.student_backbone or cfg.backbone, data.input_shape, data.num_classes, 1, seed + 1)
        self.soft: Optional[torch.Tensor] = None  # (N_proxy, C) global soft labels (as logits)

    def run_round(self, r):
        cfg, dc, d, t0 = self.cfg, self.cfg.distill, self.data, time.perf_counter()
        failed = self.failed_this_round(r)
        sent, received = [0] * self.k, [0] * self.k
        kd = None
        if self.soft is not None:
            blob = encode(self.soft, cfg.codec)
            soft_rx = decode(blob).float().to(self.device)
            for i in range(self.k):
                if i not in self.dead:
                    received[i] += len(blob)
            if dc.client_weight > 0:
                kd = (d.x_proxy, soft_rx, dc.client_weight, dc.temperature)
        self._ce_train(self.stack, r, kd)
        client_acc = self._client_acc(self.stack) if (r + 1) % cfg.eval_every == 0 or r + 1 == cfg.rounds else []
        logits = self.stack.logits(d.x_proxy)  # (K, N, C)
        got = torch.zeros_like(logits)
        mask = torch.zeros(self.k, dtype=torch.bool)
        for i in range(self.k):
            if i in failed:
                continue
            li = logits[i]
            if i in self.poisoned:
                wrong = (li.argmax(1) + 1) % d.num_classes
                li = F.one_hot(wrong, d.num_classes).float() * cfg.poison_scale
            blob = encode(li, cfg.codec)
            sent[i] += len(blob)
            got[i] = decode(blob).float().to(self.device)
            mask[i] = True
        self.soft = aggregate_logits(got, dc.score, dc.tau, mask, dc.space, dc.robust, cfg.trim)
        self._train_student(r)
        self.end_round_failures(failed)
        acc = float(accuracy_of(self.student.logits(d.x_test)[0], d.y_test))
        teacher_proxy_acc = float(accuracy_of(self.soft, d.y_proxy))
        return self.record(r, acc, client_acc, sent, received, failed, t0, teacher_proxy_accuracy=teacher_proxy_acc)

    def _train_student(self, r: int) -> None:
        dc, d = self.cfg.distill, self.data
        gen = _gen(self.seed, r, 2)
        n = len(d.x_proxy)
        steps = torch.tensor([max(1, math.ceil(dc.student_epochs * n / dc.student_batch_size))])
        soft, temp = self.soft, dc.temperature

        def loss_fn(p, xq, tq):
            return kd_loss(self.student.fwd(p, xq), tq, temp)

        def batch_fn(t):
            q = torch.randint(0, n, (1, dc.student_batch_size), generator=gen)
            return as_float(d.x_proxy[q]), soft[q]

        self.student.params, _ = sgd_train(self.student.params, loss_fn, batch_fn, steps, dc.student_lr, self.cfg.momentum)

    def predict(self, x):
        return self.student.fwd(self.student.member(0), as_float(x))

    def state(self):
        s = {**_stack_state("clients", self.stack.params), **_stack_state("student", self.student.params)}
        if self.soft is not None:
            s["soft"] = self.soft
        return s

    def load_state(self, state):
        _unstack_state("clients", state, self.stack.params)
        _unstack_state("student", state, self.student.params)
        self.soft = state.get("soft")


def module_assignment(num_peers: int, num_modules: int, per_peer: int) -> list[list[int]]:
    """Peer p hosts modules ``(p + j) mod M`` for j < per_peer: on a ring, holders are neighbours."""
    if per_peer > num_modules:
        raise ConfigError(f"modules_per_peer={per_peer} exceeds num_modules={num_modules}")
    return [[(p + j) % num_modules for j in range(per_peer)] for p in range(num_peers)]


def routing_weights(expert_logits: torch.Tensor) -> torch.Tensor:
    """Entropy routing (seed 000 §3.3C): w_i = softmax_i(-H(softmax(E_i(x)))); input ``(h, B, C)`` -> ``(h, B)``."""
    logp = torch.log_softmax(expert_logits, -1)
    neg_h = (logp.exp() * logp).sum(-1)
    return torch.softmax(neg_h, 0)


def mixture_log_probs(expert_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log sum_i w_i softmax(E_i(x))`` ``(B, C)`` and the routing weights ``(h, B)``."""
    w = routing_weights(expert_logits)
    logp = torch.log_softmax(expert_logits, -1)
    return torch.logsumexp(torch.log(w.clamp_min(1e-12))[..., None] + logp, 0), w


class ModulesRunner(Runner):
    """Decentralized peers hosting expert modules on a topology (no server).

    Each peer's model is the entropy-routed mixture of its hosted experts. Local loss (seed 000):
    ``NLL(mixture) + alpha KL(start-of-round mixture || mixture) + beta mean H(w)``; the sparsity
    term is the routing entropy, not seed 000's L1 norm of softmax weights (which is always 1 and
    has no gradient). After training, a peer sends each module it changed (relative change above
    ``send_threshold``) to the neighbours that host the same module; each peer then replaces its
    copy by the aggregate (``aggregator``, weighted by example counts) of its own copy and the
    copies it received.
    """

    mode = "modules"

    def __init__(self, cfg, data, seed=0):
        super().__init__(cfg, data, seed)
        mc = cfg.modules
        self.m = mc.num_modules or self.k
        self.h = mc.modules_per_peer
        self.hosted = module_assignment(self.k, self.m, self.h)
        self.graph = topo_mod.build(mc.topology, self.k, mc.degree, seed)
        self.expert = _build(mc.expert, data.input_shape, data.num_classes, seed).to(self.device)
        self.expert.requires_grad_(False)
        inits = [_build(mc.expert, data.input_shape, data.num_classes, seed * 7919 + j) for j in range(self.m)]
        names = [n for n, _ in self.expert.named_parameters()]
        init = {n: torch.stack([dict(e.named_parameters())[n].detach() for e in inits]) for n in names}  # (M, ...)
        idx = torch.tensor(self.hosted)  # (K, h)
        self.params = {n: v[idx].clone().to(self.device) for n, v in init.items()}  # (K, h, ...)
        self.last_sent = {n: v.clone() for n, v in self.params.items()}

    def _expert_fwd(self, p, x):
        return functional_call(self.expert, p, (x,))

    def _peer_logp(self, p, x):
        """Mixture log-probs of one peer: p has leading dim h."""
        return mixture_log_probs(vmap(self._expert_fwd, in_dims=(0, None))(p, x))

    @torch.no_grad()
    def peer_logp(self, x: torch.Tensor, params: Optional[Params] = None, batch: int = 2048) -> torch.Tensor:
        params = self.params if params is None else params
        f = vmap(lambda p, xb: self._peer_logp(p, xb)[0], in_dims=(0, None))
        return torch.cat([f(params, as_float(x[i:i + batch])) for i in range(0, len(x), batch)], dim=1)

    def _trainable(self, r: int) -> torch.Tensor:
        """(K, h) mask of the modules each peer trains this round (round-robin over its modules)."""
        n_train = max(1, math.ceil(self.cfg.modules.update_fraction * self.h))
        mask = torch.zeros(self.k, self.h, device=self.device)
        for p in range(self.k):
            for j in range(n_train):
                mask[p, (r * n_train + j) % self.h] = 1.0
        return mask

    def run_round(self, r):
        cfg, t0 = self.cfg, time.perf_counter()
        failed = self.failed_this_round(r)
        start, sq = self.local_train(r)
        d = self.data
        self._share_and_merge(r, failed, start, sq)
        self.end_round_failures(failed)
        evaluate = (r + 1) % cfg.eval_every == 0 or r + 1 == cfg.rounds
        client_acc, mesh_acc = [], float("nan")
        if evaluate:
            idx = self.client_eval_idx
            client_acc = accuracy_of(self.peer_logp(d.x_test[idx]), d.y_test[idx]).tolist()
            mesh_acc = self.mesh_accuracy()
        acc = float(np.mean(client_acc)) if client_acc else float("nan")
        return self.record(r, acc, client_acc, self._sent, self._received, failed, t0, mesh_accuracy=mesh_acc,
                           modules_sent=self._n_sent)

    def local_train(self, r: int) -> tuple[Params, Optional[Params]]:
        """Train every peer's trainable modules on its own data; returns (start params, Fisher or None)."""
        cfg, mc, d = self.cfg, self.cfg.modules, self.data
        start = {n: v.clone() for n, v in self.params.items()}
        train_mask = self._trainable(r)
        gen = _gen(self.seed, r, 1)
        sampler = BatchSampler(d.parts, cfg.batch_size, gen)
        steps = local_steps(self.counts, cfg.local_epochs, cfg.batch_size)
        alpha, beta, temp = mc.distill_weight, mc.sparse_weight, mc.temperature

        def loss_fn(p, p0, xb, yb):
            logp, w = self._peer_logp(p, xb)
            loss = F.nll_loss(logp, yb)
            if alpha > 0:
                t_logp, _ = self._peer_logp(p0, xb)
                loss = loss + alpha * kd_loss(logp, t_logp, temp)
            if beta > 0:
                loss = loss - beta * (w * torch.log(w.clamp_min(1e-12))).sum(0).mean()
            return loss

        def batch_fn(t):
            idx = sampler()
            return start, as_float(d.x[idx]), d.y[idx]

        g_fn = vmap(grad_and_value(loss_fn))
        params = {n: v.clone() for n, v in self.params.items()}
        sq = {n: torch.zeros_like(v) for n, v in params.items()} if cfg.aggregator == "fisher" else None
        steps = steps.to(self.device)
        for t in range(int(steps.max())):
            active = (steps > t).float()
            grads, loss = g_fn(params, *batch_fn(t))
            if not torch.isfinite(loss).all():
                raise TrainingError(f"peer training diverged at round {r + 1}, step {t}; lower lr")
            for n, g in grads.items():
                a = (active[:, None] * train_mask).view(self.k, self.h, *([1] * (g.dim() - 2)))
                if sq is not None:
                    sq[n] += a * g * g / steps.view(-1, *([1] * (g.dim() - 1)))
                params[n] -= cfg.lr * a * g
        self.params = params
        return start, sq

    def _share_and_merge(self, r: int, failed: list[int], start: Params, sq: Optional[Params]) -> None:
        cfg = self.cfg
        # selective sharing to neighbours that host the same module
        sent, received = [0] * self.k, [0] * self.k
        changed = self._changed()
        outgoing: dict[tuple[int, int], tuple[Params, Optional[Params]]] = {}
        for p in range(self.k):
            if p in failed:
                continue
            for j, m in enumerate(self.hosted[p]):
                if not changed[p, j]:
                    continue
                st = {n: v[p, j] for n, v in self.params.items()}
                if p in self.poisoned:
                    st = {n: start[n][p, j] - cfg.poison_scale * (st[n] - start[n][p, j]) for n in st}
                blob = encode_state(st, cfg.codec)
                fis = None
                fblob = b""
                if sq is not None:
                    fblob = encode_state({n: v[p, j] for n, v in sq.items()}, cfg.codec)
                    fis = _to(decode_state(fblob), self.device)
                msg = (_to(decode_state(blob), self.device), fis)
                for q in self.graph[p]:
                    if m in self.hosted[q] and q not in self.dead:
                        sent[p] += len(blob) + len(fblob)
                        if q not in failed:
                            received[q] += len(blob) + len(fblob)
                            outgoing[(p, m)] = msg
                for n in self.params:
                    self.last_sent[n][p, j] = self.params[n][p, j]
        # consensus: each live peer aggregates its own copy with the copies received
        new = {n: v.clone() for n, v in self.params.items()}
        for q in range(self.k):
            if q in failed:
                continue
            for j, m in enumerate(self.hosted[q]):
                own = {n: v[q, j] for n, v in self.params.items()}
                contribs: list[Optional[dict]] = [{m: own}]
                weights = [float(self.counts[q])]
                fishers = [{m: {n: v[q, j] for n, v in sq.items()}}] if sq is not None else None
                for p in self.graph[q]:
                    if (p, m) in outgoing:
                        st, fis = outgoing[(p, m)]
                        contribs.append({m: st})
                        weights.append(float(self.counts[p]))
                        if fishers is not None:
                            fishers.append({m: fis})
                if len(contribs) == 1:
                    continue
                agg = aggregate_modules(contribs, weights, cfg.aggregator, cfg.trim, fishers)[m]
                for n in new:
                    new[n][q, j] = agg[n]
        self.params = new
        self._sent, self._received, self._n_sent = sent, received, len(outgoing)

    def _changed(self) -> torch.Tensor:
        thr = self.cfg.modules.send_threshold
        diff = torch.zeros(self.k, self.h, device=self.device)
        norm = torch.zeros(self.k, self.h, device=self.device)
        for n, v in self.params.items():
            dv = (v - self.last_sent[n]).flatten(2)
            diff += (dv * dv).sum(-1)
            norm += (self.last_sent[n].flatten(2) ** 2).sum(-1)
        rel = diff.sqrt() / norm.sqrt().clamp_min(1e-12)
        return (rel > thr) & (diff > 0)

    def consensus_modules(self) -> Params:
        """(M, ...) parameters: each module averaged (by examples) over all its holders."""
        out = {}
        for n, v in self.params.items():
            acc = torch.zeros(self.m, *v.shape[2:], device=self.device)
            wsum = torch.zeros(self.m, device=self.device)
            for p in range(self.k):
                for j, m in enumerate(self.hosted[p]):
                    acc[m] += self.counts[p] * v[p, j]
                    wsum[m] += self.counts[p]
            out[n] = acc / wsum.view(-1, *([1] * (acc.dim() - 1))).clamp_min(1e-12)
        return out

    @torch.no_grad()
    def mesh_accuracy(self) -> float:
        """Accuracy of the whole mesh: all M consensus modules, entropy-routed."""
        mods = self.consensus_modules()
        logp = torch.cat([self._peer_logp(mods, as_float(self.data.x_test[i:i + 2048]))[0]
                          for i in range(0, len(self.data.x_test), 2048)])
        return float(accuracy_of(logp, self.data.y_test))

    def state(self):
        return {**_stack_state("peers", self.params), **_stack_state("last_sent", self.last_sent)}

    def load_state(self, state):
        _unstack_state("peers", state, self.params)
        _unstack_state("last_sent", state, self.last_sent)


RUNNERS = {"fedavg": FedAvgRunner, "local": LocalRunner, "central": CentralRunner, "distill": DistillRunner,
           "modules": ModulesRunner}


def make_runner(cfg: FederationConfig, data: FedData, seed: int = 0) -> Runner:
    if cfg.mode not in RUNNERS:
        raise ConfigError(f"unknown mode {cfg.mode!r}; choose one of {', '.join(RUNNERS)}")
    return RUNNERS[cfg.mode](cfg, data, seed)


def simulate(cfg: FederationConfig, data: FedData, seed: int = 0, on_round: Optional[Callable[[dict], None]] = None,
             runner: Optional[Runner] = None, start_round: int = 0, bytes_before: int = 0) -> list[dict[str, Any]]:
    """Run ``cfg.rounds`` rounds and return the per-round records (with cumulative bytes)."""
    torch.manual_seed(seed)
    runner = runner or make_runner(cfg, data, seed)
    history: list[dict[str, Any]] = []
    cum = bytes_before
    for r in range(start_round, cfg.rounds):
        rec = runner.run_round(r)
        cum += rec["bytes_up"] + rec["bytes_down"]
        rec["bytes_cumulative"] = cum
        history.append(rec)
        if on_round:
            on_round(rec)
    return history


def fed_data_from_experiment(exp, device: str | torch.device = "cpu") -> FedData:
    """Load ``exp.data`` with ``modulemesh.data.datasets.load_dataset`` and split it per ``exp.federation``."""
    from ..data.datasets import load_dataset

    ds = load_dataset(exp.data.name, exp.data.root, **exp.data.options)
    fc = exp.federation
    return make_fed_data(ds.x_train, ds.y_train, ds.x_test, ds.y_test, fc.clients, fc.partition, fc.alpha,
                         fc.distill.proxy_size, seed=exp.seed, num_classes=ds.num_classes, min_size=fc.min_client_size,
                         max_train=fc.max_train, max_test=fc.max_test, device=device)
