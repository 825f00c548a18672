"""Hivemind engine (optional extra ``modulemesh[p2p]``): decentralized peers, no server.

Every peer is its own process (``multiprocessing`` spawn) holding only its own examples. It runs
a ``hivemind.DHT`` bound to 127.0.0.1 (NAT port mapping, AutoNAT and relays off); the first
peer's address bootstraps the others. Each round a peer

1. announces the modules it hosts in the DHT: key ``<run>.hosts.<module>``, subkey = its peer
   ID, value = ``[round, examples]``, expiring after a few minutes;
2. trains them on its own data with the sim engine's code (``ModulesRunner.local_train`` for
   ``modules``, ``_ClientTraining._ce_train`` for ``fedavg``, where the whole model is the one
   module ``model``);
3. reads the announcements back and waits until the hosts the shared config implies have
   announced (or the discovery timeout passes, so a vanished peer shrinks the group instead of
   stalling it);
4. averages every module with its co-hosts through a ``hivemind.averaging.DecentralizedAverager``
   (one per module and group size, prefix ``<run>_<module>_<n>``, ``target_group_size =
   min_group_size =`` the hosts found, weight = the peer's example count), i.e. exactly the
   per-module FedAvg of ``aggregate.aggregate_modules``. All of a peer's modules are averaged
   concurrently, so peers sharing several modules cannot wait on each other in different orders.

Peers report per round (over a queue, tensors as ``compress.encode_state`` bytes) their
accuracy, bytes and modules to the parent process, which only records: it builds the same
per-round records as the sim / Flower engines and evaluates the assembled model (each module
FedAvg'd over its hosts with ``aggregate``). It sends the peers nothing but peer 0's address at
the start and the signal to stop at the end.

Bytes: hivemind's butterfly all-reduce with equal bandwidths splits a module's vector into n
parts for a group of n peers; a peer sends the (n-1)/n it does not reduce and then its reduced
part to the n-1 others, and receives as much, so it sends and receives ``2 (n-1)/n`` of the
module's tensor bytes (4 per value for fp32, 2 for fp16). Protobuf/libp2p framing and the DHT
announcements (a few hundred bytes per round) are not counted, as the codecs do not count
transport framing either.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import queue
import secrets
import signal
import sys
import time
import traceback
from dataclasses import replace
from typing import Any, Callable, Optional

import torch

from ..errors import ConfigError, ModuleMeshError

# Only the peers import hivemind: importing it switches torch to the file_system sharing strategy,
# which starts torch_shm_manager, a process that outlives the run by seconds. Tensors here are
# shared only with forked children, which file descriptors handle.
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
try:
    import psutil
except ImportError:  # pragma: no cover - exercised only without the extra
    psutil = None
if psutil is None or importlib.util.find_spec("hivemind") is None:  # pragma: no cover
    raise ConfigError("engine 'hivemind' needs the p2p extra: pip install 'modulemesh[p2p]'; or use --engine sim")

from .aggregate import aggregate, aggregate_modules
from .compress import decode_state, encode_state

MODES = ("fedavg", "modules")
BYTES_PER_VALUE = {"fp32": 4, "fp16": 2}
DHT_KWARGS = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], use_relay=False, use_auto_relay=False, nat_port_map=False,
                  auto_nat=False, use_ipfs=False)


def check_config(fc) -> None:
    """Refuse what an all-reduce of weighted means cannot do, before any process starts."""
    if fc.mode not in MODES:
        why = ("distill needs a party that trains the student on the aggregated soft labels, a server role"
               if fc.mode == "distill" else "the local/central baselines exchange no modules")
        raise ConfigError(f"engine 'hivemind' runs modes {' and '.join(MODES)}, not {fc.mode!r} ({why}); use --engine sim or flower")
    if fc.failure_rate > 0 or fc.poisoned > 0 or fc.aggregator != "mean":
        raise ConfigError("hivemind's all-reduce computes weighted means of live peers: set aggregator=mean, failure_rate=0 "
                          "and poisoned=0, or use --engine sim for failures, poisoning and robust/Fisher aggregation")
    if fc.codec not in BYTES_PER_VALUE:
        raise ConfigError(f"engine 'hivemind' sends weights as fp32 or fp16, not {fc.codec!r}; use --codec fp32 or fp16")
    if fc.mode == "modules" and fc.modules.send_threshold > 0:
        raise ConfigError("engine 'hivemind' averages every hosted module each round; set federation.modules.send_threshold=0")
    mc = fc.modules
    # Through the DHT every host of a module finds every other, so a module is averaged over all its
    # hosts: topology 'full'. A ring gives the same groups when each module has at most two hosts,
    # which module_assignment places on neighbouring peers; other graphs would be silently ignored.
    ring_alike = mc.topology == "ring" and mc.modules_per_peer <= 2 and (mc.num_modules or fc.clients) == fc.clients
    if fc.mode == "modules" and mc.topology != "full" and not ring_alike:
        raise ConfigError(f"engine 'hivemind' averages each module over all the peers that host it (topology 'full'); "
                          f"topology {mc.topology!r} with {mc.modules_per_peer} modules per peer would differ: "
                          "set federation.modules.topology=full, or use --engine sim for other topologies")


def hosting_plan(fc) -> list[list[str]]:
    """Module names each peer hosts: ``m<j>`` per ``simulate.module_assignment``, or the whole ``model``."""
    from .simulate import module_assignment

    if fc.mode == "fedavg":
        return [["model"] for _ in range(fc.clients)]
    m = fc.modules.num_modules or fc.clients
    return [[f"m{j}" for j in mods] for mods in module_assignment(fc.clients, m, fc.modules.modules_per_peer)]


def _one_peer_config(fc):
    mods = fc.modules.model_copy(update={"num_modules": fc.modules.num_modules or fc.clients})
    return fc.model_copy(update={"clients": 1, "modules": mods})


def _private_view(data, pid: int):
    """Peer ``pid``'s own training examples plus the (public) test set, on CPU for the trip to its process."""
    idx = data.parts[pid]
    cpu = lambda t: t.detach().to("cpu")
    return replace(data, x=cpu(data.x[idx]), y=cpu(data.y[idx]), parts=[torch.arange(len(idx))],
                   x_proxy=cpu(data.x_proxy[:0]), y_proxy=cpu(data.y_proxy[:0]), x_test=cpu(data.x_test), y_test=cpu(data.y_test))


