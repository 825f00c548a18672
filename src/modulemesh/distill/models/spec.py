"""Specs of token networks: plain dicts (YAML configs, module manifests), parsed, checked and resolved."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from ...errors import ConfigError

MODEL_TYPES = ("vit", "moe_vit")
_COMMON = {"type", "dim", "depth", "heads", "mlp_ratio", "patch"}
_MOE = {"experts", "k", "moe_every", "expert_ratio"}
_KEYS = {"vit": _COMMON, "moe_vit": _COMMON | _MOE}
_INT_KEYS = {"dim", "depth", "heads", "patch", "experts", "k", "moe_every"}
_FLOAT_KEYS = {"mlp_ratio", "expert_ratio"}


# ----------------------------------------------------------------------------- specs


def parse_spec(text: str | Mapping[str, Any]) -> dict[str, Any]:
    """``"vit:dim=64,depth=4"``, a YAML mapping ``"{type: vit, dim: 64}"`` or a dict -> checked spec dict."""
    import yaml

    if isinstance(text, Mapping):
        raw: dict[str, Any] = dict(text)
    else:
        s = str(text).strip()
        if s.startswith("{"):
            try:
                raw = yaml.safe_load(s)
            except yaml.YAMLError as e:
                raise ConfigError(f"model spec {s!r} is not a valid YAML mapping ({str(e).splitlines()[0]})") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"model spec {s!r} must be a mapping like {{type: vit, dim: 64}}")
        else:
            kind, _, rest = s.partition(":")
            raw = {"type": kind.strip()}
            for item in filter(None, (p.strip() for p in rest.split(","))):
                key, eq, value = item.partition("=")
                if not eq or not key.strip():
                    raise ConfigError(
                        f"model spec {s!r}: expected key=value after the type, e.g. vit:dim=64,depth=4; got {item!r}"
                    )
                try:
                    raw[key.strip()] = yaml.safe_load(value)
                except yaml.YAMLError:
                    raw[key.strip()] = value
    return check_spec(raw)


def looks_like_spec(text: str) -> bool:
    """True when ``text`` names a model spec (``vit``, ``moe_vit:...``, ``{type: ...}``) rather than a path."""
    s = str(text).strip()
    return s.startswith("{") or s.split(":", 1)[0].strip() in MODEL_TYPES


def check_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    kind = spec.get("type")
    if kind not in _KEYS:
        raise ConfigError(
            f"unknown model type {kind!r}; choose one of {', '.join(MODEL_TYPES)} (e.g. vit:dim=64,depth=4)"
        )
    unknown = sorted(set(spec) - _KEYS[kind])
    if unknown:
        raise ConfigError(
            f"model spec for {kind!r} has unknown key(s) {', '.join(unknown)}; valid keys: "
            f"{', '.join(sorted(_KEYS[kind]))}"
        )
    out: dict[str, Any] = {"type": kind, "dim": 64, "depth": 4, "heads": 4, "mlp_ratio": 2.0, "patch": None}
    if kind == "moe_vit":
        out.update(experts=4, k=2, moe_every=1, expert_ratio=None)
    out.update(spec)
    for key in _INT_KEYS & set(out):
        v = out[key]
        if v is None and key == "patch":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"model spec {kind}: {key} must be a positive integer, got {v!r}")
    for key in _FLOAT_KEYS & set(out):
        v = out[key]
        if v is None and key == "expert_ratio":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ConfigError(f"model spec {kind}: {key} must be a positive number, got {v!r}")
        out[key] = float(v)
    if out["dim"] % out["heads"]:
        raise ConfigError(f"model spec {kind}: dim {out['dim']} is not divisible by heads {out['heads']}")
    if kind == "moe_vit" and out["k"] > out["experts"]:
        raise ConfigError(f"model spec moe_vit: k={out['k']} is larger than experts={out['experts']}")
    return out


def auto_patch(input_shape: Sequence[int]) -> int:
    """About a 4x4 grid of patches: 7 for 28x28, 8 for 32x32, 2 for 8x8."""
    return max(1, math.ceil(min(input_shape[-2:]) / 4))


def resolve_spec(spec: Mapping[str, Any], input_shape: Sequence[int]) -> dict[str, Any]:
    """Fill ``patch`` (auto) for ``input_shape``; image inputs (C, H, W) are required."""
    spec = check_spec(spec)
    if len(input_shape) != 3:
        raise ConfigError(
            f"{spec['type']} needs image inputs (channels, height, width); the data has samples of "
            f"shape {tuple(input_shape)}"
        )
    if spec["patch"] is None:
        spec["patch"] = auto_patch(input_shape)
    return spec


def token_grid(spec: Mapping[str, Any], input_shape: Sequence[int]) -> tuple[int, int]:
    p = spec["patch"] or auto_patch(input_shape)
    return math.ceil(input_shape[-2] / p), math.ceil(input_shape[-1] / p)
