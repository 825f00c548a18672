"""Runners that exchange whole-model weights: FedAvg, and the local / central baselines.

* ``FedAvgRunner`` - one model, server-side FedAvg (or a robust rule) of client weights.
* ``LocalRunner`` - standalone local models, no communication (lower baseline).
* ``CentralRunner`` - one model on the pooled client data (upper baseline; bytes = raw data once).

``ClientTraining.train_clients`` is the local update of every client at once (vmapped SGD on
cross-entropy, optionally plus KD toward soft labels on the proxy set); the distillation runner
and the Flower / hivemind clients use the same public method.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ...training.fit import fit_stacked
from ...training.losses import soft_target_loss
from .. import weights as wmod
from ..aggregate import aggregate_stacked
from ..server_opt import ServerMomentum
from .data import BatchSampler, FedData, as_float, local_steps, round_generator
from .runner import Runner, Traffic, load_stacked, record, save_stacked
from .scaffold import Controls, with_correction
from .stacked import Params, Stack, accuracy_of, model_accuracy
from .upload import Poison, upload

KD = tuple[torch.Tensor, torch.Tensor, float, float]  # (proxy x, soft labels, weight, temperature)


def proximal(loss_fn, batch_fn, anchor: Params, mu: float):
    """FedProx's local objective: ``loss_fn`` + mu/2 ||p - anchor||^2 per client (``anchor``: the stacked weights
    the clients start from, copied, and handed to each client's vmapped loss beside its batch)."""
    anchor = {n: v.detach().clone() for n, v in anchor.items()}

    def prox_loss(p, *args):
        *batch, a = args
        return loss_fn(p, *batch) + 0.5 * mu * sum(((p[n] - a[n]) ** 2).sum() for n in p)

    def prox_batch(t):
        return (*batch_fn(t), anchor)

    return prox_loss, prox_batch


class ClientTraining:
    """Local cross-entropy training of a ``Stack`` of client models, one per client of ``data``."""

    def train_clients(
        self,
        stack: Stack,
        r: int,
        kd: Optional[KD] = None,
        sq_grads: Optional[Params] = None,
        data: Optional[FedData] = None,
        correction: Optional[Params] = None,
    ) -> float:
        """All clients' local epochs of round ``r`` (+ ``kd``: KD toward soft labels on the proxy set, after
        ``distill.digest_epochs`` of KD alone on the proxy set when that is set; a ``kd`` weight of 0 = digest only)."""
        cfg, d = self.cfg, data if data is not None else self.data
        if kd is not None and cfg.distill.digest_epochs > 0:
            self.digest(stack, r, kd, len(d.parts))
        gen = round_generator(self.seed, r, 1)
        sampler = BatchSampler(d.parts, cfg.batch_size, gen)
        steps = local_steps(d.counts, cfg.local_epochs, cfg.batch_size)
        k = len(d.parts)
        if kd is None or kd[2] == 0:

            def loss_fn(p, xb, yb):
                return F.cross_entropy(stack.fwd(p, xb), yb)

            def batch_fn(t):
                idx = sampler()
                return as_float(d.x[idx]), d.y[idx]
        else:
            xp, soft, w, temp = kd
            soft = soft.to(d.device)

            def loss_fn(p, xb, yb, xq, tq):
                return F.cross_entropy(stack.fwd(p, xb), yb) + w * soft_target_loss(stack.fwd(p, xq), tq, temp)

            def batch_fn(t):
                idx = sampler()
                q = torch.randint(0, len(xp), (k, cfg.batch_size), generator=gen)
                return as_float(d.x[idx]), d.y[idx], as_float(xp[q]), soft[q]

        if cfg.prox_mu > 0:
            loss_fn, batch_fn = proximal(loss_fn, batch_fn, stack.params, cfg.prox_mu)
        if correction is not None:  # SCAFFOLD: each step follows g_i + c - c_i
            loss_fn, batch_fn = with_correction(loss_fn, batch_fn, correction)
        stack.params, last = fit_stacked(
            stack.params,
            loss_fn,
            batch_fn,
            steps,
            self.client_lr(r),
            momentum=cfg.momentum,
            sq_grads=sq_grads,
            what="local training",
        )
        return last

    def client_lr(self, r: int) -> float:
        """Round r's local learning rate (``lr_decay`` per round)."""
        return self.cfg.lr * self.cfg.lr_decay**r

    def digest(self, stack: Stack, r: int, kd: KD, k: int) -> None:
        """FedMD's digest: every client fits the consensus soft labels on the proxy set (KD alone, same lr and
        batch as local training, its own random stream), before it revisits its private data."""
        cfg = self.cfg
        xp, soft, _, temp = kd
        soft = soft.to(stack.device)
        gen = round_generator(self.seed, r, 4)
        steps = local_steps([len(xp)] * k, cfg.distill.digest_epochs, cfg.batch_size)

        def loss_fn(p, xq, tq):
            return soft_target_loss(stack.fwd(p, xq), tq, temp)

        def batch_fn(t):
            q = torch.randint(0, len(xp), (k, cfg.batch_size), generator=gen)
            return as_float(xp[q]).to(stack.device), soft[q]

        stack.params, _ = fit_stacked(
            stack.params, loss_fn, batch_fn, steps, self.client_lr(r), momentum=cfg.momentum, what="the clients' digest"
        )

    def client_accuracy(self, stack: Stack) -> list[float]:
        """Each client model's accuracy on the client evaluation subset of the test set."""
        idx = self.client_eval_idx
        return accuracy_of(stack.logits(self.data.x_test[idx]), self.data.y_test[idx]).tolist()