def _module_init(fc, data, seed: int, j: int) -> dict[str, torch.Tensor]:
    """Module j's seeded initial weights, the same ones the sim and Flower engines start from."""
    from .simulate import _build

    e = _build(fc.modules.expert, data.input_shape, data.num_classes, seed * 7919 + j)
    return {n: p.detach().clone() for n, p in e.named_parameters()}


# ---------------------------------------------------------------- one peer (its own process)


class _Local:
    """A peer's modules and training, delegated to a one-client runner of the sim engine."""

    def __init__(self, exp, data, pid: int, hosted: list[str]):
        from .simulate import FedAvgRunner, ModulesRunner

        fc = _one_peer_config(exp.federation)
        self.mode, self.hosted = fc.mode, hosted
        if fc.mode == "fedavg":
            self.runner = FedAvgRunner(fc, data, exp.seed)  # same seeded init on every peer
        else:
            self.runner = ModulesRunner(fc, data, exp.seed)  # same client eval subset as the sim engine
            ids = [int(name[1:]) for name in hosted]
            inits = [_module_init(fc, data, exp.seed, j) for j in ids]
            self.runner.hosted = [ids]
            self.runner.params = {n: torch.stack([i[n] for i in inits])[None].to(data.x.device) for n in inits[0]}
            self.runner.h = len(ids)
        self.runner.seed = exp.seed + 1000 * pid  # own minibatch stream, as the Flower engine's clients
        self.examples = len(data.parts[0])

    def modules(self) -> dict[str, dict[str, torch.Tensor]]:
        if self.mode == "fedavg":
            return {"model": self.runner.stack.member(0)}
        return {name: {n: v[0, i] for n, v in self.runner.params.items()} for i, name in enumerate(self.hosted)}

    def set_module(self, name: str, state: dict[str, torch.Tensor]) -> None:
        if self.mode == "fedavg":
            self.runner.stack.set_member(0, state)
        else:
            i = self.hosted.index(name)
            for n, v in self.runner.params.items():
                v[0, i] = state[n].to(v.device)

    def train(self, r: int) -> None:
        if self.mode == "fedavg":
            self.runner._ce_train(self.runner.stack, r)
        else:
            self.runner.local_train(r)

    def accuracy(self) -> float:
        from .simulate import accuracy_of

        if self.mode == "fedavg":
            return float(self.runner._client_acc(self.runner.stack)[0])
        idx, d = self.runner.client_eval_idx, self.runner.data
        return float(accuracy_of(self.runner.peer_logp(d.x_test[idx]), d.y_test[idx])[0])


