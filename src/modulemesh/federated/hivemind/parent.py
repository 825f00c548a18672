"""The hivemind engine's parent process: starts one process per peer, records what they report."""

from __future__ import annotations

import multiprocessing as mp
import queue
import secrets
import time
from typing import Any, Callable, Optional

import psutil
import torch

from ...errors import ModuleMeshError
from .. import mesh_modules as mm
from .. import weights as wmod
from ..aggregate import aggregate, aggregate_modules
from ..sim.runner import Traffic, record
from .config import BYTES_PER_VALUE, DEFAULT_TIMEOUTS, check_config
from .peer import peer_main, private_view


class Peers:
    """The peer processes and every process below them, stopped on exit even after an error."""

    def __init__(self, ctx):
        self.ctx, self.procs, self.seen = ctx, [], {}
        self.stop = ctx.Event()

    def start(self, *args) -> None:
        p = self.ctx.Process(target=peer_main, args=args, name=f"modulemesh-peer-{args[0]}", daemon=False)
        p.start()
        self.procs.append(p)

    def snapshot(self) -> None:
        """Remember the peers' descendants (DHT, averagers, p2pd): they outlive a killed peer otherwise."""
        for p in self.procs:
            try:
                for c in psutil.Process(p.pid).children(recursive=True):
                    self.seen[c.pid] = c
            except psutil.NoSuchProcess:
                pass

    def dead(self) -> Optional[str]:
        for i, p in enumerate(self.procs):
            if p.exitcode is not None and p.exitcode != 0:
                return f"peer {i} exited with code {p.exitcode}"
        return None

    def close(self, grace: float) -> None:
        self.snapshot()
        self.stop.set()
        for p in self.procs:
            p.join(grace)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        left = [c for c in self.seen.values() if c.is_running()]
        for c in left:
            try:
                c.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(left, timeout=5)
        for c in alive:
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass


