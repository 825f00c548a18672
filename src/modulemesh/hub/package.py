"""What gets published: an expert record (two files) or a saved mesh (a directory), checked whole.

``describe(path)`` names the files of a module and its root hash (the expert manifest's seal, or the
mesh's root) after checking every seal and hash (the weights' sha256 too), so a damaged module is
never published;
``verify_local(path)`` also loads the weights (``hub verify``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import module_paths
from ..errors import CheckpointError
from ..mesh import Expert, ModuleMesh
from ..mesh.integrity import read_json, sha256_file


@dataclass
class Package:
    kind: str  # "expert" or "mesh"
    name: str
    base: Path  # the directory the relative file paths start from
    files: list[str]
    root: str  # seal of the expert manifest, or the mesh's root
    summary: dict[str, Any] = field(default_factory=dict)


def describe(path: str | os.PathLike) -> Package:
    p = Path(path)
    if p.is_dir():
        if not (p / "mesh.json").exists():
            raise CheckpointError(
                f"{p} is a directory without mesh.json; publish a mesh directory or an expert (NAME.json)"
            )
        meta = ModuleMesh.read_manifest(p)
        files = ["mesh.json"]
        for rel in meta["files"]:
            manifest = read_json(p / rel, "module manifest")
            files += [rel, str(Path(rel).with_name(_checked_weights(p / rel, manifest).name))]
        summary = {
            "experts": meta["experts"],
            "num_classes": meta["num_classes"],
            "input_shape": meta["input_shape"],
            "router": meta["router"].get("type"),
        }
        return Package("mesh", p.resolve().name, p, files, meta["seal"], summary)
    weights, manifest_path = module_paths(p)
    manifest = Expert.read_manifest(manifest_path)
    _checked_weights(manifest_path, manifest)
    summary = {
        "classes": manifest["classes"],
        "input_shape": manifest["input_shape"],
        "router": manifest["router_state"].get("type"),
        "provenance": manifest["metadata"].get("provenance"),
    }
    return Package(
        "expert", manifest["name"], manifest_path.parent, [manifest_path.name, weights.name], manifest["seal"], summary
    )


def _checked_weights(manifest_path: Path, manifest: dict[str, Any]) -> Path:
    """The weights file a manifest names, after checking its sha256: a damaged module is not published."""
    name = str(manifest.get("weights_file"))
    if not name or Path(name).name != name or name in (".", ".."):
        raise CheckpointError(f"{manifest_path} names the weights file {name!r}; it must be a file beside it")
    weights = manifest_path.with_name(name)
    if not weights.is_file():
        raise CheckpointError(f"weights file {weights} named by {manifest_path} is missing")
    digest = sha256_file(weights)
    if digest != manifest.get("sha256"):
        raise CheckpointError(
            f"refusing {weights}: its sha256 {digest[:12]}... does not match {str(manifest.get('sha256'))[:12]}... "
            f"in {manifest_path}; the weights were modified or corrupted, re-save or re-pull the module"
        )
    return weights


def verify_local(path: str | os.PathLike) -> Package:
    """Every seal, hash and weight of the module checks out (the weights are loaded)."""
    pkg = describe(path)
    if pkg.kind == "mesh":
        ModuleMesh.load(pkg.base)
    else:
        Expert.load(pkg.base / pkg.files[0])
    return pkg


def verify_pulled(directory: Path, trusted: set[bytes] | None = None, require_signed: bool = False) -> dict[str, Any]:
    """For a directory written by ``Hub.pull``: its files still match the descriptor, which still
    matches the entry's hash and signature. Returns the descriptor."""
    import hashlib
    import json

    from . import signing
    from .errors import HubError

    record = read_json(directory / "hub-package.json", "pull record")
    entry, desc = record.get("entry"), record.get("descriptor")
    if not isinstance(entry, dict) or not isinstance(desc, dict) or not isinstance(desc.get("files"), dict):
        raise HubError(f"{directory / 'hub-package.json'} is damaged; pull the module again")
    raw = json.dumps(desc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if hashlib.sha256(raw).hexdigest() != entry.get("descriptor"):
        raise HubError(
            f"refusing {directory}: its descriptor no longer matches the hub entry's hash (edited after pull)"
        )
    signer = None
    if entry.get("signature") or entry.get("public_key"):
        signer = signing.verify(raw, str(entry.get("signature")), str(entry.get("public_key")), str(directory))
    if require_signed and (signer is None or trusted is None or signer not in trusted):
        raise HubError(f"refusing {directory}: not signed by a trusted key")
    for rel, info in desc["files"].items():
        p = directory / rel
        if not p.is_file() or hashlib.sha256(p.read_bytes()).hexdigest() != info.get("sha256"):
            raise HubError(f"refusing {p}: missing or changed since it was pulled")
    return desc