class WeightExchange:
    """What FedAvg and FedDF share: the global weights go down, client weights come up (codec), with
    SCAFFOLD's control variates riding along both ways when ``federation.scaffold`` is on."""

    def broadcast(self, params: Params, traffic: Traffic) -> dict[str, Params]:
        """Every live client downloads ``params`` (+ the server's control variate); they start from them."""
        out = {"model": params, **({"control": self.controls.c} if self.controls is not None else {})}
        blob = wmod.encode(out, self.cfg.codec)
        got = wmod.decode(blob, self.device)
        for i in range(self.k):
            if i not in self.dead:
                traffic.server_to_peer(i, wmod.nbytes(blob))
                self.stack.set_member(i, got["model"])
        return got

    def correction(self, got: dict[str, Params]) -> Optional[Params]:
        return self.controls.correction(got["control"]) if self.controls is not None else None

    def upload_weights(self, up, senders, got, r: int, traffic: Traffic, poison: Poison) -> dict[str, Params]:
        """The senders' weights (+ SCAFFOLD's control differences) as the server decodes them; bytes counted,
        control variates committed."""
        deltas = None
        if self.controls is not None:
            steps = local_steps(self.counts, self.cfg.local_epochs, self.cfg.batch_size)
            lr = self.client_lr(r)
            deltas = self.controls.client_deltas(got["control"], got["model"], self.stack.params, steps, lr)
            up = {**up, "control": deltas}
        rx, sizes = upload(up, senders, self.cfg.codec, self.device, poison)  # as the server decodes them
        for i, n in zip(senders, sizes):
            traffic.peer_to_server(i, n)
        if deltas is not None:
            total = float(sum(self.counts))
            self.controls.commit(deltas, rx["control"], senders, [self.counts[i] / total for i in senders])
        return rx


