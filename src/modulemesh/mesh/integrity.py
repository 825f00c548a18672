"""Tamper evidence for saved experts and meshes: sealed JSON and one root hash per mesh.

A *seal* is the sha256 of a JSON document's canonical form (sorted keys, no whitespace) with the
seal field itself left out, stored in the document. An edit that does not recompute it (a changed
class list, ``"frozen": true -> 0``, a renamed key) is refused on load. A mesh's ``mesh.json``
lists the sha256 of every other JSON file of the mesh (router manifest, expert manifests, which
in turn carry the sha256 of their weights), and its own seal over that list is the mesh's *root*:
one hash that changes when any byte of the mesh changes. A seal detects accidents and edits by
hand; it is not a signature (anyone can recompute it). Authenticity comes from the hub's ed25519
signatures, which sign a package listing these same hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

SEAL = "seal"


def canonical(obj: Any) -> bytes:
    """The bytes a seal is computed over: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def seal(doc: dict[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in doc.items() if k != SEAL}
    return {**body, SEAL: hashlib.sha256(canonical(body)).hexdigest()}


def check_seal(doc: dict[str, Any], path: str | os.PathLike) -> str:
    """Return the seal after checking it; refuse a document whose content no longer matches it."""
    stored = doc.get(SEAL)
    if not isinstance(stored, str):
        raise CheckpointError(
            f"{path} carries no integrity seal; it was written by an older version or edited, re-save it"
        )
    actual = seal(doc)[SEAL]
    if actual != stored:
        raise CheckpointError(
            f"refusing {path}: its content does not match its integrity seal "
            f"({actual[:12]}... != {stored[:12]}...); the file was edited or corrupted, re-save or re-pull it"
        )
    return stored


def read_json(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """A JSON object from ``path``; one-line CheckpointError if missing, a directory, binary or not a JSON object."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{what} {p} does not exist; check the path")
    if p.is_dir():
        raise CheckpointError(f"{what} {p} is a directory, not a JSON file")
    try:
        doc = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(
            f"{what} {p} is not UTF-8 text (byte {e.start}); the file is corrupt, re-save or re-pull it"
        ) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{what} {p} is not valid JSON ({e.msg} at line {e.lineno}); re-save or re-pull it"
        ) from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{what} {p} must hold a JSON object, not {type(doc).__name__}")
    return doc


def require(doc: dict[str, Any], path: str | os.PathLike, **fields: type | tuple[type, ...]) -> None:
    """Refuse a document lacking a field or holding one of the wrong type (after its seal was checked)."""
    for name, kind in fields.items():
        if name not in doc:
            raise CheckpointError(
                f"{path} lacks the field {name!r}; the file is from another version or damaged, re-save it"
            )
        if not isinstance(doc[name], kind) or (kind is int and isinstance(doc[name], bool)):
            raise CheckpointError(f"{path}: field {name!r} has the wrong type ({type(doc[name]).__name__})")


def file_hashes(root: str | os.PathLike, relpaths: list[str]) -> dict[str, str]:
    return {rel: sha256_file(Path(root) / rel) for rel in relpaths}


def check_file_hashes(root: str | os.PathLike, expected: dict[str, str], owner: str | os.PathLike) -> None:
    """Every file listed in ``owner`` (e.g. mesh.json) exists under ``root`` with the recorded sha256."""
    for rel, digest in expected.items():
        p = Path(root) / rel
        if not p.is_file():
            raise CheckpointError(f"{p} listed in {owner} is missing; the mesh is incomplete, re-save or re-pull it")
        actual = sha256_file(p)
        if actual != digest:
            raise CheckpointError(
                f"refusing {p}: its sha256 {actual[:12]}... differs from {digest[:12]}... recorded in {owner}; "
                "the file was edited or corrupted, re-save or re-pull the mesh"
            )