def _discover(dht, key: str, r: int, expected: int, deadline: float) -> int:
    """Number of peers that announced hosting ``key`` for round ``r`` or later (waits for ``expected``)."""
    while True:
        found = dht.get(key, latest=True)
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        n = sum(1 for v in entries.values() if v.value[0] >= r)
        if n >= expected or time.monotonic() > deadline:
            return n
        time.sleep(0.1)


def _peer_main(pid: int, exp_dict: dict, data, plan: list[list[str]], boot, run_id: str, reports, stop,
               timeouts: dict) -> None:
    """One peer: DHT, averagers, local training; reports each round on ``reports`` until ``stop`` is set."""
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
    # SIGTERM from the parent becomes SystemExit, so the finally block still shuts DHT and averagers down;
    # the DHT / averager processes hivemind forks get the default action back. Ctrl-C reaches the
    # whole process group: only the parent acts on it (and stops the peers).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    parent = os.getppid()
    # hivemind forks its DHT and averager processes (an averager cannot be pickled for spawn); a
    # spawned child inherits the parent's start method, so set fork here, in the peer only.
    mp.set_start_method("fork", force=True)
    torch.set_num_threads(1)
    dht, averagers, code = None, {}, 0
    try:
        from hivemind import DHT
        from hivemind.averaging import DecentralizedAverager
        from hivemind.compression import Float16Compression, NoCompression
        from hivemind.utils import get_dht_time

        from ..utils import resolve_device
        from .config import FederateExperiment

        exp = FederateExperiment.model_validate(exp_dict)
        fc = exp.federation
        device = resolve_device(exp.device)
        data = replace(data, **{f: getattr(data, f).to(device) for f in ("x", "y", "x_proxy", "y_proxy", "x_test", "y_test")})
        hosted = plan[pid]
        local = _Local(exp, data, pid, hosted)
        # peer 0 bootstraps the swarm; the others join through its address (all start at once)
        initial_peers = boot.get(timeout=timeouts["startup"]) if pid else None
        dht = DHT(start=True, initial_peers=initial_peers, **DHT_KWARGS)
        me = dht.peer_id.to_base58()
        if pid == 0:
            reports.put(("ready", pid, [str(a) for a in dht.get_visible_maddrs()]))
        compression = NoCompression() if fc.codec == "fp32" else Float16Compression()
        bpv = BYTES_PER_VALUE[fc.codec]
        expected = {name: sum(name in p for p in plan) for name in hosted}

        def averager(name: str, n: int):
            # group size is fixed per averager: one per (module, hosts found); the prefix keeps groups apart
            if (name, n) not in averagers:
                tensors = [v.detach().to("cpu", torch.float32).clone() for v in local.modules()[name].values()]
                averagers[(name, n)] = DecentralizedAverager(
                    tensors, dht, start=True, prefix=f"{run_id}_{name}_{n}", target_group_size=n, min_group_size=n,
                    min_matchmaking_time=timeouts["matchmaking"], request_timeout=timeouts["matchmaking"] / 2,
                    allreduce_timeout=timeouts["step"], next_chunk_timeout=timeouts["step"], compression=compression,
                    allow_state_sharing=False)
            return averagers[(name, n)]

        for r in range(fc.rounds):
            for name in hosted:
                dht.store(f"{run_id}.hosts.{name}", [r, local.examples], get_dht_time() + timeouts["announce_ttl"], subkey=me)
            local.train(r)
            trained = {k: {n: v.detach().cpu().clone() for n, v in s.items()} for k, s in local.modules().items()}
            # as in the sim engine: fedavg clients are scored on their own model, module peers on the merged one
            acc = local.accuracy() if fc.mode == "fedavg" else None
            deadline = time.monotonic() + timeouts["discovery"]
            hosts = {name: _discover(dht, f"{run_id}.hosts.{name}", r, expected[name], deadline) for name in hosted}
            steps, sent = {}, 0
            for name in hosted:
                n = hosts[name]
                if n < 2:  # nobody else hosts it (this round): keep the local module
                    continue
                avg = averager(name, n)
                with avg.get_tensors() as ts:
                    for t, v in zip(ts, trained[name].values()):
                        t.copy_(v)
                steps[name] = avg.step(weight=float(local.examples), timeout=timeouts["step"], wait=False)
                sent += round(2 * (n - 1) / n * sum(v.numel() for v in trained[name].values()) * bpv)
            for name, control in steps.items():
                if control.result() is None:
                    raise ModuleMeshError(f"peer {pid}: averaging module {name!r} with {hosts[name]} hosts failed in round {r + 1}")
                avg = averager(name, hosts[name])
                with avg.get_tensors() as ts:
                    local.set_module(name, dict(zip(trained[name], (t.clone() for t in ts))))
            acc = local.accuracy() if acc is None else acc
            enc = lambda mods: {k: encode_state(s, "fp32") for k, s in mods.items()}
            reports.put(("round", pid, r, {"accuracy": acc, "sent": sent, "received": sent, "examples": local.examples,
                                           "trained": enc(trained), "modules": enc(local.modules())}))
        while not stop.wait(1.0) and os.getppid() == parent:  # a vanished parent must not leave peers behind
            pass
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # the parent raises it; no second printout here
        reports.put(("error", pid, str(e) if isinstance(e, ModuleMeshError) else traceback.format_exc(limit=8).rstrip()))
        code = 1
    finally:
        for a in averagers.values():
            a.shutdown()
        if dht is not None:
            dht.shutdown()
    # Everything this peer started is shut down and its reports are flushed; skip the interpreter
    # teardown of torch/hivemind, which takes seconds and has nothing left to clean up.
    reports.close()
    reports.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---------------------------------------------------------------- the parent (records only)


