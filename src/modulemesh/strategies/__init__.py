"""Continual-learning strategies, each a small set of hooks on the shared training loop."""

from __future__ import annotations

from ..errors import ConfigError
from .base import Strategy
from .der import DER, DERPP
from .er import ER
from .ewc import EWC
from .finetune import Finetune
from .icarl import ICaRL
from .joint import Joint
from .lwf import LwF
from .modulemesh import ModuleMeshStrategy
from .reference import NearestClassMean, RouterOnly
from .si import SI

STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s
    for s in (Finetune, Joint, ModuleMeshStrategy, EWC, SI, LwF, ICaRL, ER, DER, DERPP, RouterOnly, NearestClassMean)
}


def build_strategy(cfg, scenario) -> Strategy:
    name = cfg.strategy.name
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name](cfg, scenario, cfg.strategy.model_extra)  # extra keys = the strategy's own Params


__all__ = [
    "Strategy",
    "STRATEGIES",
    "build_strategy",
    "Finetune",
    "Joint",
    "ModuleMeshStrategy",
    "EWC",
    "SI",
    "LwF",
    "ICaRL",
    "ER",
    "DER",
    "DERPP",
    "RouterOnly",
    "NearestClassMean",
]
