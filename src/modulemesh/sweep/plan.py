"""Planning a sweep: strategies x seeds of one config, with shared and per-strategy overrides, validated
before anything trains; reading back a finished run."""

from __future__ import annotations

SECTIONS = ("name", "seed", "device", "data", "scenario", "expert", "router", "strategy", "train")


def parse_strategies(text: str) -> list[str]:
    from ..errors import ConfigError
    from ..strategies import STRATEGIES

    if text.strip() == "all":
        return list(STRATEGIES)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise ConfigError(
            f"unknown strategy {', '.join(map(repr, unknown)) or '(none given)'} in --strategies; "
            f"choose 'all' or from: {', '.join(STRATEGIES)}"
        )
    return list(dict.fromkeys(names))


def plan_runs(config: str | None, overrides: list[str], strategies: list[str], seeds: int, device: str | None):
    """[(strategy, seed, ExperimentConfig)] for every run, validated before anything trains."""
    from ..commands.common import default_config_path
    from ..config import (
        PER_STRATEGY,
        ExperimentConfig,
        apply_per_strategy,
        deep_merge,
        parse_overrides,
        read_yaml,
        validate,
    )
    from ..errors import ConfigError

    if seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    path = config or default_config_path()
    base = read_yaml(path)
    blocks = base.pop(PER_STRATEGY, None)  # the file's per-strategy settings (config.apply_per_strategy)
    shared, per = [], {s: [] for s in strategies}
    from ..strategies import STRATEGIES

    for pair in overrides:
        head = pair.split("=", 1)[0].split(".", 1)[0].strip()
        if "=" in pair and head in STRATEGIES and head not in SECTIONS:
            key, value = pair.split(".", 1)[1].split("=", 1)
            section = key.split(".", 1)[0]
            if head in per:
                per[head].append(f"{key}={value}" if section in SECTIONS else f"strategy.{key}={value}")
        else:
            shared.append(pair)
    shared_nested = parse_overrides(shared)
    common = deep_merge(base, shared_nested)
    file_strategy = dict(base.get("strategy") or {})
    first_seed = int(common.get("seed", 0) or 0)
    runs = []
    for s in strategies:
        per_nested = parse_overrides(per[s])
        data = deep_merge(common, per_nested)
        if blocks is not None:
            own = apply_per_strategy({**base, PER_STRATEGY: blocks}, s, source=str(path))
            data = deep_merge(deep_merge(own, shared_nested), per_nested)
            file_strategy = dict(own.get("strategy") or {})
        # The file's strategy-specific keys belong to the strategy the file names; buffer_size is shared.
        strategy = {k: v for k, v in file_strategy.items() if k == "buffer_size" or file_strategy.get("name") == s}
        strategy.update(shared_nested.get("strategy", {}))
        strategy.update(per_nested.get("strategy", {}))
        strategy["name"] = s
        data["strategy"] = strategy
        if device:
            data["device"] = device
        for k in range(seeds):
            cfg = validate(ExperimentConfig, {**data, "seed": first_seed + k}, source=f"{path} ({s})")
            STRATEGIES[s](cfg, None, cfg.strategy.model_extra)  # the strategy's own keys, checked before training
            runs.append((s, first_seed + k, cfg))
    return runs


def finished_metrics(out, cfg) -> dict | None:
    """metrics.json of a finished run of exactly this config (any lost plot redrawn), else None."""
    from ..runner import finished_run

    return finished_run(out, cfg)