class _Peers:
    """The peer processes and every process below them, stopped on exit even after an error."""

    def __init__(self, ctx):
        self.ctx, self.procs, self.seen = ctx, [], {}
        self.stop = ctx.Event()

    def start(self, *args) -> None:
        p = self.ctx.Process(target=_peer_main, args=args, name=f"modulemesh-peer-{args[0]}", daemon=False)
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


def _next(reports, peers: _Peers, timeout: float):
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


def _evaluator(exp, data):
    """Test accuracy of the assembled model: ``{module: {param: tensor}}`` -> float."""
    from .simulate import ModulesRunner, Stack, accuracy_of, as_float

    fc = exp.federation
    if fc.mode == "fedavg":
        stack = Stack(fc.backbone, data.input_shape, data.num_classes, 1, exp.seed)
        return lambda mods: float(accuracy_of(stack.logits(data.x_test, {n: v[None].to(data.x.device) for n, v in mods["model"].items()})[0],
                                              data.y_test))
    view = replace(data, parts=[data.parts[0]])
    mr = ModulesRunner(_one_peer_config(fc), view, exp.seed)

    def mesh(mods):
        names = sorted(mods, key=lambda k: int(k[1:]))
        stacked = {n: torch.stack([mods[k][n] for k in names]).to(data.x.device) for n in mr.params}
        logp = torch.cat([mr._peer_logp(stacked, as_float(data.x_test[i:i + 2048]))[0] for i in range(0, len(data.x_test), 2048)])
        return float(accuracy_of(logp, data.y_test))

    return mesh


