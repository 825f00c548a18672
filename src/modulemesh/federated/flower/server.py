"""The Flower ServerApp's rounds: per-module averaging (fedavg, modules) or federated distillation.

Bytes are what the messages carry: ``ArrayRecord.count_bytes()`` of every record sent, recorded
once per transfer (``sim.runner.Traffic``), the proxy images of round 1 included.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ...errors import ConfigError, ModuleMeshError
from .. import compress
from .. import mesh_modules as mm
from .. import weights as wmod
from ..aggregate import aggregate_modules
from ..server_opt import ServerMomentum
from ..sim import Student
from ..sim.distill_runner import CountsTable
from ..sim.runner import Traffic, record
from ..sim.stacked import Stack, model_accuracy
from .records import (
    blob_record,
    experiment,
    get_modules,
    modules_nbytes,
    put_modules,
    record_blob,
    record_tensor,
    run_data,
    tensor_record,
)

OnRound = Optional[Callable[[dict], None]]


def wait_for_nodes(grid: Grid, n: int, timeout: float = 120.0) -> list[int]:
    t0 = time.time()
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) >= n:
            return ids[:n]
        if time.time() - t0 > timeout:
            raise ConfigError(
                f"only {len(ids)} of {n} Flower nodes connected within {timeout:.0f} s; start more supernodes"
            )
        time.sleep(0.5)


def server_main(grid: Grid, exp_dict: dict, sink: list, on_round: OnRound = None) -> wmod.ModuleStates:
    """All rounds; appends each round's record to ``sink``; returns the final modules."""
    exp = experiment(exp_dict)
    fc = exp.federation
    if fc.mode not in ("fedavg", "modules", "distill"):
        raise ConfigError(f"mode {fc.mode!r} has no Flower version; use --engine sim for the local/central baselines")
    data = run_data(exp_dict)
    nodes = wait_for_nodes(grid, fc.clients)
    if fc.mode == "distill":
        return distill_rounds(grid, exp, data, nodes, sink, on_round)
    return module_rounds(grid, exp, data, nodes, sink, on_round)


def _emit(sink: list, on_round: OnRound, rec: dict) -> None:
    rec["bytes_cumulative"] = (sink[-1]["bytes_cumulative"] if sink else 0) + rec["bytes_sent"]
    sink.append(rec)
    if on_round:
        on_round(rec)


def module_rounds(grid: Grid, exp, data, nodes: list[int], sink: list, on_round: OnRound) -> wmod.ModuleStates:
    """fedavg (one module, ``model``) and modules (the mesh's experts): each averaged over its senders."""
    fc = exp.federation
    dev = data.device  # the server evaluates where the data lives; messages carry CPU tensors
    if fc.mode == "fedavg":
        model = Stack(fc.backbone, data.input_shape, data.num_classes, 1, exp.seed, device=dev)
        glob = {"model": {n: v.cpu() for n, v in model.member(0).items()}}

        def evaluate(g):
            return model_accuracy(model, {n: v.to(dev) for n, v in g["model"].items()}, data.x_test, data.y_test)
    else:
        glob = {
            m: mm.initial_module(fc, data.input_shape, data.num_classes, exp.seed, m)
            for p in mm.hosting_plan(fc)
            for m in p
        }

        def evaluate(g):
            return mm.mesh_accuracy(
                mm.mesh_of(fc, g, data.input_shape, data.num_classes, dev), data.x_test, data.y_test
            )

    method = fc.aggregator if fc.aggregator != "fisher" else "mean"
    server_opt = ServerMomentum(fc.server_momentum, fc.server_lr)
    control = zero_control(glob["model"]) if fc.scaffold else None  # SCAFFOLD's c (fedavg only: validated)
    for r in range(fc.rounds):
        t0 = time.perf_counter()
        traffic = Traffic(len(nodes))
        content = RecordDict({"config": ConfigRecord({"server-round": r + 1})})
        down = put_modules(content, {**glob, **({"control": control} if control is not None else {})})
        msgs = []
        for i, node in enumerate(nodes):
            traffic.server_to_peer(i, down)
            msgs.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        contribs, weights = [], []
        for msg in grid.send_and_receive(msgs):
            if msg.has_error():
                continue
            traffic.peer_to_server(nodes.index(msg.metadata.src_node_id), modules_nbytes(msg.content))
            contribs.append(get_modules(msg.content))
            weights.append(float(msg.content["metrics"]["num-examples"]))
        if not contribs:
            raise ModuleMeshError(f"no Flower client returned weights in round {r + 1}")
        if control is not None:
            add_control_deltas(control, [c.pop("control") for c in contribs], weights, sum(data.counts))
        agg = aggregate_modules(contribs, weights, method, fc.trim)
        if server_opt.active:  # FedAvgM (fedavg mode only: the config validator says so)
            agg["model"] = server_opt.step(glob["model"], agg["model"])
        glob.update(agg)  # modules nobody sent keep their value
        acc = evaluate(glob)
        extra = {"mesh_accuracy": acc} if fc.mode == "modules" else {}
        _emit(sink, on_round, record(r, acc, [], traffic, [], t0, engine="flower", **extra))
    return glob


def zero_control(like: dict) -> dict:
    """SCAFFOLD's server control variate c, zero at the start (``sim.scaffold``)."""
    return {n: torch.zeros_like(v).cpu() for n, v in like.items()}


