"""Backbone networks for experts, built from a small spec dict.

A spec is plain data so it can live in YAML configs and module manifests, and a saved module can
be rebuilt from its manifest alone:

    {"type": "mlp", "hidden": [100, 100]}
    {"type": "cnn", "channels": [32, 64], "hidden": 128}
    {"type": "resnet18", "width": 64}          # CIFAR-style ResNet-18 for 32x32 inputs
    {"type": "resnet18", "normalize": {"mean": [0.5071, 0.4865, 0.4409], "std": [0.2673, 0.2564, 0.2762]}}
    {"type": "vit", "dim": 64, "depth": 4, "heads": 4}       # token networks of distill.models
    {"type": "moe_vit", "dim": 48, "depth": 4, "experts": 4, "k": 2}
    {"type": "modular", "net": {"type": "vit", ...}, "modules": 2, "outer_width": 64, "layout": "keep"}

``modular`` is the student ``m2mkd`` assembles (``distill.models.build_modular``): the token network
cut into ``modules`` pieces with the stitches (``keep``) or links (``fold``) that plug it into a
meta model of width ``outer_width``. ``upgrade`` models are ``mlp`` and ``cnn`` specs. Every
command's output can thus be rebuilt as an ``Expert`` from its manifest alone.

``normalize`` (image backbones) subtracts a per-channel mean and divides by a std inside the
network, so a saved expert carries its own input normalization: training, evaluation and anyone
who loads the expert see the same inputs.

``build_backbone(spec, input_shape, num_outputs)`` returns an ``nn.Module`` mapping a batch of
inputs of ``input_shape`` (without the batch dim) to ``num_outputs`` logits.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..config import check_backbone_spec
from ..errors import ConfigError


class MLP(nn.Sequential):
    """Flatten -> [Linear -> ReLU] * len(hidden) -> Linear."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_outputs: int, dropout: float = 0.0):
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_outputs))
        super().__init__(*layers)


class SkipHeadMLP(nn.Module):
    """An MLP whose output layer reads every hidden layer's activations (``{type: mlp, skip_head: true}``).

    Why: a head refit in closed form (``strategy.head_refit: lda``) is only as good as the features it reads; on
    Permuted-MNIST's validation split, refit experts with this head scored 92.50% (784-69-69) against 92.19% for
    plain 784-70-70 ones. The last ``nn.Linear`` is the output layer, so ``penultimate`` gives the concatenation.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], num_outputs: int, dropout: float = 0.0):
        super().__init__()
        self.flatten = nn.Flatten()
        layers, width = [], in_features
        for h in hidden:
            block: list[nn.Module] = [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                block.append(nn.Dropout(dropout))
            layers.append(nn.Sequential(*block))
            width = h
        self.hidden = nn.ModuleList(layers)
        self.out = nn.Linear(sum(hidden), num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, seen = self.flatten(x), []
        for layer in self.hidden:
            h = layer(h)
            seen.append(h)
        return self.out(torch.cat(seen, 1))


class ImageBackbone(nn.Module):
    """Views flat rows as the declared (C,H,W) and applies the optional per-channel normalization."""

    def __init__(self, input_shape: Sequence[int], normalize: Mapping[str, Sequence[float]] | None):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.normalized = normalize is not None
        if normalize is not None:
            c = self.input_shape[0]
            mean, std = normalize.get("mean"), normalize.get("std")
            if set(normalize) != {"mean", "std"} or len(mean) != c or len(std) != c or min(std) <= 0:
                raise ConfigError(
                    f"backbone normalize needs {{mean: [{c} values], std: [{c} positive values]}}; "
                    f"got {dict(normalize)}"
                )
            self.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
            self.register_buffer("input_std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], *self.input_shape)
        return (x - self.input_mean) / self.input_std if self.normalized else x


class SmallCNN(ImageBackbone):
    """[Conv3x3 -> BN -> ReLU -> MaxPool2] per channel entry, then a 1-hidden-layer classifier."""

    def __init__(
        self,
        input_shape: Sequence[int],
        channels: Sequence[int],
        hidden: int,
        num_outputs: int,
        normalize: Mapping[str, Sequence[float]] | None = None,
    ):
        super().__init__(input_shape, normalize)
        c, h, w = input_shape
        blocks: list[nn.Module] = []
        for ch in channels:
            blocks += [nn.Conv2d(c, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = ch, max(h // 2, 1), max(w // 2, 1)
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_outputs)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Datasets may store images flat; prepare() views them as the declared (C,H,W).
        return self.classifier(self.features(self.prepare(x)))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(ImageBackbone):
    """ResNet-18 adapted to small (32x32) inputs: 3x3 stem, no max-pool (as in the DER/iCaRL code)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        width: int = 64,
        normalize: Mapping[str, Sequence[float]] | None = None,
    ):
        super().__init__(input_shape, normalize)
        in_channels = self.input_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            layers += [_BasicBlock(cin, cout, 1 if i == 0 else 2), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(self.prepare(x)))), 1))


