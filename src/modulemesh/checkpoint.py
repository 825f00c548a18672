"""One way to save a module, used by every feature: safetensors weights + a JSON manifest.

``save_module(path, state, manifest)`` writes ``PATH.safetensors`` and ``PATH.json``. The manifest
records what the weights are (architecture, classes, version, anything the caller adds) and the
sha256 of the weights file, so a file that was corrupted or tampered with is refused on load.
Safetensors holds only tensors, so loading never runs code from the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import CheckpointError
from .io import atomic_write_bytes, atomic_write_json

FORMAT = "modulemesh.module/1"


def module_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``x``, ``x.safetensors`` or ``x.json`` -> (weights file, manifest file)."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_module(path: str | os.PathLike, state: Mapping[str, torch.Tensor], manifest: Mapping[str, Any]) -> Path:
    """Write weights and manifest atomically; returns the manifest path."""
    weights_path, manifest_path = module_paths(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    blob = st_save(tensors)
    atomic_write_bytes(weights_path, blob)
    full = dict(manifest)
    full.update(
        format=FORMAT,
        weights_file=weights_path.name,
        sha256=sha256_bytes(blob),
        tensors={k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()},
        num_elements=int(sum(v.numel() for v in tensors.values())),  # parameters + buffers
    )
    atomic_write_json(manifest_path, full)
    return manifest_path


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    _, manifest_path = module_paths(path)
    if not manifest_path.exists():
        raise CheckpointError(f"no module manifest at {manifest_path}; save it with save_module() or check the path")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"module manifest {manifest_path} is not valid JSON ({e}); the file is corrupt, re-save the module"
        ) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path} is not a ModuleMesh module manifest (expected format {FORMAT!r})")
    return manifest


def load_module(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (state_dict, manifest) after checking the weights' sha256 against the manifest."""
    weights_path, manifest_path = module_paths(path)
    manifest = read_manifest(path)
    if not weights_path.exists():
        raise CheckpointError(f"weights file {weights_path} named by {manifest_path} is missing")
    blob = weights_path.read_bytes()
    digest = sha256_bytes(blob)
    if digest != manifest.get("sha256"):
        raise CheckpointError(
            f"refusing to load {weights_path}: its sha256 {digest[:12]}... does not match the manifest's "
            f"{str(manifest.get('sha256'))[:12]}...; the weights were modified or corrupted, re-download or "
            "re-save the module"
        )
    try:
        state = st_load(blob)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{weights_path} is not a valid safetensors file ({e})") from e
    return {k: v.to(device) for k, v in state.items()}, manifest
