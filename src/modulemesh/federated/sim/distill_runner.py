"""Federated distillation (seed 004): clients send proxy-set logits, a server student learns from their aggregate.

Logit FD, round r: clients train on their data (+ KD toward round r-1's global soft labels on the proxy
set, weight ``client_weight``); each reporting client sends its proxy logits (codec); the server
aggregates them with confidence weights (``logit_distill.aggregate_logits``) and the ``Student``
learns them by KD at temperature T; the global soft labels are broadcast (codec) at the start of
round r+1. Bytes include shipping the public proxy images to every client when it joins (round 1).

Switches from the literature (``federation.distill``): ``feddf`` (Lin et al. 2020: clients exchange
weights as in FedAvg and the server distills the ensemble into the average, so the proxy set never
leaves the server), ``sharpen`` (DS-FL's entropy-reduction aggregation), ``ema`` (an exponential
moving average of the global model across rounds, evaluated in its place), ``proxy_size``,
``class_weights="counts"`` (each client's per-class training counts, uploaded once with its first
logits or weights, weight its soft labels per class: ``logit_distill.per_class_weights``),
``digest_epochs`` (FedMD's digest: clients fit the global soft labels on the proxy set before local training).
"""

from __future__ import annotations

import math
import time
from typing import Optional

import torch
import torch.nn.functional as F

from ...errors import ConfigError, TrainingError
from ...training.fit import fit_stacked
from ...training.losses import soft_target_loss
from .. import compress
from .. import weights as wmod
from ..aggregate import aggregate_stacked
from ..logit_distill import aggregate_logits, sharpen
from ..server_opt import ServerMomentum
from .data import FedData, as_float, round_generator
from .runner import Runner, Traffic, load_stacked, record, save_stacked
from .scaffold import Controls
from .stacked import Params, Stack, accuracy_of, model_accuracy
from .upload import Poison
from .weight_runners import ClientTraining, WeightExchange


def adam_steps(params: Params, loss_fn, batch_fn, steps: int, lr: float) -> Params:
    """``steps`` Adam steps on a one-model stack (``params`` with a leading axis of 1), fresh moments each call.

    ``loss_fn(p, *batch)`` and ``batch_fn(t)`` as for ``fit_stacked`` (batches with a leading axis of 1).
    """
    p = {n: v[0].detach().clone().requires_grad_(True) for n, v in params.items()}
    opt = torch.optim.Adam(list(p.values()), lr=lr)
    for t in range(steps):
        loss = loss_fn(p, *(b[0] for b in batch_fn(t)))
        if not torch.isfinite(loss):
            raise TrainingError(
                f"the student's distillation diverged (loss {float(loss)}) at step {t}; lower student_lr"
            )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {n: v.detach().unsqueeze(0) for n, v in p.items()}


