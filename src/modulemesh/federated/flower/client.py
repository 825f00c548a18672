"""The Flower ClientApp: each node trains with the sim engine's public one-client runners."""

from __future__ import annotations

import json
from typing import Any, Optional

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .. import compress
from ..sim.data import local_steps
from .records import (
    blob_record,
    experiment,
    get_modules,
    put_modules,
    record_blob,
    record_tensor,
    run_data,
    tensor_record,
)

_RUNNERS: dict[tuple, Any] = {}  # per-process cache of this node's runner (its weights live in context.state)


def one_client_runner(exp_dict: dict, pid: int):
    """Client ``pid``'s runner over its own examples (a one-client federation)."""
    key = (json.dumps(exp_dict, sort_keys=True), pid)
    if key not in _RUNNERS:
        from ..mesh_modules import hosting_plan
        from ..sim import DistillRunner, FedAvgRunner, ModulesRunner

        exp = experiment(exp_dict)
        full = exp.federation
        fc = full.model_copy(update={"clients": 1, "failure_rate": 0.0, "poisoned": 0})
        view = run_data(exp_dict).client_view(pid)
        seed = exp.seed + 1000 * pid  # each client its own minibatch stream
        if fc.mode == "modules":
            runner = ModulesRunner(fc, view, seed, hosted=[hosting_plan(full)[pid]], init_seed=exp.seed)
        else:
            runner = {"fedavg": FedAvgRunner, "distill": DistillRunner}[fc.mode](fc, view, seed)
        _RUNNERS.clear()
        _RUNNERS[key] = runner
    return _RUNNERS[key]


def _restore(context: Context, runner) -> None:
    if "model" in context.state:
        runner.stack.set_member(0, dict(context.state["model"].to_torch_state_dict()))


def attach_counts(reply: RecordDict, context: Context, runner, fc) -> None:
    """``class_weights="counts"``: the node's per-class training counts ride along with its first upload only."""
    if fc.distill.class_weights == "none" or "counts-sent" in context.state:
        return
    reply["class-counts"] = tensor_record(runner.client_class_counts(0).to(torch.int32))
    context.state["counts-sent"] = ConfigRecord({"sent": True})


def train_weights(msg: Message, context: Context, runner, fc, r: int, reply: RecordDict) -> float:
    """FedAvg / FedDF on one node: start from the received model, train, reply with the weights. With SCAFFOLD the
    node's c_i lives in its Flower context between rounds, and its change goes back beside the weights."""
    got = get_modules(msg.content)
    runner.stack.set_member(0, got["model"])
    ctl = runner.controls
    if ctl is not None:  # c_i from this node's context (zero in its first round), not from a cached runner
        saved = context.state["scaffold-ci"].to_torch_state_dict() if "scaffold-ci" in context.state else None
        ctl.ci = {n: (saved[n].unsqueeze(0).clone() if saved else torch.zeros_like(v)) for n, v in ctl.ci.items()}
    corr = ctl.correction(got["control"]) if ctl is not None else None
    loss = runner.train_clients(runner.stack, r, correction=corr)
    out = {"model": runner.stack.member(0)}
    if ctl is not None:
        steps = local_steps(runner.counts, fc.local_epochs, fc.batch_size)
        start = {n: v.to(runner.device) for n, v in got["model"].items()}
        deltas = ctl.client_deltas(got["control"], start, runner.stack.params, steps, runner.client_lr(r))
        for n in ctl.ci:
            ctl.ci[n] += deltas[n]
        context.state["scaffold-ci"] = ArrayRecord(torch_state_dict={n: v[0].clone() for n, v in ctl.ci.items()})
        out["control"] = {n: v[0] for n, v in deltas.items()}
    put_modules(reply, out)
    return loss


def client_train(msg: Message, context: Context, exp_dict: dict) -> Message:
    fc = experiment(exp_dict).federation
    pid = int(context.node_config["partition-id"])
    runner = one_client_runner(exp_dict, pid)
    r = int(msg.content["config"]["server-round"]) - 1
    n = len(runner.data.parts[0])
    reply = RecordDict()
    if fc.mode == "distill" and fc.distill.feddf:  # FedDF: weights in, weights out, as in FedAvg
        loss = train_weights(msg, context, runner, fc, r, reply)
        attach_counts(reply, context, runner, fc)
    elif fc.mode == "distill":
        _restore(context, runner)
        if "proxy" in msg.content.array_records:  # round 1: the public proxy set arrives
            context.state["proxy"] = msg.content["proxy"]
        kd = None
        if "soft" in msg.content.array_records and (fc.distill.client_weight > 0 or fc.distill.digest_epochs > 0):
            soft = compress.decode(record_blob(msg.content["soft"])).float()
            kd = (record_tensor(context.state["proxy"]), soft, fc.distill.client_weight, fc.distill.temperature)
        loss = runner.train_clients(runner.stack, r, kd)
        context.state["model"] = ArrayRecord(torch_state_dict=runner.stack.member(0))
    elif fc.mode == "fedavg":
        loss = train_weights(msg, context, runner, fc, r, reply)
    else:  # modules: load, train and return only the hosted modules
        runner.set_peer_modules(0, get_modules(msg.content))
        runner.train_local(r)
        loss = float("nan")
        put_modules(reply, runner.peer_modules(0))
    reply["metrics"] = MetricRecord({"num-examples": n, "train-loss": float(loss)})
    return Message(reply, reply_to=msg)


def client_query(msg: Message, context: Context, exp_dict: dict) -> Message:
    exp = experiment(exp_dict)
    runner = one_client_runner(exp_dict, int(context.node_config["partition-id"]))
    _restore(context, runner)
    logits = runner.stack.logits(record_tensor(context.state["proxy"]))[0]
    content = RecordDict(
        {
            "logits": blob_record(compress.encode(logits, exp.federation.codec)),
            "metrics": MetricRecord({"num-examples": len(runner.data.parts[0])}),
        }
    )
    attach_counts(content, context, runner, exp.federation)
    return Message(content, reply_to=msg)


def make_client_app(exp_dict: Optional[dict] = None) -> ClientApp:
    from .app import exp_from_run_config

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return client_train(msg, context, exp_dict or exp_from_run_config(context.run_config))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return client_query(msg, context, exp_dict or exp_from_run_config(context.run_config))

    return app
