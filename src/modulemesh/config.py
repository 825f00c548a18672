"""Typed experiment configs: YAML file + ``--set key=value`` overrides -> validated pydantic model.

Every section forbids unknown keys, so a typo is an error that lists the valid keys instead of a
silently ignored setting. ``load_config`` works for any pydantic model, so each command (run,
compare, upgrade, federate, m2mkd) defines its own config class and shares the loading rules.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence, Type, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    name: str = "mnist"
    root: Optional[str] = None
    options: dict[str, Any] = Field(default_factory=dict)


class ScenarioConfig(Section):
    kind: Literal["class_incremental", "task_incremental", "domain_incremental"] = "class_incremental"
    n_tasks: int = Field(5, ge=1, le=1000)
    class_order: Optional[list[int]] = None
    shuffle_classes: bool = False
    transform: Literal["permutation", "rotation", "groups"] = "permutation"
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_train_per_task: Optional[int] = Field(None, ge=1)
    max_test_per_task: Optional[int] = Field(None, ge=1)
    # domain-IL from groups: these groups' test rows are one test set shared by every task, every
    # other group a training task (CORe50 NI: [3, 7, 10]); None: each group is tested on its own rows.
    test_groups: Optional[list[int]] = None


BACKBONE_OPTIONS = {
    "mlp": {"hidden": "widths", "dropout": "fraction", "skip_head": "flag"},
    "cnn": {"channels": "widths", "hidden": "width", "normalize": "normalization"},
    "resnet18": {"width": "width", "normalize": "normalization"},
}


def check_backbone_spec(spec: Any, where: str = "expert.backbone") -> dict[str, Any]:
    """Refuse a backbone spec that would fail deep inside torch (negative widths, wrong types, unknown options)."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping like {{type: mlp, hidden: [100, 100]}}, got {spec!r}")
    kind = spec.get("type", "mlp")
    if kind not in BACKBONE_OPTIONS:
        return spec  # build_backbone names the known types; a type added there later is not refused here
    options = BACKBONE_OPTIONS[kind]
    for key, value in spec.items():
        rule = options.get(key, "type" if key == "type" else None)
        if rule is None:
            raise ConfigError(
                f"unknown option {where}.{key} for backbone {kind!r}; its options are: {', '.join(options)}"
            )

        def width(v: Any) -> bool:
            return isinstance(v, numbers.Integral) and not isinstance(v, bool) and 1 <= v <= 1_000_000

        def normalization(v: Any) -> bool:  # {mean: [...], std: [...]}, per channel (backbones.py checks counts)
            return (
                isinstance(v, dict)
                and set(v) == {"mean", "std"}
                and all(isinstance(v[k], (list, tuple)) and v[k] for k in ("mean", "std"))
                and all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in [*v["mean"], *v["std"]])
                and min(v["std"]) > 0
            )

        ok = {
            "type": True,
            "width": width(value),
            "normalization": normalization(value),
            "fraction": isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= value < 1,
            "widths": isinstance(value, (list, tuple)) and all(width(v) for v in value),
            "flag": isinstance(value, bool),
        }[rule]
        if not ok:
            need = {
                "width": "a positive integer",
                "fraction": "a number in [0, 1)",
                "widths": "a list of positive integers",
                "flag": "true or false",
                "normalization": "{mean: [one number per channel], std: [one positive number per channel]}",
            }[rule]
            raise ConfigError(f"bad value for {where}.{key}: {value!r}; it must be {need}")
    return spec