def add_control_deltas(control: dict, deltas: list, weights: list, total: float) -> None:
    """``c += sum_i (n_i / N) (c_i+ - c_i)`` over the clients that reported (as ``sim.scaffold.Controls.commit``)."""
    for n in control:
        control[n] += sum((w / total) * d[n].to(control[n]) for d, w in zip(deltas, weights))


def take_counts(table: CountsTable, i: int, content: RecordDict, traffic: Traffic) -> None:
    """A node's per-class training counts, sent with its first upload (``class_weights="counts"``)."""
    if "class-counts" in content.array_records:
        rec = content["class-counts"]
        table.table[i] = record_tensor(rec).to(table.table)
        table.known[i] = True
        traffic.peer_to_server(i, int(rec.count_bytes()))


def feddf_rounds(grid: Grid, exp, data, nodes: list[int], sink: list, on_round: OnRound) -> wmod.ModuleStates:
    """FedDF: the global weights go out, client weights come back; the server averages them and distills the
    ensemble of the received models on its proxy set into the average (``sim.Student``, as the sim engine)."""
    fc = exp.federation
    student = Student(fc, data, exp.seed)
    counts = CountsTable(len(nodes), data.num_classes, data.device)
    method = fc.aggregator if fc.aggregator != "fisher" else "mean"
    server_opt = ServerMomentum(fc.server_momentum, fc.server_lr)  # FedAvgM on the average, before distillation
    control = zero_control(student.stack.member(0)) if fc.scaffold else None
    for r in range(fc.rounds):
        t0 = time.perf_counter()
        traffic = Traffic(len(nodes))
        content = RecordDict({"config": ConfigRecord({"server-round": r + 1})})
        down = put_modules(
            content, {"model": student.stack.member(0), **({"control": control} if control is not None else {})}
        )
        for i in range(len(nodes)):
            traffic.server_to_peer(i, down)
        contribs, weights, senders, controls = [], [], [], []
        for m in grid.send_and_receive(
            [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]
        ):
            if m.has_error():
                continue
            senders.append(nodes.index(m.metadata.src_node_id))
            traffic.peer_to_server(senders[-1], modules_nbytes(m.content))
            take_counts(counts, senders[-1], m.content, traffic)
            got = get_modules(m.content)
            contribs.append({n: v.to(data.device) for n, v in got["model"].items()})
            controls.append(got.get("control"))
            weights.append(float(m.content["metrics"]["num-examples"]))
        if not contribs:
            raise ModuleMeshError(f"no Flower client returned weights in round {r + 1}")
        if control is not None:
            add_control_deltas(control, controls, weights, sum(data.counts))
        student.aggregate(
            student.stack.logits(data.x_proxy, params=wmod.stack(contribs)), class_counts=counts.table[senders]
        )
        avg = aggregate_modules([{"model": c} for c in contribs], weights, method, fc.trim)["model"]
        student.start_from(server_opt.step(student.stack.member(0), avg) if server_opt.active else avg)
        student.learn(r)
        rec = record(
            r,
            student.accuracy(),
            [],
            traffic,
            [],
            t0,
            engine="flower",
            teacher_proxy_accuracy=student.teacher_accuracy(),
        )
        _emit(sink, on_round, rec)
    return {"student": student.weights()}


def distill_rounds(grid: Grid, exp, data, nodes: list[int], sink: list, on_round: OnRound) -> wmod.ModuleStates:
    fc = exp.federation
    if fc.distill.feddf:
        return feddf_rounds(grid, exp, data, nodes, sink, on_round)
    student = Student(fc, data, exp.seed)
    counts = CountsTable(len(nodes), data.num_classes, data.device)
    proxy = tensor_record(data.x_proxy)  # tensor_record copies to the CPU
    soft_blob: Optional[bytes] = None
    for r in range(fc.rounds):
        t0 = time.perf_counter()
        traffic = Traffic(len(nodes))
        content = RecordDict({"config": ConfigRecord({"server-round": r + 1})})
        if r == 0:  # joining clients download the public proxy images
            content["proxy"] = proxy
        if soft_blob is not None:
            content["soft"] = blob_record(soft_blob)
        down = sum(int(rec.count_bytes()) for rec in content.array_records.values())
        for i in range(len(nodes)):
            traffic.server_to_peer(i, down)
        trained = list(
            grid.send_and_receive([Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes])
        )
        ok = [m.metadata.src_node_id for m in trained if not m.has_error()]
        q = RecordDict({"config": ConfigRecord({"server-round": r + 1})})
        replies = [
            m
            for m in grid.send_and_receive([Message(q, dst_node_id=n, message_type=MessageType.QUERY) for n in ok])
            if not m.has_error()
        ]
        if not replies:
            raise ModuleMeshError(f"no Flower client answered the logits query in round {r + 1}")
        blobs, senders = [], []
        for m in replies:
            blobs.append(record_blob(m.content["logits"]))
            senders.append(nodes.index(m.metadata.src_node_id))
            traffic.peer_to_server(senders[-1], len(blobs[-1]))
            take_counts(counts, senders[-1], m.content, traffic)
        got = torch.stack([compress.decode(b).float() for b in blobs]).to(data.device)
        student.aggregate(got, class_counts=counts.table[senders])
        student.learn(r)
        soft_blob = compress.encode(student.soft, fc.codec)
        _emit(
            sink,
            on_round,
            record(
                r,
                student.accuracy(),
                [],
                traffic,
                [],
                t0,
                engine="flower",
                teacher_proxy_accuracy=student.teacher_accuracy(),
            ),
        )
    return {"student": student.weights()}
