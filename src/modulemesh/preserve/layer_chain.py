"""Reading a model as a chain of layers (conv* then linear+, with BatchNorm and pass-through layers between)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import ModuleMeshError

PASS_THROUGH = (nn.ReLU, nn.Flatten, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity)


@dataclass
class Layer:
    name: str
    kind: str  # "linear" | "conv"
    module: nn.Module
    bn_name: Optional[str] = None
    bn: Optional[nn.Module] = None
    section: str = ""  # "conv" | "hidden" | "output"
    in_shape: tuple[int, ...] = ()
    grid: int = 1  # for a linear layer that reads flattened conv features: positions per channel

    @property
    def out_units(self) -> int:
        return self.module.weight.shape[0]

    @property
    def in_units(self) -> int:
        return self.module.weight.shape[1]


def unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    net = getattr(model, "net", None)
    if isinstance(net, nn.Module) and not isinstance(model, nn.Sequential):
        return net, "net."
    return model, ""


def input_shape_of(net: nn.Module, layers: list[Layer]) -> Optional[tuple[int, ...]]:
    shape = getattr(net, "input_shape", None)
    if shape is not None:
        return tuple(int(s) for s in shape)
    if layers and layers[0].kind == "linear":
        return (layers[0].in_units,)
    return None


def layer_chain(model: nn.Module, input_shape: Optional[tuple[int, ...]] = None) -> Optional[list[Layer]]:
    """The model's Linear/Conv2d layers in execution order, or None if it is not a plain chain."""
    from ..mesh.backbones import MLP, SmallCNN

    net, _ = unwrap(model)
    if not isinstance(net, (MLP, SmallCNN, nn.Sequential)):
        return None
    layers: list[Layer] = []
    for name, m in net.named_modules():
        if name == "" or any(True for _ in m.children()):
            continue
        if isinstance(m, nn.Linear):
            layers.append(Layer(name, "linear", m))
        elif isinstance(m, nn.Conv2d):
            if m.groups != 1:
                return None
            layers.append(Layer(name, "conv", m))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not layers or layers[-1].bn is not None or layers[-1].out_units != m.num_features:
                return None
            layers[-1].bn_name, layers[-1].bn = name, m
        elif not isinstance(m, PASS_THROUGH):
            return None
    if not layers or layers[-1].kind != "linear":
        return None
    # Execution order must be conv* then linear+ for the pairing rules to hold.
    kinds = [l.kind for l in layers]
    if "conv" in kinds[kinds.index("linear") :]:
        return None
    shape = input_shape or input_shape_of(net, layers)
    if shape is None:
        return None
    seen: dict[str, tuple[int, ...]] = {}
    hooks = [
        l.module.register_forward_hook(lambda mod, inp, out, n=l.name: seen.__setitem__(n, tuple(inp[0].shape[1:])))
        for l in layers
    ]
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            p = next(net.parameters())
            net(torch.zeros((1, *shape), dtype=p.dtype, device=p.device))
    except RuntimeError as e:
        raise ModuleMeshError(f"model does not accept inputs of shape {shape}: {e}") from None
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    linears = [l for l in layers if l.kind == "linear"]
    for l in layers:
        l.in_shape = seen.get(l.name, ())
        l.section = "conv" if l.kind == "conv" else ("output" if l is linears[-1] else "hidden")
    for prev, l in zip(layers, layers[1:]):
        if l.kind == "linear" and prev.kind == "conv":
            if l.in_units % prev.out_units:
                return None
            l.grid = l.in_units // prev.out_units
    return layers
