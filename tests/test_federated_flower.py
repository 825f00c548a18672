"""Flower engine: a simulation smoke test (3 clients, 2 rounds) and a loopback deployment
(superlink + 2 supernodes). Needs the flower extra, which the README's test command installs.

The run happens in a child process with a temporary FLWR_HOME; afterwards every process it left
behind (Ray's GCS, raylet, workers) is found through /proc by parent PID and stopped by PID.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modulemesh.mesh import EntropyRouter, ModuleMesh

# 2 rounds on digits with 3 clients: chance is 0.1; the sim engine reaches about 0.8-0.9 here
ACCURACY_FLOOR = {"distill": 0.6, "modules": 0.6}


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _stop(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


DIGITS_SETS = [
    "federation.distill.proxy_size=200",
    "federation.min_client_size=5",
    "federation.local_epochs=5",
    "federation.lr=0.2",
    "federation.backbone.hidden=[32]",
    "federation.distill.student_epochs=10",
    "federation.distill.student_lr=0.2",
]


def _federate(tmp_path, out: Path, engine: str, mode: str, rounds: int, extra=()) -> dict:
    """``modulemesh federate`` on digits (3 clients) in a child process; returns its results.json."""
    env = dict(
        os.environ,
        FLWR_HOME=str(tmp_path / "flwr"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        OMP_NUM_THREADS="1",
    )
    cmd = [sys.executable, "-m", "modulemesh.cli", "federate", "--engine", engine, "--mode", mode]
    cmd += ["--dataset", "digits", "--clients", "3", "--rounds", str(rounds), "--alpha", "1.0"]
    cmd += ["--out", str(out), "--quiet"]
    for kv in [*DIGITS_SETS, *extra]:
        cmd += ["--set", kv]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=240)
    finally:
        left = _descendants(proc.pid) if proc.poll() is None else []
        if proc.poll() is None:
            left.append(proc.pid)
        _stop(left)
    assert proc.returncode == 0, log[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("mode", ["distill", "modules"])
def test_flower_simulation_smoke(tmp_path, mode):
    out = tmp_path / "out"
    res = _federate(tmp_path, out, "flower", mode, 2)
    hist = res["history"]
    assert [h["round"] for h in hist] == [1, 2]
    assert all(
        h["engine"] == "flower" and h["bytes_sent"] == sum(h["peer_bytes_sent"]) + h["server_bytes_sent"] for h in hist
    )
    assert len(hist[0]["peer_bytes_sent"]) == 3 and min(hist[0]["peer_bytes_sent"]) > 0
    assert hist[-1]["accuracy"] > ACCURACY_FLOOR[mode]
    if mode == "modules":
        # every client sends only its 2 hosted expert modules, never the full set of 3 it receives
        assert len(set(hist[0]["peer_bytes_sent"])) == 1
        assert hist[0]["peer_bytes_sent"][0] * 3 == 2 * hist[0]["peer_bytes_received"][0]
        # the mesh of all 3 experts, as ModuleMesh.load reads it, scores what the run reported
        mesh = ModuleMesh.load(out / "mesh")
        assert mesh.pool.names == ["m0", "m1", "m2"] and isinstance(mesh.router, EntropyRouter)
        assert res["summary"]["mesh_accuracy"] == pytest.approx(hist[-1]["mesh_accuracy"], abs=1e-6)
    else:
        # round 1 ships the public proxy images (200 digits of 8x8 uint8 pixels) to each of the 3 clients
        proxy = 200 * 64
        assert min(hist[0]["peer_bytes_received"]) >= proxy and hist[0]["server_bytes_sent"] >= 3 * proxy
        assert max(hist[1]["peer_bytes_received"]) < proxy  # later rounds carry soft labels only


def test_flower_feddf_matches_sim(tmp_path):
    """FedDF with sharpening and an EMA: Flower's run lands within noise of the sim engine's (only the clients'
    minibatch streams differ), and both move weights, never the proxy images."""
    switches = ["federation.distill.feddf=true", "federation.distill.sharpen=0.1", "federation.distill.ema=0.3"]
    fl = _federate(tmp_path, tmp_path / "flower", "flower", "distill", 3, switches)["history"]
    sm = _federate(tmp_path, tmp_path / "sim", "sim", "distill", 3, switches)["history"]
    assert [h["engine"] for h in fl] == ["flower"] * 3
    assert sm[-1]["accuracy"] > 0.8 and abs(fl[-1]["accuracy"] - sm[-1]["accuracy"]) < 0.05
    # weights both ways every round (an MLP 64-32-10 is 2,410 floats, ~9.6 KB), no 12.8 KB of proxy images
    for h in fl + sm:
        assert all(9_000 < b < 11_000 for b in h["peer_bytes_sent"] + h["peer_bytes_received"])


@pytest.mark.parametrize("mode", ["fedavg", "feddf"])
def test_flower_drift_fixes_match_sim(tmp_path, mode):
    """SCAFFOLD (each node's c_i kept in its Flower context), server momentum and FedProx on the Flower engine land
    within noise of the sim engine's run, and SCAFFOLD's controls double every message both ways."""
    switches = ["federation.scaffold=true", "federation.server_momentum=0.5", "federation.prox_mu=0.01"]
    switches += ["federation.distill.feddf=true"] if mode == "feddf" else []
    run_mode = "distill" if mode == "feddf" else "fedavg"
    fl = _federate(tmp_path, tmp_path / "flower", "flower", run_mode, 3, switches)["history"]
    sm = _federate(tmp_path, tmp_path / "sim", "sim", run_mode, 3, switches)["history"]
    assert [h["engine"] for h in fl] == ["flower"] * 3
    assert sm[-1]["accuracy"] > 0.8 and abs(fl[-1]["accuracy"] - sm[-1]["accuracy"]) < 0.05
    # weights + controls both ways every round: twice the ~9.6 KB of an MLP 64-32-10's weights
    for h in fl + sm:
        assert all(18_000 < b < 22_000 for b in h["peer_bytes_sent"] + h["peer_bytes_received"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listens(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Server:
    """A Flower server process on a free loopback port, its output in its own log file.

    A port found free can be taken by another process before the server binds it: when the
    server exits early saying so, it is restarted on another port (up to ``tries`` times).
    ``start`` returns once the process is alive and accepts connections on its port; on any
    failure the assertion message carries the server's own log.
    """

    BUSY = ("address already in use", "errno 98", "address in use")

    def __init__(self, name: str, argv, env: dict, log_dir: Path):
        self.name, self.argv, self.env, self.log_dir = name, argv, env, log_dir
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log = log_dir / f"{name}.log"

    def start(self, timeout: float = 180.0, tries: int = 5) -> int:
        for attempt in range(tries):
            self.port = _free_port()
            self.log = self.log_dir / f"{self.name}.{attempt}.log"
            with open(self.log, "w") as out:
                self.proc = subprocess.Popen(self.argv(self.port), env=self.env, stdout=out, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if _listens(self.port):
                    return self.port
                time.sleep(0.25)
            else:
                raise AssertionError(
                    f"{self.name} does not listen on 127.0.0.1:{self.port} after {timeout:.0f} s\n" + self.tail()
                )
            if not any(b in self.text().lower() for b in self.BUSY):
                raise AssertionError(f"{self.name} exited with code {self.proc.returncode}\n" + self.tail())
        raise AssertionError(f"{self.name}: {tries} free ports were taken before it could bind one\n" + self.tail())

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, n: int = 3000) -> str:
        return f"--- {self.name} log ({self.log.name}) ---\n{self.text()[-n:]}"

    def pids(self) -> list[int]:
        return (_descendants(self.proc.pid) + [self.proc.pid]) if self.proc is not None else []


def test_flower_loopback_deployment(tmp_path):
    """flower-superlink + 2 flower-supernodes on 127.0.0.1, then ``flwr run`` of the generated app."""
    from modulemesh.federated.flower import write_flower_app

    home = tmp_path / "flwr"
    home.mkdir()
    env = dict(
        os.environ,
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        OMP_NUM_THREADS="1",
    )
    config = Path(__file__).resolve().parents[1] / "configs" / "federate_digits.yaml"
    overrides = "federation.clients=2;federation.rounds=2"
    app = write_flower_app(tmp_path / "app", str(config), overrides, str(tmp_path / "results"))
    bin_dir = Path(sys.executable).parent
    link = Server(
        "superlink",
        lambda port: [
            str(bin_dir / "flower-superlink"),
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database",
            str(tmp_path / "state.db"),
        ],
        env,
        tmp_path,
    )
    servers = [link]
    try:
        port = link.start()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        for i in range(2):
            node = Server(
                f"supernode{i}",
                lambda p, i=i: [
                    str(bin_dir / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(p),
                    "--node-config",
                    f"partition-id={i} num-partitions=2",
                ],
                env,
                tmp_path,
            )
            servers.append(node)
            node.start()
        run = subprocess.run(
            [str(bin_dir / "flwr"), "run", str(app), "test", "--stream"],
            env=env,
            capture_output=True,
            text=True,
            timeout=420,
        )
        logs = "\n".join(s.tail() for s in servers)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + "\n" + logs
        deadline = time.time() + 120
        while not (tmp_path / "results" / "results.json").exists() and time.time() < deadline:
            time.sleep(1)
        assert (tmp_path / "results" / "results.json").exists(), "the ServerApp wrote no results\n" + logs
        res = json.loads((tmp_path / "results" / "results.json").read_text())
        assert [h["round"] for h in res["history"]] == [1, 2]
        assert all(h["engine"] == "flower" and h["bytes_sent"] > 0 for h in res["history"])
        assert res["summary"]["final_accuracy"] > 0.5  # digits, 2 clients, 2 rounds of distillation; chance is 0.1
    finally:
        pids = [pid for s in servers for pid in s.pids()]
        _stop(pids)
        for s in servers:
            if s.proc is not None:
                s.proc.wait(timeout=10)


def test_flower_class_count_weights_match_sim(tmp_path):
    """FD with class-count weights and an Adam student (``class_weights=counts``): each Flower node sends its
    per-class counts once, beside its first logits, and both engines learn (2 rounds of 3 digits clients: their
    minibatch streams differ, so the accuracies differ by a few points)."""
    switches = [
        "federation.distill.class_weights=counts",
        "federation.distill.score=uniform",
        "federation.distill.student_optimizer=adam",
        "federation.distill.student_lr=0.003",
    ]
    fl = _federate(tmp_path, tmp_path / "flower", "flower", "distill", 2, switches)["history"]
    sm = _federate(tmp_path, tmp_path / "sim", "sim", "distill", 2, switches)["history"]
    assert min(sm[-1]["accuracy"], fl[-1]["accuracy"]) > 0.7 and abs(fl[-1]["accuracy"] - sm[-1]["accuracy"]) < 0.1
    # round 2 carries logits only; round 1 also the 10 int32 counts (40 bytes, plus the record's framing)
    for h in (fl, sm):
        extra = [a - b for a, b in zip(h[0]["peer_bytes_sent"], h[1]["peer_bytes_sent"])]
        assert all(40 <= e < 200 for e in extra), extra
