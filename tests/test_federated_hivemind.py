"""hivemind engine: 2 peer processes, 2 rounds of ``modules`` on digits, over 127.0.0.1 only.

CI installs the p2p extra: without it importing ``federated.hivemind`` raises, so the test fails
instead of skipping. hivemind itself is imported only by the peers (it changes torch's global
tensor-sharing strategy, which this test process should not inherit).
The CLI runs in a child process whose environment carries a unique tag that every process of the
run inherits (peers, their DHT and averager processes, p2pd). While it runs, the test records the
addresses of their sockets; afterwards it looks for any tagged process that survived.
"""

import json
import os
import subprocess
import sys
import time
import uuid

import psutil
import pytest
import torch

from modulemesh.checkpoint import load_module
from modulemesh.errors import ConfigError
from modulemesh.federated.aggregate import aggregate_modules
from modulemesh.federated.config import FederationConfig
from modulemesh.federated.hivemind import check_config
from modulemesh.federated.weights import unflatten
from modulemesh.mesh import EntropyRouter, ModuleMesh

TAG = "MODULEMESH_TEST_RUN"


def _tagged(tag: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(TAG) == tag:
                found.append(p)
        except psutil.Error:
            pass
    return found


def _socket_ips(procs: list[psutil.Process]) -> set[str]:
    ips = set()
    for p in procs:
        try:
            for c in p.net_connections(kind="inet"):
                ips.add(c.laddr.ip)
                if c.raddr:
                    ips.add(c.raddr.ip)
        except psutil.Error:
            pass
    return ips


def test_hivemind_two_peers_average_shared_modules_on_loopback(tmp_path):
    out, tag = tmp_path / "out", uuid.uuid4().hex
    env = dict(os.environ, OMP_NUM_THREADS="1", **{TAG: tag})
    cmd = [
        sys.executable,
        "-m",
        "modulemesh.cli",
        "federate",
        "--engine",
        "hivemind",
        "--mode",
        "modules",
        "--dataset",
        "digits",
        "--clients",
        "2",
        "--rounds",
        "2",
        "--alpha",
        "1.0",
        "--seed",
        "0",
        "--out",
        str(out),
        "--quiet",
        "--set",
        "federation.distill.proxy_size=200",
        "--set",
        "federation.min_client_size=5",
        "--set",
        "federation.local_epochs=2",
        "--set",
        "federation.lr=0.2",
        "--set",
        "federation.modules.expert.hidden=[16]",
    ]
    ips: set[str] = set()
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            ips |= _socket_ips(_tagged(tag))
            time.sleep(1.0)
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        time.sleep(0.5)
        survivors = [(p.pid, p.name()) for p in _tagged(tag)]
    finally:
        for p in _tagged(tag):  # never leave a process behind, even when an assertion below fails
            p.kill()
    text = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 0, text[-3000:]
    assert survivors == [], f"processes of the run still alive: {survivors}"
    assert ips == {"127.0.0.1"}, f"sockets outside loopback (or none seen): {ips}"

    res = json.loads((out / "results.json").read_text())
    assert res["complete"]
    hist = res["history"]
    assert [h["round"] for h in hist] == [1, 2] and all(h["engine"] == "hivemind" for h in hist)
    for f in ("rounds.csv", "config.yaml", "accuracy_vs_rounds.png", "accuracy_vs_bytes.png", "client_accuracy.png"):
        assert (out / f).stat().st_size > 0
    assert len((out / "rounds.csv").read_text().splitlines()) == 3
    assert hist[-1]["accuracy"] > 0.5 and len(hist[-1]["client_accuracy"]) == 2

    # both peers host modules m0 and m1: after the all-reduce their copies are equal, and equal to the
    # example-weighted per-module FedAvg of the weights each peer had just trained
    state, _ = load_module(out / "state")
    counts = hist[-1]["peer_examples"]
    avg = [unflatten(state, f"peer{p}/") for p in (0, 1)]
    trained = [unflatten(state, f"trained/peer{p}/") for p in (0, 1)]
    fedavg = aggregate_modules(trained, counts)
    for m in ("m0", "m1"):
        names = list(avg[0][m])
        assert names
        assert any(not torch.equal(trained[0][m][n], trained[1][m][n]) for n in names)  # they did differ
        for n in names:
            torch.testing.assert_close(avg[0][m][n], avg[1][m][n], rtol=0, atol=1e-6)
            torch.testing.assert_close(avg[0][m][n], fedavg[m][n], rtol=0, atol=1e-5)
    # hivemind has no byte counters: the figures are a model of its all-reduce, labelled as such
    assert all(h["bytes_basis"] == "modelled" for h in hist) and res["summary"]["bytes_basis"] == "modelled"
    for h in hist:
        assert h["bytes_sent"] == sum(h["peer_bytes_sent"]) and min(h["peer_bytes_sent"]) > 0
    # the run's mesh: both experts, routed by the library's EntropyRouter, scoring what the run reported
    mesh = ModuleMesh.load(out / "mesh")
    assert mesh.pool.names == ["m0", "m1"] and isinstance(mesh.router, EntropyRouter)
    assert res["summary"]["mesh_accuracy"] == pytest.approx(hist[-1]["mesh_accuracy"], abs=1e-6)
    assert res["summary"]["mesh_accuracy"] > 0.6


def test_hivemind_refuses_what_allreduce_cannot_do():
    with pytest.raises(ConfigError, match="fedavg and modules"):
        check_config(FederationConfig(mode="distill", engine="hivemind"))
    with pytest.raises(ConfigError, match="failure_rate=0"):
        check_config(FederationConfig(mode="fedavg", engine="hivemind", failure_rate=0.2))
    with pytest.raises(ConfigError, match="fp32 or fp16"):
        check_config(FederationConfig(mode="modules", engine="hivemind", codec="int8"))
    check_config(FederationConfig(mode="modules", engine="hivemind", codec="fp16"))
    with pytest.raises(ConfigError, match="topology=full"):  # a star would silently become a full graph
        check_config(FederationConfig(mode="modules", engine="hivemind", modules={"topology": "star"}))
    check_config(
        FederationConfig(mode="modules", engine="hivemind", modules={"topology": "full", "modules_per_peer": 3})
    )