class Student:
    """The server's model: learns the aggregated soft labels on the proxy set by KD."""

    def __init__(self, cfg, data: FedData, seed: int):
        self.cfg, self.data, self.seed = cfg, data, seed
        dc = cfg.distill
        self.stack = Stack(
            dc.student_backbone or cfg.backbone,
            data.input_shape,
            data.num_classes,
            1,
            seed + 1,
            device=data.device,
            name="student",
        )
        self.soft: Optional[torch.Tensor] = None  # (N_proxy, C) global soft labels (as logits)
        self.ema: Optional[Params] = None  # EMA of the weights across rounds (distill.ema > 0)

    def aggregate(
        self,
        logits: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        class_counts: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Global soft labels from client logits ``(K, N, C)`` (``mask``: which clients answered;
        ``class_counts`` ``(K, C)``: the senders' per-class training counts, used when ``class_weights="counts"``)."""
        dc = self.cfg.distill
        if dc.class_weights == "none":
            class_counts = None
        elif class_counts is None:
            raise ConfigError("distill.class_weights='counts' needs the clients' class counts; none were received")
        soft = aggregate_logits(
            logits.to(self.data.device), dc.score, dc.tau, mask, dc.space, dc.robust, self.cfg.trim, class_counts
        )
        self.soft = sharpen(soft, dc.sharpen)
        return self.soft

    def start_from(self, params: Params) -> None:
        """FedDF: this round's distillation starts from the FedAvg of the client weights."""
        self.stack.params = {
            n: params[n].to(v.device, v.dtype).unsqueeze(0).clone() for n, v in self.stack.params.items()
        }

    def update_ema(self) -> None:
        """``ema <- d * ema + (1 - d) * weights`` after each round (starts at round 1's weights)."""
        d = self.cfg.distill.ema
        if d <= 0:
            return
        now = self.stack.member(0)
        self.ema = now if self.ema is None else {n: d * self.ema[n] + (1 - d) * now[n] for n in now}

    def weights(self) -> Params:
        """The global model as evaluated and published: the EMA when enabled, else the current weights."""
        return self.ema if self.ema is not None else self.stack.member(0)

    def learn(self, r: int) -> None:
        """``student_epochs`` of KD toward the current soft labels (round ``r``'s random stream)."""
        dc, d = self.cfg.distill, self.data
        gen = round_generator(self.seed, r, 2)
        n = len(d.x_proxy)
        steps = torch.tensor([max(1, math.ceil(dc.student_epochs * n / dc.student_batch_size))])
        soft, temp = self.soft, dc.temperature

        def loss_fn(p, xq, tq):
            return soft_target_loss(self.stack.fwd(p, xq), tq, temp)

        def batch_fn(t):
            q = torch.randint(0, n, (1, dc.student_batch_size), generator=gen)
            return as_float(d.x_proxy[q]), soft[q]

        if dc.student_optimizer == "adam":
            self.stack.params = adam_steps(self.stack.params, loss_fn, batch_fn, int(steps[0]), dc.student_lr)
        else:
            self.stack.params, _ = fit_stacked(
                self.stack.params,
                loss_fn,
                batch_fn,
                steps,
                dc.student_lr,
                momentum=self.cfg.momentum,
                what="the student's distillation",
            )
        self.update_ema()

    def accuracy(self) -> float:
        return model_accuracy(self.stack, self.weights(), self.data.x_test, self.data.y_test)

    def teacher_accuracy(self) -> float:
        """Accuracy of the aggregated soft labels on the proxy set (a diagnostic: proxy labels are never trained on)."""
        return float(accuracy_of(self.soft, self.data.y_proxy))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack.fwd(self.weights(), as_float(x))


def poisoned_logits(logits: torch.Tensor, num_classes: int, scale: float) -> torch.Tensor:
    """What a poisoned client sends: confidently wrong logits."""
    wrong = (logits.argmax(1) + 1) % num_classes
    return F.one_hot(wrong, num_classes).float() * scale


class CountsTable:
    """The server's copy of each client's per-class training counts (``class_weights="counts"``).

    A client sends its counts once, as ``int32`` beside its first logits or weights; ``send`` records
    those bytes in the round's ``Traffic``. Counting them is all a client reveals beyond FD's logits:
    its label distribution (FedGen and FedFTG share it too).
    """

    def __init__(self, k: int, num_classes: int, device):
        self.table = torch.zeros(k, num_classes, device=device)
        self.known = torch.zeros(k, dtype=torch.bool, device=device)

    @staticmethod
    def nbytes(num_classes: int) -> int:
        return 4 * num_classes  # int32 per class

    def send(self, i: int, counts: torch.Tensor, traffic: Traffic) -> None:
        if not bool(self.known[i]):
            self.table[i] = counts.to(self.table)
            self.known[i] = True
            traffic.peer_to_server(i, self.nbytes(self.table.shape[1]))

    def state(self) -> dict[str, torch.Tensor]:
        return {"class_counts/table": self.table, "class_counts/known": self.known}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if "class_counts/table" in state:
            self.table = state["class_counts/table"].to(self.table)
            self.known = state["class_counts/known"].to(self.known)


class DistillRunner(Runner, ClientTraining, WeightExchange):
    """Federated distillation with confidence-weighted logit aggregation (seed 004)."""

    mode = "distill"

    def __init__(self, cfg, data, seed=0):
        super().__init__(cfg, data, seed)
        if len(data.x_proxy) == 0:
            raise ConfigError("federated distillation needs a public proxy set; set federation.distill.proxy_size > 0")
        self.stack = Stack(
            cfg.backbone, data.input_shape, data.num_classes, self.k, seed, same_init=False, device=self.device
        )
        if cfg.distill.feddf and cfg.distill.student_backbone not in (None, cfg.backbone):
            raise ConfigError(
                "FedDF averages client weights into the global model; unset federation.distill.student_backbone "
                "(it must equal federation.backbone)"
            )
        self.student = Student(cfg, data, seed)
        self.uses_counts = cfg.distill.class_weights != "none"
        self.counts_rx = CountsTable(self.k, data.num_classes, self.device)
        self.server_opt = ServerMomentum(cfg.server_momentum, cfg.server_lr)  # FedDF's FedAvgM step
        self.controls = Controls(self.stack.params, self.k) if cfg.scaffold else None  # validated: FedDF only

    def client_class_counts(self, i: int) -> torch.Tensor:
        """Client i's training examples per class (what it sends when ``class_weights="counts"``)."""
        return torch.bincount(self.data.y[self.data.parts[i]].long(), minlength=self.data.num_classes)

    def send_counts(self, i: int, traffic: Traffic) -> None:
        if self.uses_counts:
            self.counts_rx.send(i, self.client_class_counts(i), traffic)

    @property
    def soft(self) -> Optional[torch.Tensor]:
        return self.student.soft

    def run_round(self, r):
        if self.cfg.distill.feddf:
            return self.feddf_round(r)
        cfg, dc, d, t0 = self.cfg, self.cfg.distill, self.data, time.perf_counter()
        failed = self.failed_this_round(r)
        traffic = Traffic(self.k)
        kd = None
        if r == 0:  # joining clients download the public proxy images
            for i in range(self.k):
                traffic.server_to_peer(i, d.proxy_nbytes())
        elif self.soft is not None:
            blob = compress.encode(self.soft, cfg.codec)
            soft_rx = compress.decode(blob).float().to(self.device)
            for i in range(self.k):
                if i not in self.dead:
                    traffic.server_to_peer(i, len(blob))
            if dc.client_weight > 0 or dc.digest_epochs > 0:
                kd = (d.x_proxy, soft_rx, dc.client_weight, dc.temperature)
        self.train_clients(self.stack, r, kd)
        client_acc = self.client_accuracy(self.stack) if self.evaluates(r) else []
        logits = self.stack.logits(d.x_proxy)  # (K, N, C)
        got = torch.zeros_like(logits)
        mask = torch.zeros(self.k, dtype=torch.bool, device=self.device)
        for i in range(self.k):
            if i in failed:
                continue
            li = poisoned_logits(logits[i], d.num_classes, cfg.poison_scale) if i in self.poisoned else logits[i]
            blob = compress.encode(li, cfg.codec)
            traffic.peer_to_server(i, len(blob))
            self.send_counts(i, traffic)
            got[i] = compress.decode(blob).float().to(self.device)
            mask[i] = True
        self.student.aggregate(got, mask, self.counts_rx.table)
        return self.close_round(r, client_acc, traffic, failed, t0)

    def feddf_round(self, r):
        """FedDF: broadcast the global weights, local epochs, upload weights; FedAvg them, then distill the
        ensemble of the received models (their proxy logits, computed on the server) into that average."""
        cfg, d, t0 = self.cfg, self.data, time.perf_counter()
        failed = self.failed_this_round(r)
        traffic = Traffic(self.k)
        got = self.broadcast(self.student.stack.member(0), traffic)
        start = got["model"]
        self.train_clients(self.stack, r, correction=self.correction(got))
        client_acc = self.client_accuracy(self.stack) if self.evaluates(r) else []
        senders = [i for i in range(self.k) if i not in failed]
        poison = Poison(self.poisoned, {"model": start}, cfg.poison_scale)
        rx = self.upload_weights({"model": self.stack.params}, senders, got, r, traffic, poison)
        for i in senders:
            self.send_counts(i, traffic)
        logits = self.stack.logits(d.x_proxy, params=rx["model"])  # the server runs each received model
        self.student.aggregate(logits, class_counts=self.counts_rx.table[senders])
        avg = aggregate_stacked(rx["model"], [self.counts[i] for i in senders], cfg.aggregator, cfg.trim)
        opt = self.server_opt
        self.student.start_from(opt.step(self.student.stack.member(0), avg) if opt.active else avg)
        return self.close_round(r, client_acc, traffic, failed, t0)

    def close_round(self, r, client_acc, traffic, failed, t0):
        """The server's distillation of the round, then its record (both FD and FedDF end so)."""
        self.student.learn(r)
        self.end_round_failures(failed)
        return record(
            r,
            self.student.accuracy(),
            client_acc,
            traffic,
            failed,
            t0,
            teacher_proxy_accuracy=self.student.teacher_accuracy(),
        )

    def predict(self, x):
        return self.student.predict(x)

    def modules(self) -> wmod.ModuleStates:
        return {"student": self.student.weights()}

    def state(self):
        s = {**save_stacked("clients", self.stack.params), **save_stacked("student", self.student.stack.params)}
        if self.soft is not None:
            s["soft/labels"] = self.soft
        if self.student.ema is not None:
            s.update(wmod.flatten({"student_ema": self.student.ema}))
        s.update(self.controls.state() if self.controls is not None else {})
        return {**s, **self.counts_rx.state(), **self.server_opt.state()}

    def load_state(self, state):
        load_stacked("clients", state, self.stack.params)
        load_stacked("student", state, self.student.stack.params)
        soft = state.get("soft/labels")
        self.student.soft = soft.to(self.device) if soft is not None else None
        ema = wmod.unflatten(state).get("student_ema")
        self.student.ema = {n: v.to(self.device) for n, v in ema.items()} if ema else None
        self.counts_rx.load_state(state)
        self.server_opt.load_state(state)
        if self.controls is not None:
            self.controls.load_state(state)