DEFAULT_TIMEOUTS = {"matchmaking": 1.0, "step": 120.0, "discovery": 60.0, "announce_ttl": 600.0, "round": 3600.0, "startup": 120.0}


def run_hivemind(exp, data, on_round: Optional[Callable[[dict], None]] = None, timeouts: Optional[dict] = None
                 ) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Run ``exp`` with one process per peer on loopback; returns (per-round records, final tensors).

    The tensors are ``peer<p>.<module>.<param>`` (after the last averaging) and
    ``peer<p>.trained.<module>.<param>`` (the peer's own weights just before it).
    """
    from ..config import to_dict

    fc = exp.federation
    check_config(fc)
    t = {**DEFAULT_TIMEOUTS, **(timeouts or {})}
    plan = hosting_plan(fc)
    exp_dict = to_dict(exp)
    run_id = f"mm{secrets.token_hex(4)}"  # DHT keys and averager prefixes of this run only
    evaluate = _evaluator(exp, data)
    ctx = mp.get_context("spawn")  # a fresh interpreter per peer: no forked torch/thread state
    reports, boot = ctx.Queue(), ctx.Queue()
    peers = _Peers(ctx)
    history: list[dict[str, Any]] = []
    state: dict[str, torch.Tensor] = {}
    ok = False
    try:
        for pid in range(fc.clients):
            peers.start(pid, exp_dict, _private_view(data, pid), plan, boot, run_id, reports, peers.stop, t)
        msg = _next(reports, peers, t["startup"])
        for _ in range(1, fc.clients):
            boot.put(msg[2])
        cum, pending = 0, {}
        t0 = time.perf_counter()
        for r in range(fc.rounds):
            while len(pending.get(r, {})) < fc.clients:
                msg = _next(reports, peers, t["round"])
                if msg[0] == "round":
                    pending.setdefault(msg[2], {})[msg[1]] = msg[3]
            by_peer = pending.pop(r)
            got = [by_peer[p] for p in range(fc.clients)]
            counts = [g["examples"] for g in got]
            mods = [{k: decode_state(b) for k, b in g["modules"].items()} for g in got]
            sent = [g["sent"] for g in got]
            received = [g["received"] for g in got]
            cum += sum(sent) + sum(received)
            client_acc = [g["accuracy"] for g in got]
            extra = {}
            if fc.mode == "fedavg":  # all peers hold the average now; score it, as the sim engine scores its global model
                acc = evaluate({"model": aggregate([m["model"] for m in mods], counts)})
            else:  # as ModulesRunner: mean over peers' own mixtures, plus the mesh of all modules
                acc = sum(client_acc) / len(client_acc)
                extra["mesh_accuracy"] = evaluate(aggregate_modules(mods, counts))
            rec = {"round": r + 1, "accuracy": acc, "client_accuracy": client_acc, "bytes_up": sum(sent),
                   "bytes_down": sum(received), "peer_bytes_sent": sent, "peer_bytes_received": received, "failed": [],
                   "seconds": round(time.perf_counter() - t0, 4), "bytes_cumulative": cum, "engine": "hivemind",
                   "peer_examples": counts, **extra}
            history.append(rec)
            if on_round:
                on_round(rec)
            t0 = time.perf_counter()
        for p, (g, m) in enumerate(zip(got, mods)):  # the last round's tensors
            for k, s in m.items():
                state.update({f"peer{p}.{k}.{n}": v for n, v in s.items()})
            for k, b in g["trained"].items():
                state.update({f"peer{p}.trained.{k}.{n}": v for n, v in decode_state(b).items()})
        ok = True
    finally:
        peers.close(grace=30 if ok else 5)
        for q in (reports, boot):
            q.close()
            q.join_thread()
    return history, state
