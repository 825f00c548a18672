"""One hivemind peer, in its own process: DHT, one averager per module, local training via the sim engine."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from dataclasses import replace

import torch

from ...errors import ModuleMeshError
from .. import weights as wmod
from .config import BYTES_PER_VALUE, DHT_KWARGS


def private_view(data, pid: int):
    """Peer ``pid``'s own training examples plus the (public) test set, on CPU for the trip to its process."""
    view = data.client_view(pid).to("cpu")
    return replace(view, x_proxy=view.x_proxy[:0], y_proxy=view.y_proxy[:0])


def modelled_allreduce_bytes(state: dict[str, torch.Tensor], n: int, bytes_per_value: int) -> int:
    """Butterfly all-reduce over n equal peers: each sends (and receives) 2 (n-1)/n of the module."""
    return round(2 * (n - 1) / n * sum(v.numel() for v in state.values()) * bytes_per_value)


class LocalPeer:
    """A peer's modules and training: a one-peer runner of the sim engine, through its public methods."""

    def __init__(self, exp, data, pid: int, hosted: list[str]):
        from ..sim import FedAvgRunner, ModulesRunner
        from ..sim.stacked import Stack

        full = exp.federation
        fc = full.model_copy(update={"clients": 1})
        self.mode, self.hosted = fc.mode, hosted
        seed = exp.seed + 1000 * pid  # own minibatch stream, as the Flower engine's clients
        if fc.mode == "fedavg":
            self.runner = FedAvgRunner(fc, data, seed)
            # every peer starts from the same seeded model
            self.runner.stack.set_member(
                0, Stack(fc.backbone, data.input_shape, data.num_classes, 1, exp.seed).member(0)
            )
        else:
            self.runner = ModulesRunner(fc, data, seed, hosted=[hosted], init_seed=exp.seed)
        self.examples = len(data.parts[0])

    def modules(self) -> wmod.ModuleStates:
        if self.mode == "fedavg":
            return {"model": self.runner.stack.member(0)}
        return self.runner.peer_modules(0)

    def set_module(self, name: str, state: dict[str, torch.Tensor]) -> None:
        if self.mode == "fedavg":
            self.runner.stack.set_member(0, state)
        else:
            self.runner.set_peer_modules(0, {name: state})

    def train(self, r: int) -> None:
        if self.mode == "fedavg":
            self.runner.train_clients(self.runner.stack, r)
        else:
            self.runner.train_local(r)

    def accuracy(self) -> float:
        from ..sim.stacked import accuracy_of

        if self.mode == "fedavg":
            return float(self.runner.client_accuracy(self.runner.stack)[0])
        idx, d = self.runner.client_eval_idx, self.runner.data
        return float(accuracy_of(self.runner.peer_log_probs(d.x_test[idx]), d.y_test[idx])[0])


def discover(dht, key: str, r: int, expected: int, deadline: float) -> int:
    """Number of peers that announced hosting ``key`` for round ``r`` or later (waits for ``expected``)."""
    while True:
        found = dht.get(key, latest=True)
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        n = sum(1 for v in entries.values() if v.value[0] >= r)
        if n >= expected or time.monotonic() > deadline:
            return n
        time.sleep(0.1)


def peer_main(
    pid: int, exp_dict: dict, data, plan: list[list[str]], boot, run_id: str, reports, stop, timeouts: dict
) -> None:
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

        from ...utils import resolve_device
        from ..config import FederateExperiment

        exp = FederateExperiment.model_validate(exp_dict)
        fc = exp.federation
        data = data.to(resolve_device(exp.device))
        hosted = plan[pid]
        local = LocalPeer(exp, data, pid, hosted)
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
                    tensors,
                    dht,
                    start=True,
                    prefix=f"{run_id}_{name}_{n}",
                    target_group_size=n,
                    min_group_size=n,
                    min_matchmaking_time=timeouts["matchmaking"],
                    request_timeout=timeouts["matchmaking"] / 2,
                    allreduce_timeout=timeouts["step"],
                    next_chunk_timeout=timeouts["step"],
                    compression=compression,
                    allow_state_sharing=False,
                )
            return averagers[(name, n)]

        for r in range(fc.rounds):
            for name in hosted:
                dht.store(
                    f"{run_id}.hosts.{name}", [r, local.examples], get_dht_time() + timeouts["announce_ttl"], subkey=me
                )
            local.train(r)
            trained = {k: {n: v.detach().cpu().clone() for n, v in s.items()} for k, s in local.modules().items()}
            # as in the sim engine: fedavg clients are scored on their own model, module peers on the merged one
            acc = local.accuracy() if fc.mode == "fedavg" else None
            deadline = time.monotonic() + timeouts["discovery"]
            hosts = {name: discover(dht, f"{run_id}.hosts.{name}", r, expected[name], deadline) for name in hosted}
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
                sent += modelled_allreduce_bytes(trained[name], n, bpv)
            for name, control in steps.items():
                if control.result() is None:
                    raise ModuleMeshError(
                        f"peer {pid}: averaging module {name!r} with {hosts[name]} hosts failed in round {r + 1}"
                    )
                avg = averager(name, hosts[name])
                with avg.get_tensors() as ts:
                    local.set_module(name, dict(zip(trained[name], (t.clone() for t in ts))))
            acc = local.accuracy() if acc is None else acc
            reports.put(
                (
                    "round",
                    pid,
                    r,
                    {
                        "accuracy": acc,
                        "sent": sent,
                        "received": sent,
                        "examples": local.examples,
                        "trained": wmod.encode(trained, "fp32"),
                        "modules": wmod.encode(local.modules(), "fp32"),
                    },
                )
            )
        while not stop.wait(1.0) and os.getppid() == parent:  # a vanished parent must not leave peers behind
            pass
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # the parent raises it; no second printout here
        reports.put(
            ("error", pid, str(e) if isinstance(e, ModuleMeshError) else traceback.format_exc(limit=8).rstrip())
        )
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