class ExpertConfig(Section):
    backbone: dict[str, Any] = Field(default_factory=lambda: {"type": "mlp", "hidden": [100, 100]})
    storage: Literal["fp32", "fp16", "int8", "int4"] = Field(
        "fp32",
        description="modulemesh: precision a finished (frozen) expert is kept in; it is rounded once when its "
        "task ends and computes in fp32 (int8: per output channel; int4: the same, two values a byte, the "
        "output layer in int8)",
    )

    @field_validator("backbone")
    @classmethod
    def _backbone(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            return check_backbone_spec(v)
        except ConfigError as e:
            raise ValueError(str(e)) from None


class RouterConfig(Section):
    type: Literal["entropy", "topk", "density", "random", "oracle"] = "topk"
    k: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = Field(
        1, description="experts per input (top-k, random); auto: the fewest whose weights sum to >= threshold"
    )
    threshold: Optional[float] = Field(
        None, gt=0, le=1, description="adaptive compute (with k: auto): cumulative routing weight p to reach"
    )
    temperature: float = Field(1.0, gt=0)
    hidden: int = Field(128, ge=1)
    renormalize: bool = True
    components: int = Field(10, ge=1, description="principal directions per class for the density router")
    clusters: int = Field(1, ge=1, description="density router: PPCA mixture components per class")
    state_dtype: Literal["float32", "float16", "int8"] = Field(
        "float32", description="density router: stored precision (int8: means and directions, per row)"
    )
    expert_weight: float = Field(
        0.0,
        ge=0,
        description="density router: weight of the experts' own task evidence "
        "(needs strategy.reject_weight > 0); pick on validation",
    )
    probe_weight: float = Field(
        0.0,
        ge=0,
        description="density router: weight of a task probe on every expert's outputs, refit on the replay buffer "
        "at each task's end (needs strategy.buffer_size > 0); pick on validation",
    )
    features: Optional[str] = Field(
        None,
        description="density router: frozen feature extractor (saved mesh dir, "
        "saved expert, .safetensors/.pt weights); densities are fit on its features",
    )
    features_backbone: Optional[dict[str, Any]] = Field(None, description="architecture of a router.features file")
    features_expert: Optional[str] = Field(None, description="which expert of a router.features mesh (default: first)")
    specialization_weight: float = Field(0.0, ge=0)
    load_balance_weight: float = Field(0.0, ge=0)
    sparsity_weight: float = Field(0.0, ge=0)

    @field_validator("k", mode="before")
    @classmethod
    def _k(cls, v: Any) -> Any:
        ok = v == "auto" or (isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1)
        if not ok:
            raise ValueError("router.k must be a positive integer, or auto (with router.threshold)")
        return v

    @model_validator(mode="after")
    def _adaptive(self) -> "RouterConfig":
        if (self.k == "auto") != (self.threshold is not None):
            raise ValueError(
                "adaptive compute needs both router.k: auto and router.threshold: p with 0 < p <= 1 "
                f"(got k={self.k!r}, threshold={self.threshold!r})"
            )
        if self.k == "auto" and self.type not in ("topk", "entropy", "density"):
            raise ValueError(f"router.k: auto needs router.type topk, entropy or density (got {self.type!r})")
        return self


class StrategyConfig(Section):
    # Strategy-specific settings are extra keys, validated by the strategy's own Params model.
    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = "modulemesh"
    # Shared by every replay-based strategy (modulemesh, ER, DER, iCaRL); ignored by the others.
    buffer_size: int = Field(200, ge=0)


class OptimizerSection(Section):
    """Optimizer settings shared by every training section (continual runs, upgrades)."""

    lr: float = Field(0.05, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)


class AugmentConfig(Section):
    """Training-time image augmentation, batched on the device (modulemesh.data.augment); off by default."""

    crop_padding: int = Field(0, ge=0, le=64, description="random crop from a zero-padded copy (4 for CIFAR)")
    flip: bool = Field(False, description="random horizontal flip")


class TrainConfig(OptimizerSection):
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(1024, ge=1)
    count_flops: bool = True
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    # The accelerator fast path (modulemesh.training.fastpath says what each does).
    amp: Literal["off", "bf16", "fp16"] = "off"
    channels_last: bool = False
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    check_finite_every: Optional[int] = Field(None, ge=1, description="default: 1 on CPU, 50 on an accelerator")
    data_placement: Literal["auto", "device", "host"] = "auto"

    @field_validator("amp", "compile", mode="before")
    @classmethod
    def _off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML reads a bare `off` as false


class ExperimentConfig(Section):
    name: str = "default"
    seed: int = 0
    device: str = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    scenario: ScenarioConfig = Field(default_factory=ScenarioConfig)
    expert: ExpertConfig = Field(default_factory=ExpertConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu") and not v.startswith("cuda"):
            raise ValueError("device must be auto, cpu or cuda[:N]")
        return v

    @model_validator(mode="after")
    def _router_k_fits_the_mesh(self) -> "ExperimentConfig":
        # The modulemesh strategy adds at most one expert per task, so k above the task count cannot be meant: a
        # top-k router would silently route to all experts (k >= experts turns the mask off), others ignore k.
        n = self.scenario.n_tasks
        if self.strategy.name == "modulemesh" and isinstance(self.router.k, int) and self.router.k > n:
            raise ValueError(
                f"rule router.k <= number of experts: router.k={self.router.k} but this run has at most "
                f"{n} experts (one per task, scenario.n_tasks={n}); set router.k between 1 and {n}"
            )
        return self


# ---------------------------------------------------------------- loading


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["train.epochs=3", "router.type=entropy"]`` -> nested dict; values parsed as YAML."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value (e.g. train.epochs=3), got {pair!r}")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set has an empty key in {pair!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
        node[parts[-1]] = value
    return nested


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if (
            k == "backbone"
            and isinstance(v, dict)
            and isinstance(out.get(k), dict)
            and "type" in v
            and v["type"] != out[k].get("type")
        ):
            out[k] = v  # another network type: the old type's options (e.g. a CNN's channels) do not apply to it
        elif isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options":
            out[k] = deep_merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML config file; every way the file can be wrong is one ``ConfigError`` naming it."""
    p = Path(path)
    if not str(path).strip():
        raise ConfigError("the config path is empty; pass a YAML file, or leave it out for the built-in defaults")
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    if p.is_dir():
        raise ConfigError(f"config {p} is a directory; pass a YAML file (e.g. one of configs/*.yaml)")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read ({e.strerror}); check its permissions") from None
    try:
        text = raw.decode("utf-8")
        if "\x00" in text:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\x00"), raw.index(b"\x00") + 1, "NUL byte")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {p} is not a text file (binary byte at position {e.start}); pass a YAML config"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"config file {p} is not valid YAML (truncated or mistyped?): {first}") from None
    if data is None:
        # An empty file is almost always a failed copy or save; running the defaults would hide it.
        raise ConfigError(
            f"config file {p} is empty; write the sections to change (data:, train:, ...), "
            "or leave the config out to run the built-in defaults"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {p} must hold a mapping of sections (data:, train:, ...), not {type(data).__name__}"
        )
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(
            f"config file {p} has a non-text key {bad[0]!r}; section and key names are words (data, train, ...)"
        )
    return data


def load_config(cls: Type[M], path: str | os.PathLike | None = None, overrides: Sequence[str] = (), **fields: Any) -> M:
    """Build ``cls`` from an optional YAML file, then ``--set`` overrides, then keyword fields."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    extra = deep_merge(parse_overrides(overrides), {k: v for k, v in fields.items() if v is not None})
    if PER_STRATEGY in data:
        data = apply_per_strategy(
            data, (deep_merge(data, extra).get("strategy") or {}).get("name", "modulemesh"), source=str(path)
        )
    data = deep_merge(data, extra)
    return validate(cls, data, source=str(path) if path is not None else "config")


# A config may carry settings for each strategy (``per_strategy: {modulemesh: {router: ...}, er: {train: {lr: 0.1}}}``)
# so that one file reproduces every row of a comparison; the block of the strategy that runs is merged over the
# file, and --set overrides still win. A non-section key in a block is a ``strategy:`` setting of that strategy.
PER_STRATEGY = "per_strategy"
_SECTIONS = ("name", "seed", "device", "data", "scenario", "expert", "router", "strategy", "train")


def apply_per_strategy(data: dict[str, Any], strategy: str, source: str = "config") -> dict[str, Any]:
    """``data`` without its ``per_strategy`` block, with the block for ``strategy`` merged in."""
    data = dict(data)
    blocks = data.pop(PER_STRATEGY, None) or {}
    if not isinstance(blocks, dict) or not all(isinstance(b, dict) for b in blocks.values()):
        raise ConfigError(
            f"'{PER_STRATEGY}' in {source} must map strategy names to settings, "
            "e.g. per_strategy: {er: {train: {lr: 0.1}}}"
        )
    block = dict(blocks.get(strategy) or {})
    own = {k: block.pop(k) for k in list(block) if k not in _SECTIONS}
    if own:
        block["strategy"] = {**block.get("strategy", {}), **own}
    if (data.get("strategy") or {}).get("name") not in (None, strategy):
        # The file's strategy-specific keys belong to the strategy it names; buffer_size is shared.
        data["strategy"] = {k: v for k, v in data["strategy"].items() if k in ("name", "buffer_size")}
    merged = deep_merge(data, block)
    merged.setdefault("strategy", {})["name"] = strategy
    return merged


def validate(cls: Type[M], data: dict[str, Any], source: str = "config") -> M:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(cls, e, source)) from None


def describe_validation_error(cls: Type[BaseModel], err: ValidationError, source: str) -> str:
    """One readable line per problem; unknown keys list the valid keys of their section."""
    lines = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"])
        if not item["loc"]:  # a rule across fields (model validator): its message names the fields
            lines.append(f"{source}: {item['msg'].removeprefix('Value error, ')}")
        elif item["type"] == "value_error" and isinstance(item.get("input"), dict):
            # the same, inside a section: name the section, not its whole contents
            lines.append(f"bad settings in '{loc}' of {source}: {item['msg'].removeprefix('Value error, ')}")
        elif item["type"] == "extra_forbidden":
            section = _section_model(cls, item["loc"][:-1])
            valid = ", ".join(section.model_fields) if section else "?"
            lines.append(f"unknown config key '{loc}' in {source}; valid keys here: {valid}")
        elif item["type"] == "missing":
            lines.append(f"missing config key '{loc}' in {source}; add it (see the example configs in configs/)")
        elif item["type"] == "literal_error":
            lines.append(f"bad value for '{loc}' in {source}: {item['input']!r}; {item['msg'].lower()}")
        else:
            lines.append(f"bad value for '{loc}' in {source}: {item.get('input')!r} ({item['msg']})")
    return "; ".join(lines)


def _section_model(cls: Type[BaseModel], loc: Sequence[Any]) -> Optional[Type[BaseModel]]:
    model: Any = cls
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
