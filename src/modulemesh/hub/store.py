"""A hub on any fsspec URL: a local folder, ``file://``, ``memory://``, ``s3://``, ``gs://`` (with the
s3fs/gcsfs plugins), or ``http(s)://`` read-only. No server: the layout is plain files.

    ROOT/blobs/sha256/<hex>          every file of every module, and each package descriptor, by content
    ROOT/index/<name>/<version>.json one entry per published version: descriptor hash, signature
    ROOT/index.json                  a snapshot of all entries, for hubs that cannot be listed (http)

A *descriptor* (canonical JSON, itself a blob) names the module, its version and kind, its root
hash and the sha256 and size of each file. An entry points at a descriptor and may carry an ed25519
signature of the descriptor's bytes. Pulling checks the descriptor against the entry's hash, the
entry against the descriptor's name and version, the signature, and every blob against its hash,
then loads the module (its own seals and hashes) before moving it into place.

Two publishers at once: versions are claimed by creating ``index/<name>/<version>.json`` only if
it does not exist; the loser takes the next version. Local folders and ``file://``: creation is
serialized by a lock file (``filelock``) and every write is atomic (temporary file + rename), so
nothing is lost across processes. Other URLs: exclusive create (``open(..., "xb")``, which memory://
honours and s3fs/gcsfs implement as conditional writes where the store supports them); if a plugin
refuses ``xb`` the entry is written and read back after a short wait to confirm this publisher won
(best effort: two writers inside that window on a store without conditional writes can collide;
blobs are content-addressed, so the loser's data is intact and re-running its publish completes it).
The ``index.json`` snapshot is rebuilt from the entries after each publish.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import fsspec
from filelock import FileLock
from fsspec.implementations.local import LocalFileSystem

from ..errors import ModuleMeshError
from ..io import atomic_write_bytes
from ..mesh.integrity import canonical
from . import signing
from .errors import HubError
from .package import describe, verify_local

PACKAGE_FORMAT = "modulemesh.package/1"
ENTRY_FORMAT = "modulemesh.hub-entry/1"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
PULLED = "hub-package.json"  # written beside a pulled module: the entry and descriptor it came from
T = TypeVar("T")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_spec(spec: str) -> tuple[str, Optional[int]]:
    name, _, version = spec.partition("@")
    if not NAME.match(name):
        raise HubError(f"module name {name!r} may use letters, digits, '_', '.', '-' (at most 100)")
    if not version or version == "latest":
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise HubError(f"version in {spec!r} must be a positive integer (NAME@3) or 'latest'")
    return name, int(version)


class Hub:
    def __init__(self, url: str):
        self.url = str(url)
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url)
        except ImportError as e:
            raise HubError(f"hub {self.url}: {e} (pip install the fsspec plugin for this URL scheme)") from None
        except (ValueError, TypeError) as e:
            raise HubError(f"hub URL {self.url!r} is not usable: {e}") from None
        self.root = root.rstrip("/") or "/"
        self.local = isinstance(self.fs, LocalFileSystem)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.read_only = bool({"http", "https"} & set(protocols))

    # ------------------------------------------------------------------ raw access
    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts]) if self.root != "/" else "/" + "/".join(parts)

    def _io(self, what: str, fn: Callable[[], T]) -> T:
        """Run a storage call; any failure of the store becomes one line naming the hub."""
        try:
            return fn()
        except ModuleMeshError:
            raise
        except FileNotFoundError:
            raise HubError(
                f"hub {self.url}: {what}: not found; check the URL and that the module was published there"
            ) from None
        except Exception as e:  # noqa: BLE001 - network, permission and plugin errors vary by backend
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise HubError(f"hub {self.url} is unreachable or refused the request ({what}: {detail})") from None

    def _get(self, rel: str) -> bytes:
        return self._io(f"read {rel}", lambda: self.fs.cat_file(self._path(rel)))

    def _blob(self, digest: str, what: str) -> bytes:
        data = self._get(f"blobs/sha256/{digest}")
        if sha256(data) != digest:
            raise HubError(
                f"refusing {what}: blob {digest[:12]}... on {self.url} does not match its hash (tampered or corrupt)"
            )
        return data

    def _put(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        if self.local:
            atomic_write_bytes(path, data)
        else:
            self._io(f"write {rel}", lambda: self.fs.pipe_file(path, data))

    def _put_blob(self, data: bytes) -> str:
        digest = sha256(data)
        rel = f"blobs/sha256/{digest}"
        if not self._io(f"check {rel}", lambda: self.fs.exists(self._path(rel))):
            self._put(rel, data)
        return digest

    def _create(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` only if absent; False when another publisher got there first."""
        path = self._path(rel)
        if self.local:  # called under the hub's lock file
            if os.path.exists(path):
                return False
            atomic_write_bytes(path, data)
            return True
        self._io(f"create {rel}", lambda: self.fs.makedirs(self._path(*rel.split("/")[:-1]), exist_ok=True))
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError, TypeError):  # the plugin has no exclusive create
            if self._io(f"check {rel}", lambda: self.fs.exists(path)):
                return False
            self._put(rel, data)
            time.sleep(0.5)  # let a racing writer land before we read back who won
            return self._get(rel) == data

    @contextlib.contextmanager
    def _lock(self):
        if not self.local:
            yield
            return
        os.makedirs(self.root, exist_ok=True)
        with FileLock(os.path.join(self.root, ".index.lock"), timeout=120):
            yield

    # ------------------------------------------------------------------ index
    def entries(self) -> list[dict[str, Any]]:
        """Every published version, sorted by name and version (entries are checked again on pull)."""
        if self.read_only:
            snap = self._io("read index.json", lambda: json.loads(self.fs.cat_file(self._path("index.json"))))
            items = snap.get("entries", []) if isinstance(snap, dict) else []
        else:
            self._fresh()
            if not self._io("open the hub", lambda: self.fs.isdir(self.root)):
                raise HubError(f"no hub at {self.url}: the location does not exist (publish creates it)")
            paths = self._io("list index", lambda: self.fs.glob(self._path("index", "*", "*.json")))
            items = [self._read_entry(p) for p in paths]
        return sorted(items, key=lambda e: (str(e.get("name")), int(e.get("version", 0))))

    def _read_entry(self, path: str) -> dict[str, Any]:
        raw = self._io(f"read {path}", lambda: self.fs.cat_file(path))
        try:
            entry = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise HubError(f"hub {self.url}: index entry {path} is not valid JSON (tampered or corrupt)") from None
        if not isinstance(entry, dict) or entry.get("format") != ENTRY_FORMAT:
            raise HubError(f"hub {self.url}: {path} is not a hub entry (tampered or corrupt)")
        return entry

    def _fresh(self) -> None:
        """Drop the plugin's cached listings (s3fs/gcsfs keep them): another publisher may have added
        entries since, and a stale listing would make this one claim a taken version forever."""
        if not self.local:
            self.fs.invalidate_cache()

    def _versions(self, name: str) -> list[int]:
        self._fresh()
        paths = self._io("list versions", lambda: self.fs.glob(self._path("index", name, "*.json")))
        return sorted(int(Path(p).stem) for p in paths if Path(p).stem.isdigit())

    def resolve(self, spec: str) -> dict[str, Any]:
        """The entry of ``NAME[@VERSION]`` (latest when no version); only that name's entries are read,
        so a damaged entry of another module does not block this one."""
        name, version = parse_spec(spec)
        if self.read_only:
            found = {int(e.get("version", 0)): e for e in self.entries() if e.get("name") == name}
        else:
            self._fresh()
            if not self._io("open the hub", lambda: self.fs.isdir(self.root)):
                raise HubError(f"no hub at {self.url}: the location does not exist (publish creates it)")
            found = {v: None for v in self._versions(name)}
        if not found:
            known = sorted(Path(p).name for p in self._io("list index", lambda: self.fs.glob(self._path("index", "*"))))
            if self.read_only:
                known = sorted({str(e.get("name")) for e in self.entries()})
            raise HubError(f"unknown module {name!r} on {self.url}; published: {', '.join(known) or 'nothing yet'}")
        v = version if version is not None else max(found)
        if v not in found:
            raise HubError(f"{name} has no version {v} on {self.url}; versions: {', '.join(map(str, sorted(found)))}")
        entry = found[v] or self._read_entry(self._path("index", name, f"{v}.json"))
        if (entry.get("name"), entry.get("version")) != (name, v):
            raise HubError(
                f"refusing {name}@{v}: its index entry names {entry.get('name')}@{entry.get('version')} (tampered)"
            )
        return entry

    def _snapshot(self) -> None:
        self._put(
            "index.json", json.dumps({"format": "modulemesh.hub/1", "entries": self.entries()}, indent=1).encode()
        )

    # ------------------------------------------------------------------ publish / pull
    def publish(
        self, path: str | os.PathLike, name: Optional[str] = None, key: Optional[str | os.PathLike] = None
    ) -> dict[str, Any]:
        if self.read_only:
            raise HubError(f"hub {self.url} is read-only (http); publish to a folder, file://, s3:// or gs:// URL")
        pkg = describe(path)
        name = name or pkg.name
        parse_spec(name)
        private = signing.load_private_key(key) if key else None
        blobs = {rel: (pkg.base / rel).read_bytes() for rel in pkg.files}
        files = {rel: {"sha256": sha256(b), "size": len(b)} for rel, b in blobs.items()}
        with self._lock():
            for data in blobs.values():
                self._put_blob(data)
            for _ in range(1000):
                version = (self._versions(name) or [0])[-1] + 1
                descriptor = canonical(
                    {
                        "format": PACKAGE_FORMAT,
                        "name": name,
                        "version": version,
                        "kind": pkg.kind,
                        "root": pkg.root,
                        "files": files,
                        "summary": pkg.summary,
                    }
                )
                entry = {
                    "format": ENTRY_FORMAT,
                    "name": name,
                    "version": version,
                    "kind": pkg.kind,
                    "descriptor": self._put_blob(descriptor),
                    "signature": None,
                    "public_key": None,
                }
                if private is not None:
                    entry["signature"], entry["public_key"] = signing.sign(private, descriptor)
                if self._create(f"index/{name}/{version}.json", json.dumps(entry, indent=1).encode()):
                    break
            else:
                raise HubError(f"hub {self.url}: could not claim a version of {name} (too many concurrent publishers)")
            self._snapshot()
        return entry

    def fetch_descriptor(
        self, entry: dict[str, Any], trusted: Optional[set[bytes]] = None, require_signed: bool = False
    ) -> dict[str, Any]:
        """The entry's descriptor after checking its hash, its name/version and the signature policy."""
        where = f"{entry.get('name')}@{entry.get('version')}"
        raw = self._blob(str(entry.get("descriptor")), f"the descriptor of {where}")
        try:
            desc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise HubError(f"refusing {where}: its descriptor is not valid JSON") from None
        if (
            not isinstance(desc, dict)
            or desc.get("format") != PACKAGE_FORMAT
            or (desc.get("name"), desc.get("version")) != (entry.get("name"), entry.get("version"))
        ):
            other = f"{desc.get('name')}@{desc.get('version')}" if isinstance(desc, dict) else "something else"
            raise HubError(f"refusing {where}: the index entry points at the descriptor of {other} (tampered with)")
        signer = None
        if entry.get("signature") or entry.get("public_key"):
            signer = signing.verify(
                raw, str(entry.get("signature")), str(entry.get("public_key")), f"{where} on {self.url}"
            )
        if require_signed:
            if trusted is None:
                raise HubError("--require-signed needs --trusted-keys FILE (the public keys you accept)")
            if signer is None:
                raise HubError(f"refusing {where}: it is not signed and --require-signed was given")
            if signer not in trusted:
                raise HubError(f"refusing {where}: signed by a key that is not in the trusted-keys file")
        return desc

    def pull(
        self, spec: str, out: str | os.PathLike, trusted: Optional[set[bytes]] = None, require_signed: bool = False
    ) -> Path:
        """Download ``NAME[@VERSION]`` into the new directory ``out``; returns the module's path there."""
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise HubError(f"--out {out} already exists and is not an empty directory; pick a new directory")
        entry = self.resolve(spec)
        desc = self.fetch_descriptor(entry, trusted, require_signed)
        files = desc.get("files")
        if not isinstance(files, dict) or any(Path(rel).is_absolute() or ".." in Path(rel).parts for rel in files):
            raise HubError(f"refusing {spec}: its descriptor lists unsafe file paths")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            for rel, info in files.items():
                data = self._blob(str(info.get("sha256")), f"{rel} of {spec}")
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
            (tmp / PULLED).write_text(json.dumps({"hub": self.url, "entry": entry, "descriptor": desc}, indent=1))
            pkg = verify_local(tmp if desc.get("kind") == "mesh" else tmp / next(iter(files)))
            if pkg.root != desc.get("root"):
                raise HubError(f"refusing {spec}: the pulled module's root hash differs from its descriptor's")
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out if desc.get("kind") == "mesh" else out / next(iter(files))
