"""Flower engine (optional extra ``modulemesh[flower]``): a thin Message-API shell over the pure code.

The maths lives in ``aggregate`` / ``distill`` / ``compress`` / ``simulate``; this module only moves
tensors between a ``ServerApp`` and ``ClientApp`` instances.

* ``fedavg`` and ``modules``: the server runs ``ModuleFedAvg``, a Flower ``Strategy`` whose
  ``aggregate_train`` averages every tensor over only the clients that sent it
  (``aggregate.aggregate``; stock FedAvg rejects replies with differing keys). In ``modules`` mode
  client k hosts ``modules_per_peer`` of the expert modules (``simulate.module_assignment``) and
  trains their entropy-routed mixture; its reply carries only those modules (``m<id>.<param>``).
* ``distill``: per round a ``train`` message (carrying last round's global soft labels, encoded
  with the run's codec) makes each client train locally, then a ``query`` message returns the
  client's proxy-set logits (codec-encoded bytes in a uint8 ``Array``); the server aggregates them
  with ``distill.aggregate_logits`` and trains the student.

Clients find their data through ``context.node_config["partition-id"]`` (set by the simulation
engine, or by ``flower-supernode --node-config "partition-id=0 num-partitions=2"`` in a
deployment); every node rebuilds the same seeded split from the run's config.

Two entry points: ``run_flower_simulation(exp, data)`` (Flower's simulation engine, used by
``modulemesh federate --engine flower``) and the module-level ``server_app`` / ``client_app``
for ``flwr run`` on a real SuperLink; they read ``run_config`` keys ``config`` (path of a
federate YAML), ``overrides`` (``;``-separated ``key=value``) and ``out`` (results directory).
Peer failure and poisoning are simulated by the ``sim`` engine only.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

# Flower must never phone home or reinstall packages from inside a run.
for _k, _v in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
               ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"), ("RAY_DEDUP_LOGS", "0"),
               ("RAY_USAGE_STATS_ENABLED", "0"),
               # Ray then resolves "this node" to 127.0.0.1: simulation traffic stays on loopback
               ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")):
    os.environ.setdefault(_k, _v)

import numpy as np
import torch

from ..errors import ConfigError, ModuleMeshError

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import Strategy
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ModuleMeshError(
        f"the Flower engine needs the optional extra: pip install 'modulemesh[flower]' ({e}); or use --engine sim"
    ) from None

from .aggregate import aggregate
from .compress import decode, encode
from .distill import aggregate_logits

_DATA_CACHE: dict[str, Any] = {}


# ---------------------------------------------------------------- shared helpers


def _experiment(exp_dict: dict):
    from .config import FederateExperiment

    return FederateExperiment.model_validate(exp_dict)


def _data(exp_dict: dict):
    """The run's seeded split, built once per process (each Flower worker rebuilds the same one)."""
    key = json.dumps(exp_dict, sort_keys=True)
    if key not in _DATA_CACHE:
        from .simulate import fed_data_from_experiment

        _DATA_CACHE.clear()
        _DATA_CACHE[key] = fed_data_from_experiment(_experiment(exp_dict), "cpu")
    return _DATA_CACHE[key]


def _blob_array(blob: bytes) -> Array:
    return Array(np.frombuffer(blob, dtype=np.uint8).copy())


def _array_blob(a: Array) -> bytes:
    return a.numpy().tobytes()


def _one_client_view(data, pid: int):
    from dataclasses import replace

    return replace(data, parts=[data.parts[pid]])


class _ClientState:
    """Per-process cache of a client's runner (the model itself lives in ``context.state``)."""

    runners: dict[tuple, Any] = {}

    @classmethod
    def get(cls, exp_dict: dict, pid: int):
        key = (json.dumps(exp_dict, sort_keys=True), pid)
        if key not in cls.runners:
            from .simulate import DistillRunner, FedAvgRunner, ModulesRunner, module_assignment

            exp = _experiment(exp_dict)
            full = exp.federation
            mods = full.modules.model_copy(update={"num_modules": full.modules.num_modules or full.clients})
            fc = full.model_copy(update={"clients": 1, "failure_rate": 0.0, "poisoned": 0, "modules": mods})
            view = _one_client_view(_data(exp_dict), pid)
            runner_cls = {"fedavg": FedAvgRunner, "distill": DistillRunner, "modules": ModulesRunner}[fc.mode]
            runner = runner_cls(fc, view, exp.seed + 1000 * pid)
            if fc.mode == "modules":
                m = fc.modules.num_modules or exp.federation.clients
                runner.hosted = [module_assignment(exp.federation.clients, m, fc.modules.modules_per_peer)[pid]]
            cls.runners.clear()
            cls.runners[key] = runner
        return cls.runners[key]


