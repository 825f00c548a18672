"""Decentralized peers hosting mesh experts on a topology, no server (seed 000 §3.3D, seed 001 §2.2).

Each peer's model is a ``ModuleMesh`` of the ``Expert``s it hosts, routed by the library's
``EntropyRouter`` (``mesh_modules``). Local loss (seed 000): ``NLL(mesh) + alpha KL(start-of-round
mesh || mesh) + beta H(w)``; the sparsity term is the routing entropy (``mesh.regularizers``), not
seed 000's L1 norm of softmax weights (always 1, no gradient). After training, a peer sends each
module it changed (relative change above ``send_threshold``) to the neighbours that host the same
module; each peer then replaces its copy by the aggregate (``aggregator``, weighted by example
counts) of its own copy and the copies it received. When a peer joins (round 1) it downloads its
modules from a co-host (or, with none, from wherever the modules are published).
"""

from __future__ import annotations

import math
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from ...mesh.mesh import ModuleMesh
from ...mesh.regularizers import routing_entropy
from ...training.fit import fit_stacked
from ...training.losses import soft_target_loss
from .. import mesh_modules as mm
from .. import topology as topo_mod
from .. import weights as wmod
from ..aggregate import aggregate_modules
from .data import BatchSampler, as_float, local_steps, round_generator
from .runner import Runner, Traffic, load_stacked, poisoned_update, record, save_stacked
from .stacked import Params, accuracy_of


