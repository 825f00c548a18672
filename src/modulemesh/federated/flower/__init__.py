"""Flower engine (optional extra ``modulemesh[flower]``): a thin Message-API shell over the pure code.

The maths lives in ``aggregate`` / ``logit_distill`` / ``compress`` / ``sim``; this package only
moves tensors between a ``ServerApp`` and ``ClientApp`` instances, as the one module encoding
(``weights``): one ``ArrayRecord`` per module, named by the module.

* ``fedavg`` and ``modules``: the server sends the current modules, clients train and return the
  ones they hold, the server averages each module over the clients that sent it
  (``aggregate.aggregate_modules``). In ``modules`` mode client k hosts ``modules_per_peer`` of the
  mesh experts (``mesh_modules.hosting_plan``) and trains their entropy-routed mesh.
* ``distill``: round 1's ``train`` message ships the public proxy images; per round a ``train``
  message (carrying last round's global soft labels, encoded with the run's codec) makes each
  client train locally, then a ``query`` message returns the client's proxy-set logits
  (codec-encoded bytes in a uint8 ``Array``); the server aggregates them and trains the student.

Clients find their data through ``context.node_config["partition-id"]`` (set by the simulation
engine, or by ``flower-supernode --node-config "partition-id=0 num-partitions=2"`` in a
deployment); every node rebuilds the same seeded split from the run's config.

Entry points (``app``): ``run_flower_simulation(exp, data)`` (Flower's simulation engine, used by
``modulemesh federate --engine flower``) and the module-level ``server_app`` / ``client_app`` for
``flwr run`` on a real SuperLink; they read ``run_config`` keys ``config`` (path of a federate
YAML), ``overrides`` (``;``-separated ``key=value``) and ``out`` (results directory).
Peer failure and poisoning are simulated by the ``sim`` engine only.
"""

import os

# Flower must never phone home or reinstall packages from inside a run.
for _k, _v in (
    ("FLWR_TELEMETRY_ENABLED", "0"),
    ("FLWR_DISABLE_UPDATE_CHECK", "1"),
    ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
    ("RAY_DEDUP_LOGS", "0"),
    ("RAY_USAGE_STATS_ENABLED", "0"),
    # Ray then resolves "this node" to 127.0.0.1: simulation traffic stays on loopback
    ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"),
):
    os.environ.setdefault(_k, _v)

from .app import client_app, run_flower_simulation, server_app, write_flower_app  # noqa: E402

__all__ = ["run_flower_simulation", "write_flower_app", "server_app", "client_app"]