def _params_from_state(context: Context, key: str, params: dict[str, torch.Tensor]) -> None:
    if key in context.state:
        saved = context.state[key].to_torch_state_dict()
        for n in params:
            params[n] = saved[n].clone()


# ---------------------------------------------------------------- strategy


class ModuleFedAvg(Strategy):
    """Per-tensor FedAvg over the clients that sent each tensor, weighted by ``num-examples``.

    ``method`` may also be ``median`` or ``trimmed_mean`` (``aggregate.aggregate``). Sends the whole
    current global record to every node; each client returns the subset it holds.
    """

    def __init__(self, method: str = "mean", trim: float = 0.1):
        self.method, self.trim = method, trim
        self.last_bytes_up: list[int] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        config["server-round"] = server_round
        content = RecordDict({"arrays": arrays, "config": config})
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n) for n in sorted(grid.get_node_ids())]

    def aggregate_train(self, server_round: int, replies):
        contribs, weights, self.last_bytes_up = [], [], []
        losses = []
        for msg in replies:
            if msg.has_error():
                continue
            rec = msg.content["arrays"]
            self.last_bytes_up.append(int(rec.count_bytes()))
            contribs.append(dict(rec.to_torch_state_dict()))
            metrics = msg.content["metrics"]
            weights.append(float(metrics["num-examples"]))
            losses.append(float(metrics.get("train-loss", float("nan"))))
        if not contribs:
            return None, None
        merged = aggregate(contribs, weights, self.method, self.trim)
        return ArrayRecord(torch_state_dict=merged), MetricRecord({"train-loss": float(np.nanmean(losses)), "clients": len(contribs)})

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None

    def summary(self) -> None:
        pass


# ---------------------------------------------------------------- client side


def _client_train(msg: Message, context: Context, exp_dict: dict) -> Message:
    exp = _experiment(exp_dict)
    fc = exp.federation
    pid = int(context.node_config["partition-id"])
    runner = _ClientState.get(exp_dict, pid)
    r = int(msg.content["config"]["server-round"]) - 1
    n = len(runner.data.parts[0])
    if fc.mode == "distill":
        _params_from_state(context, "model", runner.stack.params)
        kd = None
        if "soft" in msg.content.array_records and fc.distill.client_weight > 0:
            soft = decode(_array_blob(msg.content["soft"]["blob"])).float()
            kd = (runner.data.x_proxy, soft, fc.distill.client_weight, fc.distill.temperature)
        loss = runner._ce_train(runner.stack, r, kd)
        context.state["model"] = ArrayRecord(torch_state_dict={k: v.clone() for k, v in runner.stack.params.items()})
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": n, "train-loss": float(loss)})}), reply_to=msg)
    glob = msg.content["arrays"].to_torch_state_dict()
    if fc.mode == "fedavg":
        runner.stack.set_member(0, {k: glob[k] for k in runner.stack.params})
        loss = runner._ce_train(runner.stack, r)
        out = runner.stack.member(0)
    else:  # modules: load, train and return only the hosted modules
        hosted = runner.hosted[0]
        for n_ in runner.params:
            runner.params[n_] = torch.stack([glob[f"m{m}.{n_}"] for m in hosted])[None].clone()
        runner.local_train(r)
        loss = float("nan")
        out = {f"m{m}.{n_}": runner.params[n_][0, j] for j, m in enumerate(hosted) for n_ in runner.params}
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict={k: v.detach().clone() for k, v in out.items()}),
                          "metrics": MetricRecord({"num-examples": n, "train-loss": float(loss)})})
    return Message(content, reply_to=msg)


def _client_query(msg: Message, context: Context, exp_dict: dict) -> Message:
    exp = _experiment(exp_dict)
    pid = int(context.node_config["partition-id"])
    runner = _ClientState.get(exp_dict, pid)
    _params_from_state(context, "model", runner.stack.params)
    logits = runner.stack.logits(runner.data.x_proxy)[0]
    blob = encode(logits, exp.federation.codec)
    content = RecordDict({"logits": ArrayRecord({"blob": _blob_array(blob)}),
                          "metrics": MetricRecord({"num-examples": len(runner.data.parts[0])})})
    return Message(content, reply_to=msg)


def make_client_app(exp_dict: Optional[dict] = None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _client_train(msg, context, exp_dict or _exp_from_run_config(context.run_config))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return _client_query(msg, context, exp_dict or _exp_from_run_config(context.run_config))

    return app


# ---------------------------------------------------------------- server side


def _wait_for_nodes(grid: Grid, n: int, timeout: float = 120.0) -> list[int]:
    t0 = time.time()
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) >= n:
            return ids[:n]
        if time.time() - t0 > timeout:
            raise ConfigError(f"only {len(ids)} of {n} Flower nodes connected within {timeout:.0f} s; start more supernodes")
        time.sleep(0.5)


