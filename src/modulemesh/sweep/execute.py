"""Running a sweep's runs: in this process or in worker processes that die with it (``training.pool``).

A run whose directory holds ``metrics.json`` for the same resolved config is read back instead of
rerun, and a run interrupted mid-way resumes from its checkpoint, so a sweep is continued by
running it again with the same output directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Hashable, Optional, Sequence

from .plan import finished_metrics

Run = tuple[Hashable, Any, Path]  # (key, ExperimentConfig, output directory)


def run_in_worker(cfg_dict: dict, out: str) -> dict:
    """One run in a worker process (the config travels as a plain dict)."""
    from ..config import ExperimentConfig
    from ..runner import run_experiment

    return run_experiment(ExperimentConfig.model_validate(cfg_dict), out)


def split_finished(runs: Sequence[Run]) -> tuple[dict[Hashable, dict], list[Run]]:
    """(metrics of the runs already finished, the runs still to do)."""
    done, todo = {}, []
    for key, cfg, path in runs:
        m = finished_metrics(path, cfg)
        if m is not None:
            done[key] = m
        else:
            todo.append((key, cfg, path))
    return done, todo


def execute(
    todo: Sequence[Run],
    jobs: int,
    on_result: Callable[[Hashable, dict], None],
    on_error: Optional[Callable[[Hashable, Exception], None]] = None,
    callbacks_for: Optional[Callable[[Hashable], Any]] = None,
    threads: Optional[int] = None,
) -> None:
    """Train every run of ``todo``; ``on_result(key, metrics)`` as each finishes.

    ``jobs > 1`` trains them in that many worker processes (one torch thread each). ``on_error``
    turns a failed run into a reported result instead of stopping the sweep; ``callbacks_for(key)``
    gives the ``runner.Callbacks`` (progress) of an in-process run; ``threads`` sets torch's thread
    count for in-process runs.
    """
    from ..config import to_dict
    from ..runner import run_experiment

    if jobs == 1 or len(todo) <= 1:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        for key, cfg, path in todo:
            try:
                m = run_experiment(cfg, path, callbacks_for(key)) if callbacks_for else run_experiment(cfg, path)
            except Exception as e:
                if on_error is None:
                    raise
                on_error(key, e)
                continue
            on_result(key, m)
        return
    from ..training.pool import WorkerPool

    with WorkerPool(jobs) as pool:
        futures = {pool.submit(run_in_worker, to_dict(cfg), str(path)): key for key, cfg, path in todo}
        for f in pool.as_completed(futures):
            try:
                m = f.result()
            except Exception as e:
                if on_error is None:
                    raise
                on_error(futures[f], e)
                continue
            on_result(futures[f], m)
