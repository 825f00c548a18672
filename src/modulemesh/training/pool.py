"""The one process pool: spawned workers (one torch thread each) that die with the process that started them.

``compare --jobs N``, the continual benchmark and m2mKD's module jobs all run independent jobs in
worker processes. A plain ``ProcessPoolExecutor`` leaves its workers running when the parent is
killed (SIGTERM/SIGKILL) or waits for them to finish on Ctrl-C; here every worker

* asks the kernel for SIGKILL when its parent exits (Linux ``prctl(PR_SET_PDEATHSIG)``), and also
  runs a watchdog thread that exits the worker once its parent process is gone (any POSIX system);
* is killed by ``WorkerPool.__exit__`` when the ``with`` block ends in an exception
  (KeyboardInterrupt included) instead of being waited for.

Workers can send progress messages to the parent through ``report(...)``; ``WorkerPool.as_completed``
hands them to a callback while it waits for results.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Callable, Iterable, Iterator, Optional

_progress: Optional[Any] = None  # the worker's end of the progress queue (set by the initializer)


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # the watchdog below still ends the worker
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _init_worker(parent: int, progress, initializer: Optional[Callable], initargs: tuple) -> None:
    global _progress
    _die_with_parent(parent)
    import torch

    torch.set_num_threads(1)
    _progress = progress
    if initializer is not None:
        initializer(*initargs)


def report(*message: Any) -> None:
    """Send a progress message from a worker to the parent (no-op outside a pool with progress)."""
    if _progress is not None:
        _progress.put(message)


class WorkerPool:
    """``with WorkerPool(jobs) as pool: pool.submit(fn, *args) ...``: spawned workers that die with the parent.

    ``progress=True`` gives the workers a queue for ``report(...)``. ``initializer(*initargs)`` runs
    in every worker after it has set one torch thread.
    """

    def __init__(self, jobs: int, initializer: Optional[Callable] = None, initargs: tuple = (), progress: bool = False):
        ctx = multiprocessing.get_context("spawn")
        self._before = set(multiprocessing.active_children())  # processes that are not this pool's workers
        self.progress = ctx.Queue() if progress else None
        self.executor = ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(os.getpid(), self.progress, initializer, initargs),
        )

    def submit(self, fn: Callable, *args: Any, **kwargs: Any) -> Future:
        return self.executor.submit(fn, *args, **kwargs)

    def drain(self, on_message: Callable[..., None]) -> None:
        """Hand every queued progress message to ``on_message(*message)``."""
        if self.progress is None:
            return
        while True:
            try:
                message = self.progress.get_nowait()
            except queue_module.Empty:
                return
            on_message(*message)

    def as_completed(
        self, futures: Iterable[Future], on_message: Optional[Callable[..., None]] = None, poll: float = 0.2
    ) -> Iterator[Future]:
        """Yield futures as they finish, passing progress messages to ``on_message`` meanwhile."""
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=poll, return_when=FIRST_COMPLETED)
            if on_message is not None:
                self.drain(on_message)
            yield from done

    def kill(self) -> None:
        """Stop every worker now (running jobs are lost) and release the pool."""
        processes = [p for p in multiprocessing.active_children() if p not in self._before]
        self.executor.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            if p.is_alive():
                p.kill()
        for p in processes:
            p.join(timeout=5)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.executor.shutdown(wait=True)
        else:
            self.kill()
        if self.progress is not None:
            self.progress.close()
            self.progress.join_thread()


__all__ = ["WorkerPool", "report"]