def _server_main(grid: Grid, exp_dict: dict, sink: list, on_round=None) -> None:
    from .simulate import DistillRunner, ModulesRunner, Stack, accuracy_of, as_float

    exp = _experiment(exp_dict)
    fc = exp.federation
    data = _data(exp_dict)
    nodes = _wait_for_nodes(grid, fc.clients)
    cum = 0
    if fc.mode == "distill":
        server = DistillRunner(fc, data, exp.seed)  # only its student and soft labels are used
        soft_blob: Optional[bytes] = None
        for r in range(fc.rounds):
            t0 = time.perf_counter()
            content = RecordDict({"config": ConfigRecord({"server-round": r + 1})})
            if soft_blob is not None:
                content["soft"] = ArrayRecord({"blob": _blob_array(soft_blob)})
            down = (len(soft_blob) * len(nodes)) if soft_blob is not None else 0
            trained = list(grid.send_and_receive([Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]))
            ok = [m.metadata.src_node_id for m in trained if not m.has_error()]
            q = RecordDict({"config": ConfigRecord({"server-round": r + 1})})
            replies = [m for m in grid.send_and_receive([Message(q, dst_node_id=n, message_type=MessageType.QUERY) for n in ok]) if not m.has_error()]
            if not replies:
                raise ModuleMeshError(f"no Flower client answered the logits query in round {r + 1}")
            blobs = [_array_blob(m.content["logits"]["blob"]) for m in replies]
            logits = torch.stack([decode(b).float() for b in blobs])
            server.soft = aggregate_logits(logits, fc.distill.score, fc.distill.tau, None, fc.distill.space, fc.distill.robust, fc.trim)
            server._train_student(r)
            soft_blob = encode(server.soft, fc.codec)
            acc = float(accuracy_of(server.student.logits(data.x_test)[0], data.y_test))
            up = sum(len(b) for b in blobs)
            cum += up + down
            rec = {"round": r + 1, "accuracy": acc, "client_accuracy": [], "bytes_up": up, "bytes_down": down,
                   "peer_bytes_sent": [len(b) for b in blobs], "peer_bytes_received": [], "failed": [],
                   "seconds": round(time.perf_counter() - t0, 4), "bytes_cumulative": cum, "engine": "flower"}
            sink.append(rec)
            if on_round:
                on_round(rec)
        return
    strategy = ModuleFedAvg(fc.aggregator if fc.aggregator != "fisher" else "mean", fc.trim)
    if fc.mode == "fedavg":
        model = Stack(fc.backbone, data.input_shape, data.num_classes, 1, exp.seed)
        glob = model.member(0)
        evaluate = lambda g: float(accuracy_of(model.logits(data.x_test, {k: v[None] for k, v in g.items()})[0], data.y_test))
    elif fc.mode == "modules":
        m = fc.modules.num_modules or fc.clients
        mods_cfg = fc.modules.model_copy(update={"num_modules": m})
        mr = ModulesRunner(fc.model_copy(update={"clients": 1, "modules": mods_cfg}), _one_client_view(data, 0), exp.seed)
        glob = {}
        for j in range(m):
            from .simulate import _build

            e = _build(fc.modules.expert, data.input_shape, data.num_classes, exp.seed * 7919 + j)
            glob.update({f"m{j}.{n}": p.detach().clone() for n, p in e.named_parameters()})
        names = list(mr.params)

        def evaluate(g):
            mods = {n: torch.stack([g[f"m{j}.{n}"] for j in range(m)]) for n in names}
            logp = mr._peer_logp(mods, as_float(data.x_test))[0]
            return float(accuracy_of(logp, data.y_test))
    else:
        raise ConfigError(f"mode {fc.mode!r} has no Flower version; use --engine sim for the local/central baselines")
    arrays = ArrayRecord(torch_state_dict=glob)
    for r in range(fc.rounds):
        t0 = time.perf_counter()
        msgs = list(strategy.configure_train(r + 1, arrays, ConfigRecord(), grid))
        down = int(arrays.count_bytes()) * len(msgs)
        replies = grid.send_and_receive(msgs)
        new, _ = strategy.aggregate_train(r + 1, replies)
        if new is None:
            raise ModuleMeshError(f"no Flower client returned weights in round {r + 1}")
        merged = dict(arrays.to_torch_state_dict())
        merged.update(new.to_torch_state_dict())  # modules nobody trained keep their value
        arrays = ArrayRecord(torch_state_dict=merged)
        acc = evaluate(merged)
        up = sum(strategy.last_bytes_up)
        cum += up + down
        rec = {"round": r + 1, "accuracy": acc, "client_accuracy": [], "bytes_up": up, "bytes_down": down,
               "peer_bytes_sent": list(strategy.last_bytes_up), "peer_bytes_received": [], "failed": [],
               "seconds": round(time.perf_counter() - t0, 4), "bytes_cumulative": cum, "engine": "flower"}
        sink.append(rec)
        if on_round:
            on_round(rec)