class FedAvgRunner(Runner, ClientTraining, WeightExchange):
    """FedAvg of one model: broadcast, local epochs, upload weights, aggregate over the clients that reported.

    Round 1 starts with every client downloading the initial global model (a peer joining).
    """

    mode = "fedavg"

    def __init__(self, cfg, data, seed=0):
        super().__init__(cfg, data, seed)
        self.stack = Stack(
            cfg.backbone, data.input_shape, data.num_classes, self.k, seed, same_init=True, device=self.device
        )
        self.global_params = self.stack.member(0)
        self.server_opt = ServerMomentum(cfg.server_momentum, cfg.server_lr)
        self.controls = Controls(self.stack.params, self.k) if cfg.scaffold else None

    def run_round(self, r: int) -> dict[str, Any]:
        cfg, t0 = self.cfg, time.perf_counter()
        failed = self.failed_this_round(r)
        traffic = Traffic(self.k)
        got = self.broadcast(self.global_params, traffic)
        sq = {n: torch.zeros_like(v) for n, v in self.stack.params.items()} if cfg.aggregator == "fisher" else None
        start = self.global_params
        self.train_clients(self.stack, r, sq_grads=sq, correction=self.correction(got))
        client_acc = self.client_accuracy(self.stack) if self.evaluates(r) else []
        senders = [i for i in range(self.k) if i not in failed]
        up = {"model": self.stack.params, **({"fisher": sq} if sq is not None else {})}
        poison = Poison(self.poisoned, {"model": start}, cfg.poison_scale)
        rx = self.upload_weights(up, senders, got, r, traffic, poison)
        avg = aggregate_stacked(
            rx["model"], [self.counts[i] for i in senders], cfg.aggregator, cfg.trim, rx.get("fisher")
        )
        self.global_params = self.server_opt.step(self.global_params, avg) if self.server_opt.active else avg
        self.end_round_failures(failed)
        acc = model_accuracy(self.stack, self.global_params, self.data.x_test, self.data.y_test)
        return record(r, acc, client_acc, traffic, failed, t0)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack.fwd(self.global_params, as_float(x))

    def modules(self) -> wmod.ModuleStates:
        return {"model": self.global_params}

    def state(self):
        s = {**save_stacked("global", self.global_params), **self.server_opt.state()}
        return {**s, **(self.controls.state() if self.controls is not None else {})}

    def load_state(self, state):
        load_stacked("global", state, self.global_params)
        self.server_opt.load_state(state)
        if self.controls is not None:
            self.controls.load_state(state)
        for i in range(self.k):
            self.stack.set_member(i, self.global_params)


class LocalRunner(Runner, ClientTraining):
    """Standalone local models; no communication. Accuracy = mean over clients (on the client eval subset)."""

    mode = "local"

    def __init__(self, cfg, data, seed=0):
        super().__init__(cfg, data, seed)
        self.stack = Stack(
            cfg.backbone, data.input_shape, data.num_classes, self.k, seed, same_init=True, device=self.device
        )

    def run_round(self, r):
        t0 = time.perf_counter()
        self.train_clients(self.stack, r)
        client_acc = self.client_accuracy(self.stack)
        return record(r, float(np.mean(client_acc)), client_acc, Traffic(self.k), [], t0)

    def state(self):
        return save_stacked("clients", self.stack.params)

    def load_state(self, state):
        load_stacked("clients", state, self.stack.params)


class CentralRunner(Runner, ClientTraining):
    """One model on the pooled data of all clients (a round = ``local_epochs`` epochs over the pool).

    Bytes: every client uploads its raw examples once (round 1), at their stored size.
    """

    mode = "central"

    def __init__(self, cfg, data, seed=0):
        super().__init__(cfg, data, seed)
        self.stack = Stack(cfg.backbone, data.input_shape, data.num_classes, 1, seed, device=self.device)
        self.pooled = replace(data, parts=[torch.cat(data.parts)])

    def run_round(self, r):
        d, t0 = self.data, time.perf_counter()
        traffic = Traffic(self.k)
        if r == 0:
            per_ex = d.x[0].numel() * d.x.element_size() + 8
            for i, c in enumerate(self.counts):
                traffic.peer_to_server(i, c * per_ex)
        self.train_clients(self.stack, r, data=self.pooled)
        acc = model_accuracy(self.stack, self.stack.member(0), d.x_test, d.y_test)
        return record(r, acc, [acc] * self.k, traffic, [], t0)

    def predict(self, x):
        return self.stack.fwd(self.stack.member(0), as_float(x))

    def modules(self) -> wmod.ModuleStates:
        return {"model": self.stack.member(0)}

    def state(self):
        return save_stacked("model", self.stack.params)

    def load_state(self, state):
        load_stacked("model", state, self.stack.params)
