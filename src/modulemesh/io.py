"""Atomic file writes: a crash mid-write never leaves a half-written result behind.

Every file is written to a temporary sibling and moved into place with ``os.replace``, which is
atomic on POSIX and Windows, so readers see either the old file or the complete new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def _atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results should be readable like any file the user writes
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return _atomic(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_write_yaml(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def atomic_save(path: str | os.PathLike, save: Callable[[str], None]) -> Path:
    """Run ``save(tmp_path)`` (e.g. ``fig.savefig``) and move the result into place atomically."""
    return _atomic(path, save)


def _json_default(obj: Any) -> Any:
    # numpy / torch scalars and arrays show up in metrics; store them as plain numbers.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in JSON")


# ---------------------------------------------------------------- reading files a user or a crash may have damaged


def read_json_file(path: str | os.PathLike, what: str, fix: str) -> Any:
    """Parse ``path`` as JSON or raise ``CheckpointError`` naming the file, what it is and how to fix it."""
    from .errors import CheckpointError

    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise CheckpointError(f"{what} {path} cannot be read ({reason}); {fix}") from None


def cached_json(path: str | os.PathLike) -> dict[str, Any]:
    """A cached result file as a mapping; ``{}`` when it is absent, damaged or not a mapping (recompute it)."""
    try:
        obj = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return {}
    return obj if isinstance(obj, dict) else {}


def previous_fields(path: str | os.PathLike, section: str, same: dict[str, Any]) -> dict[str, Any]:
    """``path``'s JSON ``[section]`` when the file's entries ``same`` match exactly (else ``{}``).

    A rerun that only rewrites a finished run's outputs may lack what computed some result fields (the
    trained model, the data); merging these first keeps them: ``{**previous_fields(...), **recomputed}``.
    The match (same config, same history) guarantees the kept fields describe this very run.
    """
    try:
        old = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return {}

    def canon(x: Any) -> str:  # compares NaN equal to NaN (a round's accuracy may be NaN), tuples to lists
        return json.dumps(x, sort_keys=True, default=_json_default)

    if not isinstance(old.get(section), dict):
        return {}
    return old[section] if all(canon(old.get(k)) == canon(v) for k, v in same.items()) else {}


# ---------------------------------------------------------------- --overwrite that cannot lose a result to an error

PARKED = ".overwritten"  # suffix of an old output set aside by --overwrite: .NAME.overwritten
_parked: list[tuple[Path, Path]] | None = None  # (original, parked) of the running command; None outside one


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def set_aside(path: str | os.PathLike) -> None:
    """``--overwrite``: move an old output out of the way rather than deleting it.

    Inside :func:`overwrite_transaction` the old output is deleted when the command succeeds and put back when
    it fails (bad data or a model spec found late, Ctrl-C), so an error never costs the previous result.
    Outside one (library use) it is deleted at once.
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    parked = path.with_name(f".{path.name}{PARKED}")
    _remove(parked)  # left by a command killed mid-overwrite: it was to be deleted anyway
    os.replace(path, parked)
    if _parked is None:
        _remove(parked)
    else:
        _parked.append((path, parked))


@contextmanager
def overwrite_transaction() -> Iterator[None]:
    global _parked
    _parked, succeeded = [], False
    try:
        yield
        succeeded = True
    finally:
        parked, _parked = _parked, None
        for original, old in reversed(parked):
            if succeeded:
                _remove(old)
            else:
                _remove(original)  # a partial new output written before the failure
                os.replace(old, original)


# ---------------------------------------------------------------- one writer per output directory


def stale_temp_files(root: str | os.PathLike, older_than_s: float = 0.0) -> list[Path]:
    """Temporary siblings ``.NAME.XXXX.tmp`` that ``_atomic`` leaves only when its process was killed mid-write.

    ``older_than_s`` > 0 keeps younger ones: for a directory no lock guards (the shared data cache), where
    a live writer's temporary file must survive.
    """
    import time

    root = Path(root)
    if not root.is_dir():
        return []
    cutoff = time.time() - older_than_s
    found = []
    for p in root.rglob(".*.tmp"):
        try:
            if p.is_file() and (older_than_s <= 0 or p.stat().st_mtime < cutoff):
                found.append(p)
        except OSError:  # removed by its writer meanwhile
            continue
    return sorted(found)


def check_output_path(out: str | os.PathLike) -> Path:
    """Refuse an output path that is, or lies under, an existing file, before anything is written."""
    from .errors import ConfigError

    out = Path(out)
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            where = "is" if p == out else f"lies under {p}, which is"
            raise ConfigError(
                f"--out {out} {where} an existing file, not a directory; choose a directory path for --out"
            )
    return out


def lock_path(out: str | os.PathLike) -> Path:
    """``runs/exp`` -> ``runs/.exp.modulemesh-lock``: beside the directory, so locking never writes into it."""
    out = Path(os.path.abspath(out))
    return out.with_name(f".{out.name}.modulemesh-lock")


class OutputLock:
    """An exclusive, non-blocking lock on an output directory, held for the whole command.

    The lock is an OS file lock (``filelock``: ``flock`` on POSIX), so the kernel drops it when its
    holder dies, even by ``kill -9``: a crashed run never blocks the next one. The lock file sits beside
    the directory (never inside, so a command refused before its first write leaves the directory as it
    was) and is never deleted (deleting a lock file races with a process about to lock it). Its content
    says who holds it (pid, host, command, start time) so a refused writer can name its rival.
    """

    def __init__(self, out: str | os.PathLike, command: str):
        self.out = Path(out)
        self.path = lock_path(out)
        self.command = command
        self._lock = None

    def acquire(self) -> "OutputLock":
        import socket
        import time

        from filelock import FileLock, Timeout

        from .errors import ModuleMeshError

        check_output_path(self.out)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.path, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise ModuleMeshError(
                f"{self.out} is being written by another modulemesh process ({self.holder()}); "
                "wait for it to finish, or use another --out"
            ) from None
        self._lock = lock
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        }
        with open(self.path, "w") as f:  # the lock file itself: an atomic rename would swap the locked inode
            f.write(json.dumps(owner) + "\n")
        for tmp in stale_temp_files(self.out):  # only a dead writer leaves these, and we hold the lock now
            tmp.unlink(missing_ok=True)
        for old in sorted(self.out.rglob(f".*{PARKED}")) if self.out.is_dir() else []:
            _remove(old)  # set aside by an --overwrite that was killed: the user wanted it gone
        return self

    def holder(self) -> str:
        try:
            o = json.loads(self.path.read_text())
            return f"pid {o['pid']} on {o['host']}, started {o['started']}: {o['command']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "it has not recorded its pid yet"

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
