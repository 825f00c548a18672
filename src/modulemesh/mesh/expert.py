"""An expert: a backbone that predicts over the subset of global classes it covers.

Experts are the unit of reuse: each one can be frozen, cloned, versioned and saved/loaded alone
(safetensors + JSON manifest with sha256), so a module trained on one machine can be dropped into
another mesh.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..checkpoint import load_module, save_module
from ..errors import CheckpointError, ModuleMeshError
from .backbones import build_backbone


class Expert(nn.Module):
    """``forward(x)`` returns logits over ``classes`` (its own label subset, in that order)."""

    def __init__(
        self,
        name: str,
        classes: Sequence[int],
        backbone: Mapping[str, Any],
        input_shape: Sequence[int],
        version: int = 1,
        metadata: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if not classes:
            raise ModuleMeshError(f"expert {name!r} must cover at least one class")
        if len(set(classes)) != len(classes):
            raise ModuleMeshError(f"expert {name!r} lists a class twice: {list(classes)}")
        self.name = str(name)
        self.classes = [int(c) for c in classes]
        self.backbone_spec = dict(backbone)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.version = int(version)
        self.metadata = dict(metadata or {})
        self.net = build_backbone(self.backbone_spec, self.input_shape, len(self.classes))
        # Kept as a buffer so it follows .to(device) and scatters logits into the global space.
        # True when the expert's outputs are already the global label space (no scatter needed).
        self.covers_in_order = self.classes == list(range(len(self.classes)))
        self.register_buffer("class_index", torch.tensor(self.classes, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def freeze(self) -> "Expert":
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def unfreeze(self) -> "Expert":
        for p in self.parameters():
            p.requires_grad_(True)
        return self

    def clone(self, name: str, bump_version: bool = False) -> "Expert":
        twin = copy.deepcopy(self)
        twin.name = name
        if bump_version:
            twin.version += 1
        return twin

    def manifest(self) -> dict[str, Any]:
        return {
            "kind": "expert",
            "name": self.name,
            "version": self.version,
            "classes": self.classes,
            "backbone": self.backbone_spec,
            "input_shape": list(self.input_shape),
            "num_parameters": self.num_parameters,
            "frozen": self.frozen,
            "metadata": self.metadata,
        }

    def save(self, path: str | os.PathLike) -> str:
        """Write ``PATH.safetensors`` + ``PATH.json``; returns the manifest path."""
        return str(save_module(path, self.state_dict(), self.manifest()))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Expert":
        state, manifest = load_module(path, device="cpu")
        if manifest.get("kind") != "expert":
            raise CheckpointError(f"{path} holds a {manifest.get('kind')!r} module, not an expert")
        try:
            expert = cls(manifest["name"], manifest["classes"], manifest["backbone"], manifest["input_shape"],
                         manifest.get("version", 1), manifest.get("metadata"))
        except KeyError as e:
            raise CheckpointError(f"expert manifest for {path} lacks the field {e}; re-save the expert") from e
        try:
            expert.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"weights in {path} do not fit the architecture in its manifest: {str(e).splitlines()[0]}") from e
        if manifest.get("frozen"):
            expert.freeze()
        return expert.to(device)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, version={self.version}, classes={self.classes}, params={self.num_parameters}"