class ModulesRunner(Runner):
    """Peers training their hosted experts, sharing them with neighbours that host the same ones.

    ``hosted`` (module names per peer) defaults to ``mesh_modules.hosting_plan``; a single peer of
    the Flower or hivemind engine passes its own. ``init_seed`` (default ``seed``) seeds the
    modules' initial weights, ``seed`` the peer's minibatch stream and evaluation subset.
    """

    mode = "modules"

    def __init__(
        self, cfg, data, seed=0, hosted: Optional[Sequence[Sequence[str]]] = None, init_seed: Optional[int] = None
    ):
        super().__init__(cfg, data, seed)
        mc = cfg.modules
        self.hosted = [list(h) for h in (hosted if hosted is not None else mm.hosting_plan(cfg))]
        self.h = len(self.hosted[0])
        self.graph = topo_mod.build(mc.topology, self.k, mc.degree, seed)
        self.template = mm.peer_template(cfg, data.input_shape, data.num_classes, self.h, self.device)
        init_seed = seed if init_seed is None else init_seed
        inits = {
            m: mm.initial_module(cfg, data.input_shape, data.num_classes, init_seed, m, self.device)
            for m in sorted({m for h in self.hosted for m in h})
        }
        self.init_bytes = {m: len(wmod.encode({m: s}, cfg.codec)[m]) for m, s in inits.items()}
        # training layout: {expert param: (K peers, h hosted modules, ...)}
        self.params = wmod.stack([wmod.stack([inits[m] for m in h]) for h in self.hosted])
        self.last_sent = {n: v.clone() for n, v in self.params.items()}

    # -- the peers' meshes
    def peer_forward(self, p: Params, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One peer's mesh (``p``: {param: (h, ...)}) on a batch: (log-probs (B, C), routing weights (B, h))."""
        out = functional_call(self.template, mm.slot_params([wmod.unstack(p, j) for j in range(self.h)]), (x,))
        return out.log_probs, out.weights

    @torch.no_grad()
    def peer_log_probs(self, x: torch.Tensor, params: Optional[Params] = None, batch: int = 2048) -> torch.Tensor:
        """``(K, N, C)`` log-probabilities of every peer's mesh."""
        params = self.params if params is None else params
        f = vmap(lambda p, xb: self.peer_forward(p, xb)[0], in_dims=(0, None))
        return torch.cat([f(params, as_float(x[i : i + batch])) for i in range(0, len(x), batch)], dim=1)

    def peer_modules(self, p: int) -> wmod.ModuleStates:
        """Peer p's hosted modules in the module encoding (copies)."""
        return {m: {n: v[p, j].clone() for n, v in self.params.items()} for j, m in enumerate(self.hosted[p])}

    def set_peer_modules(self, p: int, states: wmod.ModuleStates) -> None:
        for j, m in enumerate(self.hosted[p]):
            if m in states:
                for n, v in states[m].items():
                    self.params[n][p, j] = v.to(self.device)

    def trainable(self, r: int) -> torch.Tensor:
        """(K, h) mask of the modules each peer trains this round (round-robin over its modules)."""
        n_train = max(1, math.ceil(self.cfg.modules.update_fraction * self.h))
        mask = torch.zeros(self.k, self.h, device=self.device)
        for j in range(n_train):
            mask[:, (r * n_train + j) % self.h] = 1.0
        return mask

    # -- one round
    def run_round(self, r):
        t0 = time.perf_counter()
        failed = self.failed_this_round(r)
        traffic = Traffic(self.k)
        if r == 0:
            self.count_join_downloads(traffic, failed)
        start, sq = self.train_local(r)
        n_sent = self.share_and_merge(failed, start, sq, traffic)
        self.end_round_failures(failed)
        client_acc, mesh_acc = [], float("nan")
        if self.evaluates(r):
            idx, d = self.client_eval_idx, self.data
            client_acc = accuracy_of(self.peer_log_probs(d.x_test[idx]), d.y_test[idx]).tolist()
            mesh_acc = mm.mesh_accuracy(self.mesh(), d.x_test, d.y_test)
        acc = float(np.mean(client_acc)) if client_acc else float("nan")
        return record(r, acc, client_acc, traffic, failed, t0, mesh_accuracy=mesh_acc, modules_sent=n_sent)

    def count_join_downloads(self, traffic: Traffic, failed: Sequence[int] = ()) -> None:
        """Each peer fetches its modules when it joins: from a live neighbour hosting them, else any live host.

        With no live co-host the module comes from where it is published (counted as server traffic).
        """
        for p, mods in enumerate(self.hosted):
            for m in mods:
                hosts = [q for q in self.graph[p] if m in self.hosted[q]] + [
                    q for q in range(self.k) if m in self.hosted[q]
                ]
                src = next((q for q in hosts if q != p and q not in failed), None)
                if src is None:
                    traffic.server_to_peer(p, self.init_bytes[m])
                else:
                    traffic.peer_to_peer(src, p, self.init_bytes[m])

    def train_local(self, r: int) -> tuple[Params, Optional[Params]]:
        """Train every peer's trainable modules on its own data; returns (start params, Fisher or None)."""
        cfg, mc, d = self.cfg, self.cfg.modules, self.data
        start = {n: v.clone() for n, v in self.params.items()}
        train_mask = self.trainable(r)
        sampler = BatchSampler(d.parts, cfg.batch_size, round_generator(self.seed, r, 1))
        steps = local_steps(self.counts, cfg.local_epochs, cfg.batch_size)
        alpha, beta, temp = mc.distill_weight, mc.sparse_weight, mc.temperature

        def loss_fn(p, p0, xb, yb):
            logp, w = self.peer_forward(p, xb)
            loss = F.nll_loss(logp, yb)
            if alpha > 0:
                loss = loss + alpha * soft_target_loss(logp, self.peer_forward(p0, xb)[0], temp)
            if beta > 0:
                loss = loss + beta * routing_entropy(w)
            return loss

        def batch_fn(t):
            idx = sampler()
            return start, as_float(d.x[idx]), d.y[idx]

        sq = {n: torch.zeros_like(v) for n, v in start.items()} if cfg.aggregator == "fisher" else None
        self.params, _ = fit_stacked(
            self.params,
            loss_fn,
            batch_fn,
            steps,
            cfg.lr * cfg.lr_decay**r,
            momentum=cfg.momentum,
            sq_grads=sq,
            mask=train_mask,
            what=f"peer training in round {r + 1}",
        )
        return start, sq

    def share_and_merge(self, failed: list[int], start: Params, sq: Optional[Params], traffic: Traffic) -> int:
        """Selective sharing with co-hosting neighbours, then per-module consensus; returns modules sent."""
        cfg = self.cfg
        changed = self.changed()
        outgoing: dict[tuple[int, str], tuple[dict, Optional[dict]]] = {}
        for p in range(self.k):
            if p in failed:
                continue
            for j, m in enumerate(self.hosted[p]):
                if not changed[p, j]:
                    continue
                st = {n: v[p, j] for n, v in self.params.items()}
                if p in self.poisoned:
                    st = poisoned_update({n: v[p, j] for n, v in start.items()}, st, cfg.poison_scale)
                msg = {
                    m: st,
                    **({"fisher": {n: v[p, j] for n, v in sq.items()}} if sq is not None else {}),
                }
                blobs = wmod.encode(msg, cfg.codec)
                rx = wmod.decode(blobs, self.device)
                for q in self.graph[p]:
                    if m in self.hosted[q] and q not in self.dead:
                        traffic.peer_to_peer(p, q, wmod.nbytes(blobs), delivered=q not in failed)
                        if q not in failed:
                            outgoing[(p, m)] = (rx[m], rx.get("fisher"))
                for n in st:
                    self.last_sent[n][p, j] = self.params[n][p, j]
        new = {n: v.clone() for n, v in self.params.items()}
        for q in range(self.k):
            if q in failed:
                continue
            for j, m in enumerate(self.hosted[q]):
                contribs = [{m: {n: v[q, j] for n, v in self.params.items()}}]
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
                for n, v in agg.items():
                    new[n][q, j] = v
        self.params = new
        return len(outgoing)

    def changed(self) -> torch.Tensor:
        """(K, h): which hosted modules moved more than ``send_threshold`` (relative) since last sent."""
        thr = self.cfg.modules.send_threshold
        diff = torch.zeros(self.k, self.h, device=self.device)
        norm = torch.zeros(self.k, self.h, device=self.device)
        for n, v in self.params.items():
            dv = (v - self.last_sent[n]).flatten(2)
            diff += (dv * dv).sum(-1)
            norm += (self.last_sent[n].flatten(2) ** 2).sum(-1)
        rel = diff.sqrt() / norm.sqrt().clamp_min(1e-12)
        return (rel > thr) & (diff > 0)

    # -- the whole federation's mesh
    def consensus_modules(self) -> wmod.ModuleStates:
        """Each module averaged (weighted by examples) over all its holders."""
        sums: dict[str, dict[str, torch.Tensor]] = {}
        wsum: dict[str, float] = {}
        for p in range(self.k):
            for j, m in enumerate(self.hosted[p]):
                acc = sums.setdefault(m, {n: torch.zeros_like(v[p, j]) for n, v in self.params.items()})
                for n, v in self.params.items():
                    acc[n] += self.counts[p] * v[p, j]
                wsum[m] = wsum.get(m, 0.0) + self.counts[p]
        return {m: {n: v / max(wsum[m], 1e-12) for n, v in s.items()} for m, s in sums.items()}

    def mesh(self, rounds: int = 0) -> ModuleMesh:
        """All modules (consensus over holders) in one mesh, with each expert's provenance."""
        holders, examples = mm.holders_of(self.hosted, self.counts)
        meta = mm.provenance("sim", rounds, holders, examples)
        return mm.mesh_of(
            self.cfg, self.consensus_modules(), self.data.input_shape, self.data.num_classes, self.device, meta
        )

    def mesh_accuracy(self) -> float:
        return mm.mesh_accuracy(self.mesh(), self.data.x_test, self.data.y_test)

    def state(self):
        return {**save_stacked("peers", self.params), **save_stacked("last_sent", self.last_sent)}

    def load_state(self, state):
        load_stacked("peers", state, self.params)
        load_stacked("last_sent", state, self.last_sent)