BACKBONES = ("mlp", "cnn", "resnet18", "vit", "moe_vit", "modular")
TOKEN_NETS = ("vit", "moe_vit")
MODULAR_KEYS = {"type", "net", "modules", "outer_width", "layout"}


def image_shape(kind: str, input_shape: Sequence[int]) -> tuple[int, ...]:
    """(C,H,W) for an image backbone: flat square rows are one-channel images, (H,W) gets C=1."""
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) == 1:
        side = math.isqrt(input_shape[0])
        if side * side != input_shape[0]:
            raise ConfigError(
                f"backbone {kind!r} needs image inputs (C,H,W); got flat vectors of {input_shape[0]} "
                "features, use type: mlp"
            )
        return (1, side, side)
    return (1, *input_shape) if len(input_shape) == 2 else input_shape


def build_token_backbone(spec: Mapping[str, Any], input_shape: Sequence[int], num_outputs: int) -> nn.Module:
    """A token network (``vit``/``moe_vit``) or an assembled m2mKD student (``modular``)."""
    from ..distill.models import build_modular, build_net  # lazy: distill imports mesh

    kind = spec.get("type")
    shape = image_shape(kind, input_shape)
    if kind in TOKEN_NETS:
        return build_net(dict(spec), shape, num_outputs)
    unknown = sorted(set(spec) - MODULAR_KEYS)
    if unknown or not isinstance(spec.get("net"), Mapping):
        raise ConfigError(
            f"backbone 'modular' needs {{net: {{type: vit, ...}}, modules: K, outer_width: W, layout: keep|fold}}; "
            f"got {dict(spec)}"
        )
    k, width = spec.get("modules"), spec.get("outer_width")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (k, width)):
        raise ConfigError(
            f"backbone 'modular': modules and outer_width must be positive integers, got {k!r}, {width!r}"
        )
    return build_modular(dict(spec["net"]), shape, num_outputs, k, width, spec.get("layout", "keep"))


def build_backbone(spec: Mapping[str, Any], input_shape: Sequence[int], num_outputs: int) -> nn.Module:
    if dict(spec).get("type") in (*TOKEN_NETS, "modular"):
        return build_token_backbone(spec, input_shape, num_outputs)
    spec = dict(check_backbone_spec(dict(spec), "backbone"))  # harden: bad widths fail here, not inside torch
    kind = spec.pop("type", "mlp")
    input_shape = tuple(int(s) for s in input_shape)
    try:
        if kind == "mlp":
            hidden, dropout = spec.pop("hidden", [100, 100]), spec.pop("dropout", 0.0)
            if spec.pop("skip_head", False):
                return SkipHeadMLP(math.prod(input_shape), hidden, num_outputs, dropout)
            return MLP(math.prod(input_shape), hidden, num_outputs, dropout)
        if kind in ("cnn", "resnet18"):
            input_shape = image_shape(kind, input_shape)
            normalize = spec.pop("normalize", None)
            if kind == "cnn":
                return SmallCNN(
                    input_shape, spec.pop("channels", [32, 64]), spec.pop("hidden", 128), num_outputs, normalize
                )
            return ResNet18(input_shape, num_outputs, spec.pop("width", 64), normalize)
    finally:
        if spec:
            raise ConfigError(f"unknown backbone option(s) {sorted(spec)} for type {kind!r}")
    raise ConfigError(f"unknown backbone type {kind!r}; choose one of {', '.join(BACKBONES)}")
