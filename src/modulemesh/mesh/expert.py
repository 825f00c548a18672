"""An expert: a backbone that predicts over the subset of global classes it covers.

Experts are the unit of reuse: each one can be frozen, cloned, versioned and saved/loaded alone,
so a module trained on one machine can be dropped into another mesh. The record is two files:
``NAME.safetensors`` (the weights and, under ``router_state.*``, the router state that routes to
this expert, e.g. its input density) and ``NAME.json``, a sealed manifest (see ``integrity``) with
the weights' sha256, the architecture, the classes and the provenance: task, data fingerprint,
parent, hash of the training config, metrics, library version (see ``provenance``).

A finished expert can be kept in reduced precision (``compress("fp16" | "int8" | "int4")``, see ``storage``): its
weights are rounded once, the record holds the rounded form, and it computes in fp32 from it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_module, module_paths, save_module
from ..errors import CheckpointError, ModuleMeshError
from ..io import atomic_write_json
from .backbones import build_backbone
from .integrity import check_seal, read_json, require, seal
from .storage import check_storage, pack_state, unpack_state

ROUTER_PREFIX = "router_state."


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
        # What the router holds for this expert: (description, tensors); see expert_routing.
        self.router_state: tuple[dict[str, Any], dict[str, torch.Tensor]] = ({}, {})
        self.net = build_backbone(self.backbone_spec, self.input_shape, len(self.classes))
        # Kept as a buffer so it follows .to(device) and scatters logits into the global space.
        # True when the expert's outputs are already the global label space (no scatter needed).
        self.covers_in_order = self.classes == list(range(len(self.classes)))
        self.register_buffer("class_index", torch.tensor(self.classes, dtype=torch.long), persistent=False)
        # The stored precision and, once compressed, the packed weights a save writes (None: fp32 state_dict).
        self.storage, self.packed = "fp32", None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def freeze(self) -> Expert:
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def unfreeze(self) -> Expert:
        for p in self.parameters():
            p.requires_grad_(True)
        self.packed = None  # it trains again: its weights leave the rounded grid until compressed anew
        return self

    @torch.no_grad()
    def compress(self, storage: str) -> Expert:
        """Keep the weights in ``storage`` precision from now on (fp32, fp16, per-channel int8 or int4): round
        them once, remember the rounded form (what ``save`` writes and the run's bytes count) and compute in fp32
        from it. For a finished expert: one that trains again (``unfreeze``) returns to fp32 until compressed.
        int4 keeps the output layer (the last ``nn.Linear``) in int8 (see ``storage``)."""
        self.storage = check_storage(storage)
        if storage == "fp32":
            self.packed = None
            return self
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        self.packed = pack_state(state, storage, fine=self._output_keys())
        self._load_unpacked(self.packed)
        return self

    def _output_keys(self) -> set[str]:
        """State keys of the output layer: the last ``nn.Linear`` of the network."""
        last = [name for name, m in self.net.named_modules() if isinstance(m, torch.nn.Linear)][-1:]
        return {f"net.{last[0]}.weight"} if last else set()

    def _load_unpacked(self, packed: dict[str, torch.Tensor]) -> None:
        live = self.state_dict()
        self.load_state_dict({k: v.to(live[k].device, live[k].dtype) for k, v in unpack_state(packed).items()})

    def stored_state(self) -> dict[str, torch.Tensor]:
        """The weights as a save writes them: the packed form once compressed, else the fp32 state dict."""
        return dict(self.packed) if self.packed is not None else dict(self.state_dict())

    def clone(self, name: str, bump_version: bool = False) -> Expert:
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
            "storage": self.storage if self.packed is not None else "fp32",
            "metadata": self.metadata,
            "router_state": self.router_state[0],
        }

    def save(self, path: str | os.PathLike) -> str:
        """Write ``PATH.safetensors`` + ``PATH.json`` (sealed); returns the manifest path."""
        state = self.stored_state()
        state.update({ROUTER_PREFIX + k: v for k, v in self.router_state[1].items()})
        manifest_path = save_module(path, state, self.manifest())
        # The seal covers the fields save_module adds (the weights' sha256 among them).
        atomic_write_json(manifest_path, seal(read_json(manifest_path, "expert manifest")))
        return str(manifest_path)

    @classmethod
    def read_manifest(cls, path: str | os.PathLike) -> dict[str, Any]:
        """The expert's manifest after checking its seal, kind and field types (weights not read)."""
        manifest_path = module_paths(path)[1]
        manifest = read_json(manifest_path, "expert manifest")
        check_seal(manifest, manifest_path)
        if manifest.get("kind") != "expert":
            raise CheckpointError(f"{manifest_path} holds a {manifest.get('kind')!r} module, not an expert")
        require(
            manifest,
            manifest_path,
            name=str,
            classes=list,
            backbone=dict,
            input_shape=list,
            version=int,
            frozen=bool,
            metadata=dict,
            router_state=dict,
        )
        return manifest

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Expert:
        manifest = cls.read_manifest(path)
        state, _ = load_module(path, device="cpu")
        try:
            expert = cls(
                manifest["name"],
                manifest["classes"],
                manifest["backbone"],
                manifest["input_shape"],
                manifest["version"],
                manifest["metadata"],
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"expert manifest for {path} is not usable: {e}") from None
        router = {k[len(ROUTER_PREFIX) :]: v for k, v in state.items() if k.startswith(ROUTER_PREFIX)}
        expert.router_state = (manifest["router_state"], router)
        weights = {k: v for k, v in state.items() if not k.startswith(ROUTER_PREFIX)}
        try:
            if manifest.get("storage", "fp32") != "fp32":
                expert.storage, expert.packed = check_storage(manifest["storage"]), weights
                expert._load_unpacked(weights)
            else:
                expert.load_state_dict(weights)
        except (RuntimeError, KeyError, ModuleMeshError) as e:
            raise CheckpointError(
                f"weights in {path} do not fit the architecture in its manifest: {str(e).splitlines()[0]}"
            ) from e
        if manifest["frozen"]:
            expert.freeze()
        return expert.to(device)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, version={self.version}, classes={self.classes}, params={self.num_parameters}"