def make_server_app(exp_dict: Optional[dict] = None, sink: Optional[list] = None, on_round=None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        ed = exp_dict or _exp_from_run_config(context.run_config)
        hist = sink if sink is not None else []
        _server_main(grid, ed, hist, on_round)
        out = context.run_config.get("out") if exp_dict is None else None
        if out:
            from .results import write_outputs

            write_outputs(Path(str(out)), ed, hist, final=True)

    return app


def _exp_from_run_config(run_config) -> dict:
    """Deployment: the run config names a federate YAML (``config``) and ``;``-separated overrides."""
    from ..config import load_config, to_dict
    from .config import FederateExperiment

    path = run_config.get("config") or None
    overrides = [s for s in str(run_config.get("overrides", "")).split(";") if s.strip()]
    return to_dict(load_config(FederateExperiment, path, overrides))


def run_flower_simulation(exp, data=None, progress: bool = True, num_cpus: int = 1) -> list[dict]:
    """Run the experiment in Flower's simulation engine (Ray, loopback only); returns per-round records."""
    from ..config import to_dict
    from flwr.simulation import run_simulation

    exp_dict = to_dict(exp)
    fc = exp.federation
    if fc.failure_rate > 0 or fc.poisoned > 0 or fc.aggregator == "fisher":
        raise ConfigError("peer failure, poisoned peers and Fisher averaging are simulated by --engine sim only; "
                          "set failure_rate=0, poisoned=0 and aggregator mean/median/trimmed_mean for --engine flower")
    if exp.federation.mode in ("fedavg", "modules") and exp.federation.codec != "fp32":
        raise ConfigError("the Flower engine sends weights as fp32 Flower Arrays; use codec fp32 (codecs apply to distill logits)")
    if data is not None:
        _DATA_CACHE.clear()
        _DATA_CACHE[json.dumps(exp_dict, sort_keys=True)] = data
    sink: list[dict] = []

    def show(rec):
        if progress:
            print(f"[flower] round {rec['round']}/{exp.federation.rounds} acc {rec['accuracy']:.4f} bytes {rec['bytes_cumulative']}", flush=True)

    os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="modulemesh-flwr-"))
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": num_cpus, "num_gpus": 0, "include_dashboard": False,
                             "_node_ip_address": "127.0.0.1", "log_to_driver": False}}
    run_simulation(make_server_app(exp_dict, sink, show), make_client_app(exp_dict), exp.federation.clients,
                   backend_config=backend)
    if len(sink) < exp.federation.rounds:
        raise ModuleMeshError(f"the Flower simulation stopped after {len(sink)} of {exp.federation.rounds} rounds; see the log above")
    return sink


# ``flwr run`` entry points (pyproject of a Flower app: serverapp = "modulemesh.federated.flower_app:server_app")
server_app = make_server_app()
client_app = make_client_app()

_APP_TOML = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "modulemesh-federate"
version = "1.0.0"
description = "ModuleMesh federated training as a Flower app"
license = "Apache-2.0"
dependencies = ["modulemesh[flower]"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "modulemesh"

[tool.flwr.app.components]
serverapp = "modulemesh.federated.flower_app:server_app"
clientapp = "modulemesh.federated.flower_app:client_app"

[tool.flwr.app.config]
config = "{config}"
overrides = "{overrides}"
out = "{out}"
"""


def write_flower_app(directory, config: str, overrides: str = "", out: str = "") -> Path:
    """Write a minimal Flower app directory (``pyproject.toml``) for ``flwr run DIR <superlink>``.

    ``config`` is the federate YAML each node reads (same path on every machine), ``overrides``
    ``;``-separated ``key=value`` pairs, ``out`` where the ServerApp writes results.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    esc = lambda v: str(v).replace("\\", "/").replace('"', "'")
    (d / "pyproject.toml").write_text(_APP_TOML.format(config=esc(config), overrides=esc(overrides), out=esc(out)))
    (d / "app.py").write_text('"""Entry points live in modulemesh.federated.flower_app (installed on every node)."""\n')
    return d


if __name__ == "__main__":  # python -m modulemesh.federated.flower_app DIR --config X [--set k=v ...] [--out D]
    import argparse

    ap = argparse.ArgumentParser(description="write a Flower app directory for flwr run")
    ap.add_argument("directory")
    ap.add_argument("--config", required=True, help="federate YAML, readable at the same path on every node")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="", help="results directory on the SuperLink machine")
    a = ap.parse_args()
    print(write_flower_app(a.directory, os.path.abspath(a.config), ";".join(a.overrides), a.out and os.path.abspath(a.out)))