def next_report(reports, peers: Peers, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        peers.snapshot()
        try:
            msg = reports.get(timeout=0.5)
        except queue.Empty:
            why = peers.dead()
            if why or time.monotonic() > deadline:
                raise ModuleMeshError(f"hivemind run stalled: {why or f'no peer reported for {timeout:.0f} s'}")
            continue
        if msg[0] == "error":
            raise ModuleMeshError(f"hivemind peer {msg[1]} failed: {msg[2]}")
        return msg


def evaluator(exp, data) -> Callable[[wmod.ModuleStates], float]:
    """Test accuracy of the assembled model (the whole model, or the mesh of all modules)."""
    from ..sim.stacked import Stack, model_accuracy

    fc = exp.federation
    if fc.mode == "fedavg":
        stack = Stack(fc.backbone, data.input_shape, data.num_classes, 1, exp.seed, device=data.device)
        return lambda mods: model_accuracy(
            stack, {n: v.to(data.device) for n, v in mods["model"].items()}, data.x_test, data.y_test
        )
    return lambda mods: mm.mesh_accuracy(
        mm.mesh_of(fc, mods, data.input_shape, data.num_classes, data.device), data.x_test, data.y_test
    )


def hosting_plan(fc) -> list[list[str]]:
    """Module names each peer hosts: the mesh's ``m<j>`` (``mesh_modules.hosting_plan``), or the whole ``model``."""
    return [["model"] for _ in range(fc.clients)] if fc.mode == "fedavg" else mm.hosting_plan(fc)


def join_traffic(plan: list[list[str]], sizes: dict[str, int], traffic: Traffic) -> None:
    """Modelled: a joining peer downloads each module it hosts from another host (or a publisher)."""
    for p, mods in enumerate(plan):
        for m in mods:
            src = next((q for q in range(len(plan)) if q != p and m in plan[q]), None)
            if src is None:
                traffic.server_to_peer(p, sizes[m])
            else:
                traffic.peer_to_peer(src, p, sizes[m])


def run_hivemind(
    exp, data, on_round: Optional[Callable[[dict], None]] = None, timeouts: Optional[dict] = None
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor], wmod.ModuleStates]:
    """Run ``exp`` with one process per peer on loopback.

    Returns (per-round records, saved tensors, final modules). The saved tensors are each peer's
    modules after the last averaging (``peer<p>/<module>/<param>``) and its own weights just before
    it (``trained/peer<p>/<module>/<param>``); the final modules are each module FedAvg'd over its hosts.
    """
    from ...config import to_dict

    fc = exp.federation
    check_config(fc)
    t = {**DEFAULT_TIMEOUTS, **(timeouts or {})}
    plan = hosting_plan(fc)
    exp_dict = to_dict(exp)
    run_id = f"mm{secrets.token_hex(4)}"  # DHT keys and averager prefixes of this run only
    evaluate = evaluator(exp, data)
    ctx = mp.get_context("spawn")  # a fresh interpreter per peer: no forked torch/thread state
    reports, boot = ctx.Queue(), ctx.Queue()
    peers = Peers(ctx)
    history: list[dict[str, Any]] = []
    state: dict[str, torch.Tensor] = {}
    final: wmod.ModuleStates = {}
    bpv = BYTES_PER_VALUE[fc.codec]
    ok = False
    try:
        for pid in range(fc.clients):
            peers.start(pid, exp_dict, private_view(data, pid), plan, boot, run_id, reports, peers.stop, t)
        msg = next_report(reports, peers, t["startup"])
        for _ in range(1, fc.clients):
            boot.put(msg[2])
        cum, pending = 0, {}
        t0 = time.perf_counter()
        for r in range(fc.rounds):
            while len(pending.get(r, {})) < fc.clients:
                msg = next_report(reports, peers, t["round"])
                if msg[0] == "round":
                    pending.setdefault(msg[2], {})[msg[1]] = msg[3]
            by_peer = pending.pop(r)
            got = [by_peer[p] for p in range(fc.clients)]
            counts = [g["examples"] for g in got]
            mods = [wmod.decode(g["modules"]) for g in got]
            traffic = Traffic(fc.clients)
            if r == 0:
                sizes = {m: sum(v.numel() for v in s.values()) * bpv for mm_ in mods for m, s in mm_.items()}
                join_traffic(plan, sizes, traffic)
            for p, g in enumerate(got):  # all-reduce: what a peer sends, its group receives, and vice versa
                traffic.sent[p] += g["sent"]
                traffic.received[p] += g["received"]
            client_acc = [g["accuracy"] for g in got]
            extra = {}
            final = aggregate_modules(mods, counts)
            if (
                fc.mode == "fedavg"
            ):  # all peers hold the average now; score it, as the sim engine scores its global model
                acc = evaluate({"model": aggregate([m["model"] for m in mods], counts)})
            else:  # as ModulesRunner: mean over peers' own meshes, plus the mesh of all modules
                acc = sum(client_acc) / len(client_acc)
                extra["mesh_accuracy"] = evaluate(final)
            rec = record(
                r,
                acc,
                client_acc,
                traffic,
                [],
                t0,
                engine="hivemind",
                bytes_basis="modelled",
                peer_examples=counts,
                **extra,
            )
            cum += rec["bytes_sent"]
            rec["bytes_cumulative"] = cum
            history.append(rec)
            if on_round:
                on_round(rec)
            t0 = time.perf_counter()
        for p, (g, m) in enumerate(zip(got, mods)):  # the last round's tensors
            state.update(wmod.flatten(m, prefix=f"peer{p}/"))
            state.update(wmod.flatten(wmod.decode(g["trained"]), prefix=f"trained/peer{p}/"))
        ok = True
    finally:
        peers.close(grace=30 if ok else 5)
        for q in (reports, boot):
            q.close()
            q.join_thread()
    return history, state, final
