"""Feature-space density routing: the densities live in a frozen feature extractor's space.

``router.features`` names the extractor:
- a saved mesh directory (``mesh.json``): the trunk of one of its experts (``router.features_expert``,
  default the first);
- a saved expert (``PATH.json`` + ``PATH.safetensors``, as ``Expert.save`` writes): its trunk;
- a user's pretrained weights, ``*.safetensors`` or a ``torch.load(weights_only=True)`` state dict
  (``.pt``/``.pth``), for a backbone described by ``router.features_backbone`` (a backbone spec, e.g.
  ``{type: resnet18}``); its classification head, if present, is dropped.

The trunk is the network with its last linear layer replaced by the identity, frozen and kept in eval
mode; it never trains. Its weights are saved with the mesh (router state ``features.*``), so a saved
mesh loads without the original file. Per-expert router state stays the densities only: experts
composed from different meshes must share the same extractor.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ConfigError
from .backbones import build_backbone
from .density import DensityRouter


def trunk(net: nn.Module) -> nn.Module:
    """A frozen copy of ``net`` whose last ``nn.Linear`` is the identity (its output = the head's input)."""
    net = copy.deepcopy(net)
    names = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError("the feature extractor has no linear head to remove; give a classification network")
    parent_name, _, child = names[-1].rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, child, nn.Identity())
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused or a corrupt file
        raise ConfigError(
            f"cannot read {path} as a weights-only state dict ({str(e).splitlines()[0]}); "
            "save it with torch.save(model.state_dict(), ...) or as safetensors"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} does not hold a state dict of tensors; save model.state_dict()")
    return state


def build_extractor(spec: dict[str, Any]) -> nn.Module:
    """The trunk's architecture (random weights) from a saved spec: backbone, input_shape, num_outputs."""
    return trunk(build_backbone(spec["backbone"], spec["input_shape"], spec["num_outputs"]))


def load_extractor(
    source: str, input_shape: tuple[int, ...], backbone: Optional[dict] = None, expert: Optional[str] = None
) -> tuple[nn.Module, dict[str, Any]]:
    """(frozen trunk, spec to rebuild it) from a mesh directory, a saved expert or a user's weights file."""
    from .expert import Expert

    path = Path(source)
    if (path / "mesh.json").exists():
        names = json.loads((path / "mesh.json").read_text()).get("experts", [])
        name = expert or (names[0] if names else None)
        if name not in names:
            raise ConfigError(f"router.features_expert {name!r} is not in {path}; its experts are {', '.join(names)}")
        path = path / "experts" / name
    if path.with_suffix(".json").exists() and not path.suffix:
        e = Expert.load(path)
        spec = {"backbone": e.backbone_spec, "input_shape": list(e.input_shape), "num_outputs": len(e.classes)}
        net = e.net
    elif path.is_file() and path.suffix in (".safetensors", ".pt", ".pth"):
        if not backbone:
            raise ConfigError(
                f"router.features is a weights file ({path.name}); say its architecture with "
                "router.features_backbone, e.g. {type: cnn, channels: [32, 64], hidden: 128}"
            )
        state = _read_state_dict(path)
        head = [k for k in state if k.endswith(".weight") and state[k].ndim == 2][-1:]
        num_outputs = int(state[head[0]].shape[0]) if head else 1
        spec = {"backbone": dict(backbone), "input_shape": list(input_shape), "num_outputs": num_outputs}
        net = build_backbone(backbone, input_shape, num_outputs)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"{path.name} does not fit router.features_backbone {backbone}: missing "
                f"{missing[:3]}, unexpected {unexpected[:3]}"
            )
    else:
        raise ConfigError(
            f"router.features {source!r} is neither a saved mesh directory, a saved expert "
            "(PATH.json + PATH.safetensors) nor a .safetensors/.pt/.pth weights file"
        )
    if (
        tuple(spec["input_shape"]) != tuple(input_shape)
        and torch.Size(spec["input_shape"]).numel() != torch.Size(input_shape).numel()
    ):
        raise ConfigError(
            f"router.features takes inputs {tuple(spec['input_shape'])}; this data set has {tuple(input_shape)}"
        )
    spec["source"] = str(source)
    return trunk(net), spec


class FeatureDensityRouter(DensityRouter):
    """The density router on a frozen extractor's features instead of pixels."""

    def __init__(self, extractor: nn.Module, extractor_spec: dict[str, Any], num_experts: int = 0, **kwargs):
        super().__init__(num_experts, **kwargs)
        self.features = extractor
        self.extractor_spec = dict(extractor_spec)

    def train(self, mode: bool = True) -> "FeatureDensityRouter":
        super().train(mode)
        self.features.eval()  # frozen: batch-norm statistics never move
        return self

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        shape = self.extractor_spec["input_shape"]
        return self.features(x.float().reshape(x.shape[0], *shape)).flatten(1).float()

    def spec(self) -> dict:
        return {**super().spec(), "features": self.extractor_spec}

    def export_state(self) -> dict[str, torch.Tensor]:
        state = super().export_state()
        state.update({f"features.{k}": v for k, v in self.features.state_dict().items()})
        return state

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        own = {k[9:]: v for k, v in state.items() if k.startswith("features.")}
        self.features.load_state_dict(own)
        super().import_state({k: v for k, v in state.items() if not k.startswith("features.")})
