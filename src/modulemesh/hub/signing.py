"""ed25519 signatures over package descriptors (the ``cryptography`` package).

A key pair is two files: ``KEY`` (PKCS#8 PEM private key, mode 0600) and ``KEY.pub``, one line
``ed25519 <base64 public key> <comment>``. A trusted-keys file holds such lines (``#`` comments
allowed); ``pull --require-signed`` accepts a module only if its descriptor is signed by one of them.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..io import atomic_write_bytes, atomic_write_text
from .errors import HubError


def public_line(key: Ed25519PublicKey, comment: str = "") -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"ed25519 {base64.b64encode(raw).decode()} {comment}".strip()


def generate_key(path: str | os.PathLike, comment: str = "") -> str:
    """Write a new key pair to PATH and PATH.pub; returns the public line. Refuses to overwrite."""
    p = Path(path)
    if p.exists() or p.with_name(p.name + ".pub").exists():
        raise HubError(f"{p} or {p}.pub already exists; pick another path (keys are never overwritten)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    atomic_write_bytes(p, pem)
    os.chmod(p, 0o600)
    line = public_line(key.public_key(), comment or p.stem)
    atomic_write_text(p.with_name(p.name + ".pub"), line + "\n")
    return line


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    p = Path(path)
    if not p.is_file():
        raise HubError(f"signing key {p} does not exist; create one with `modulemesh hub keygen {p}`")
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise HubError(
            f"{p} is not an unencrypted PEM private key ({str(e).splitlines()[0]}); use `modulemesh hub keygen`"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise HubError(f"{p} holds a {type(key).__name__}, not an ed25519 key; use `modulemesh hub keygen`")
    return key


def decode_public(b64: str, where: str) -> bytes:
    try:
        raw = base64.b64decode(b64, validate=True)
    except (ValueError, TypeError):
        raw = b""
    if len(raw) != 32:
        raise HubError(f"{where}: {b64[:20]!r} is not a base64 ed25519 public key (32 bytes)")
    return raw


def load_trusted_keys(path: str | os.PathLike) -> set[bytes]:
    p = Path(path)
    if not p.is_file():
        raise HubError(f"trusted-keys file {p} does not exist; list public keys (lines of KEY.pub) in it")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise HubError(
            f"trusted-keys file {p} is not text; it should hold lines 'ed25519 <base64 key> [comment]'"
        ) from None
    keys = set()
    for n, line in enumerate(lines, 1):
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        if parts[0] != "ed25519" or len(parts) < 2:
            raise HubError(f"{p}:{n}: expected 'ed25519 <base64 key> [comment]'")
        keys.add(decode_public(parts[1], f"{p}:{n}"))
    return keys


def sign(key: Ed25519PrivateKey, data: bytes) -> tuple[str, str]:
    """(base64 signature, base64 public key)."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(key.sign(data)).decode(), base64.b64encode(raw).decode()


def verify(data: bytes, signature_b64: str, public_b64: str, where: str) -> bytes:
    """Raise HubError unless ``signature`` signs ``data`` under ``public``; returns the raw public key."""
    raw = decode_public(public_b64, where)
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(base64.b64decode(signature_b64, validate=True), data)
    except (InvalidSignature, ValueError, TypeError):
        raise HubError(
            f"refusing {where}: its signature does not verify; the entry or descriptor was tampered with"
        ) from None
    return raw
