"""Flower entry points: the simulation used by ``modulemesh federate --engine flower``, and the
``server_app`` / ``client_app`` objects ``flwr run`` starts on a SuperLink (``write_flower_app``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ...errors import ConfigError, ModuleMeshError
from .. import weights as wmod
from .client import make_client_app
from .records import provide_data
from .server import server_main


def exp_from_run_config(run_config) -> dict:
    """Deployment: the run config names a federate YAML (``config``) and ``;``-separated overrides."""
    from ...config import load_config, to_dict
    from ..config import FederateExperiment

    path = run_config.get("config") or None
    overrides = [s for s in str(run_config.get("overrides", "")).split(";") if s.strip()]
    return to_dict(load_config(FederateExperiment, path, overrides))


def make_server_app(
    exp_dict: Optional[dict] = None, sink: Optional[list] = None, on_round=None, final: Optional[dict] = None
) -> ServerApp:
    """A ServerApp running ``server.server_main``; the final modules go into ``final`` (if given).

    Deployed (no ``exp_dict``), it reads the run config and writes the results (and, in modules
    mode, the mesh) into the run config's ``out`` directory.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        ed = exp_dict or exp_from_run_config(context.run_config)
        hist = sink if sink is not None else []
        modules = server_main(grid, ed, hist, on_round)
        if final is not None:
            final.update(modules)
        out = context.run_config.get("out") if exp_dict is None else None
        if out:
            from ..run import write_results
            from .records import experiment, run_data

            write_results(Path(str(out)), experiment(ed), hist, data=run_data(ed), modules=modules, engine="flower")

    return app


def check_config(fc) -> None:
    if fc.mode not in ("fedavg", "modules", "distill"):
        raise ConfigError(f"mode {fc.mode!r} has no Flower version; use --engine sim for the local/central baselines")
    if fc.failure_rate > 0 or fc.poisoned > 0 or fc.aggregator == "fisher":
        raise ConfigError(
            "peer failure, poisoned peers and Fisher averaging are simulated by --engine sim only; "
            "set failure_rate=0, poisoned=0 and aggregator mean/median/trimmed_mean for --engine flower"
        )
    if (fc.mode in ("fedavg", "modules") or fc.distill.feddf) and fc.codec != "fp32":
        raise ConfigError(
            "the Flower engine sends weights as fp32 Flower Arrays; use codec fp32 (codecs apply to distill logits)"
        )


def run_flower_simulation(
    exp, data=None, progress: bool = True, num_cpus: int = 1
) -> tuple[list[dict], wmod.ModuleStates]:
    """Run the experiment in Flower's simulation engine (Ray, loopback only).

    Returns the per-round records and the final modules (``model``, the mesh's ``m<j>``, or ``student``).
    """
    from flwr.simulation import run_simulation

    from ...config import to_dict

    exp_dict = to_dict(exp)
    check_config(exp.federation)
    if data is not None:
        provide_data(exp_dict, data)
    sink: list[dict] = []
    final: dict = {}

    def show(rec):
        if progress:
            print(
                f"[flower] round {rec['round']}/{exp.federation.rounds} acc {rec['accuracy']:.4f} "
                f"bytes {rec['bytes_cumulative']}",
                flush=True,
            )

    os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="modulemesh-flwr-"))
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": num_cpus,
            "num_gpus": 0,
            "include_dashboard": False,
            "_node_ip_address": "127.0.0.1",
            "log_to_driver": False,
        },
    }
    run_simulation(
        make_server_app(exp_dict, sink, show, final),
        make_client_app(exp_dict),
        exp.federation.clients,
        backend_config=backend,
    )
    if len(sink) < exp.federation.rounds:
        raise ModuleMeshError(
            f"the Flower simulation stopped after {len(sink)} of {exp.federation.rounds} rounds; see the log above"
        )
    return sink, final


# ``flwr run`` entry points (pyproject of a Flower app: serverapp = "modulemesh.federated.flower.app:server_app")
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
serverapp = "modulemesh.federated.flower.app:server_app"
clientapp = "modulemesh.federated.flower.app:client_app"

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
    esc = lambda v: str(v).replace("\\", "/").replace('"', "'")  # noqa: E731
    (d / "pyproject.toml").write_text(_APP_TOML.format(config=esc(config), overrides=esc(overrides), out=esc(out)))
    (d / "app.py").write_text('"""Entry points live in modulemesh.federated.flower.app (installed on every node)."""\n')
    return d


if __name__ == "__main__":  # python -m modulemesh.federated.flower.app DIR --config X [--set k=v ...] [--out D]
    import argparse

    ap = argparse.ArgumentParser(description="write a Flower app directory for flwr run")
    ap.add_argument("directory")
    ap.add_argument("--config", required=True, help="federate YAML, readable at the same path on every node")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="", help="results directory on the SuperLink machine")
    a = ap.parse_args()
    print(
        write_flower_app(
            a.directory, os.path.abspath(a.config), ";".join(a.overrides), a.out and os.path.abspath(a.out)
        )
    )
