"""What the hivemind engine can run, and its network settings (loopback only)."""

from __future__ import annotations

import importlib.util

from ...errors import ConfigError

MODES = ("fedavg", "modules")
BYTES_PER_VALUE = {"fp32": 4, "fp16": 2}
DHT_KWARGS = dict(
    host_maddrs=["/ip4/127.0.0.1/tcp/0"],
    use_relay=False,
    use_auto_relay=False,
    nat_port_map=False,
    auto_nat=False,
    use_ipfs=False,
)


def check_config(fc) -> None:
    """Refuse what an all-reduce of weighted means cannot do, before any process starts."""
    require_extra()
    if fc.mode not in MODES:
        why = (
            "distill needs a party that trains the student on the aggregated soft labels, a server role"
            if fc.mode == "distill"
            else "the local/central baselines exchange no modules"
        )
        raise ConfigError(
            f"engine 'hivemind' runs modes {' and '.join(MODES)}, not {fc.mode!r} ({why}); use --engine sim or flower"
        )
    if fc.failure_rate > 0 or fc.poisoned > 0 or fc.aggregator != "mean":
        raise ConfigError(
            "hivemind's all-reduce computes weighted means of live peers: set aggregator=mean, failure_rate=0 "
            "and poisoned=0, or use --engine sim for failures, poisoning and robust/Fisher aggregation"
        )
    if fc.codec not in BYTES_PER_VALUE:
        raise ConfigError(
            f"engine 'hivemind' sends weights as fp32 or fp16, not {fc.codec!r}; use --codec fp32 or fp16"
        )
    if fc.mode == "modules" and fc.modules.send_threshold > 0:
        raise ConfigError(
            "engine 'hivemind' averages every hosted module each round; set federation.modules.send_threshold=0"
        )
    mc = fc.modules
    # Through the DHT every host of a module finds every other, so a module is averaged over all its
    # hosts: topology 'full'. A ring gives the same groups when each module has at most two hosts,
    # which module_assignment places on neighbouring peers; other graphs would be silently ignored.
    ring_alike = mc.topology == "ring" and mc.modules_per_peer <= 2 and (mc.num_modules or fc.clients) == fc.clients
    if fc.mode == "modules" and mc.topology != "full" and not ring_alike:
        raise ConfigError(
            f"engine 'hivemind' averages each module over all the peers that host it (topology 'full'); "
            f"topology {mc.topology!r} with {mc.modules_per_peer} modules per peer would differ: "
            "set federation.modules.topology=full, or use --engine sim for other topologies"
        )


DEFAULT_TIMEOUTS = {
    "matchmaking": 1.0,
    "step": 120.0,
    "discovery": 60.0,
    "announce_ttl": 600.0,
    "round": 3600.0,
    "startup": 120.0,
}


def require_extra() -> None:
    """The p2p extra (hivemind, psutil) is installed, or one clear line."""
    if importlib.util.find_spec("psutil") is None or importlib.util.find_spec("hivemind") is None:
        raise ConfigError("engine 'hivemind' needs the p2p extra: pip install 'modulemesh[p2p]'; or use --engine sim")
