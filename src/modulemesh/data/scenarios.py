"""Scenarios: a dataset cut into a stream of tasks.

- class_incremental: classes split into T tasks; no task id at test time.
- task_incremental: the same splits; the task id is given at test time (predictions are restricted
  to the task's classes and an oracle router may use it).
- domain_incremental: every task has all classes; task t sees the inputs through its own
  transformation (a fixed pixel permutation, a rotation) or is one of the dataset's own groups
  (CORe50 sessions, DomainNet domains) with ``transform: groups``. By default each group is a task
  tested on its own test rows; with ``test_groups`` (CORe50's NI protocol: sessions 3, 7, 10) those
  groups are instead one test set shared by every task, and each other group is a training task.

Tensors stay on the CPU in their stored dtype (uint8 images stay uint8); the trainer moves a task
to the device once and converts batches with ``as_float``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError

KINDS = ("class_incremental", "task_incremental", "domain_incremental")


@dataclass
class Task:
    id: int
    classes: list[int]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str = ""

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])


@dataclass
class Scenario:
    kind: str
    tasks: list[Task]
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: list[str] = field(default_factory=list)
    dataset: str = ""

    @property
    def task_ids_at_test(self) -> bool:
        return self.kind == "task_incremental"

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __getitem__(self, i: int) -> Task:
        return self.tasks[i]


def as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; float data passes through."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def split_classes(order: Sequence[int], n_tasks: int) -> list[list[int]]:
    """Contiguous chunks of the class order, sizes differing by at most one (earlier tasks larger)."""
    if n_tasks > len(order):
        raise ConfigError(
            f"scenario.n_tasks={n_tasks} but the dataset has only {len(order)} classes; use at most {len(order)} tasks"
        )
    base, extra = divmod(len(order), n_tasks)
    out, start = [], 0
    for t in range(n_tasks):
        size = base + (1 if t < extra else 0)
        out.append([int(c) for c in order[start : start + size]])
        start += size
    return out


def _subsample(idx: np.ndarray, limit: Optional[int], rng: np.random.Generator) -> np.ndarray:
    if limit is None or len(idx) <= limit:
        return idx
    return np.sort(rng.choice(idx, size=limit, replace=False))


def _train_val(idx: np.ndarray, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    idx = rng.permutation(idx)
    n_val = int(round(len(idx) * val_fraction))
    return np.sort(idx[n_val:]), np.sort(idx[:n_val])


def build_scenario(
    dataset,
    kind: str = "class_incremental",
    n_tasks: int = 5,
    class_order: Optional[Sequence[int]] = None,
    shuffle_classes: bool = False,
    transform: str = "permutation",
    val_fraction: float = 0.1,
    seed: int = 0,
    max_train_per_task: Optional[int] = None,
    max_test_per_task: Optional[int] = None,
    test_groups: Optional[Sequence[int]] = None,
) -> Scenario:
    """Cut an ``ArrayDataset`` into tasks. Deterministic for a given seed.

    ``test_groups`` (domain-IL with ``transform='groups'`` only): the test-split rows of these groups
    form one test set shared by every task (the same tensors, subsampled once), and every other
    group of the training split is a task, in sorted group order. The dataset must hold the test
    groups out whole (no training rows); test-split rows of training groups are not used. With
    CORe50's own session split (loader ``core50``: test split = sessions 3, 7, 10, groups = session
    numbers) and ``test_groups=[3, 7, 10]`` this is the NI protocol of Lomonaco & Maltoni (2017):
    8 tasks, each row of the accuracy matrix the accuracy on one test set, repeated in every column.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown scenario kind {kind!r}; choose one of {', '.join(KINDS)}")
    if test_groups is not None and (kind != "domain_incremental" or transform != "groups"):
        raise ConfigError(
            "scenario.test_groups needs scenario.kind=domain_incremental and scenario.transform=groups "
            f"(got kind={kind}, transform={transform})"
        )
    if len(dataset.y_train) == 0 or len(dataset.y_test) == 0:
        raise DataError(f"dataset {dataset.name!r} has an empty train or test split; a scenario needs both")
    rng = np.random.default_rng(seed)
    k = dataset.num_classes
    x_train, y_train = torch.as_tensor(dataset.x_train), torch.as_tensor(dataset.y_train).long()
    x_test, y_test = torch.as_tensor(dataset.x_test), torch.as_tensor(dataset.y_test).long()
    ytr, yte = np.asarray(dataset.y_train), np.asarray(dataset.y_test)

    def make(tid, classes, tr_idx, te_idx, xform=None, name="", shared_test=None):
        tr_idx = _subsample(tr_idx, max_train_per_task, rng)
        if shared_test is None:
            te_idx = _subsample(te_idx, max_test_per_task, rng)
        tr, va = _train_val(tr_idx, val_fraction, rng)
        if len(tr) == 0 or (shared_test is None and len(te_idx) == 0):
            raise DataError(
                f"task {tid} of {dataset.name!r} (classes {classes}) has no training or test examples; use fewer tasks"
            )
        xt = (lambda a: xform(a)) if xform else (lambda a: a)
        x_te, y_te = shared_test if shared_test is not None else (xt(x_test[te_idx]), y_test[te_idx])
        return Task(tid, classes, xt(x_train[tr]), y_train[tr], xt(x_train[va]), y_train[va], x_te, y_te, name)

    tasks: list[Task] = []
    if kind in ("class_incremental", "task_incremental"):
        if class_order is not None:
            if sorted(class_order) != list(range(k)):
                raise ConfigError(
                    f"scenario.class_order must be a permutation of 0..{k - 1} (the dataset's {k} classes)"
                )
            order = list(class_order)
        else:
            order = list(rng.permutation(k)) if shuffle_classes else list(range(k))
        for t, classes in enumerate(split_classes(order, n_tasks)):
            tasks.append(
                make(
                    t,
                    classes,
                    np.flatnonzero(np.isin(ytr, classes)),
                    np.flatnonzero(np.isin(yte, classes)),
                    name=f"task{t}:classes{'-'.join(map(str, classes))}",
                )
            )
    else:
        classes = list(range(k))
        if transform == "groups":
            gtr, gte = getattr(dataset, "train_groups", None), getattr(dataset, "test_groups", None)
            if gtr is None or gte is None:
                raise ConfigError(
                    f"scenario.transform=groups needs a dataset with domains/sessions; {dataset.name!r} has none"
                )
            gtr, gte = np.asarray(gtr), np.asarray(gte)
            if test_groups is None:
                groups = sorted(set(gtr.tolist()))
                if n_tasks != len(groups):
                    raise ConfigError(
                        f"dataset {dataset.name!r} has {len(groups)} groups; set scenario.n_tasks={len(groups)}"
                    )
                for t, g in enumerate(groups):
                    tasks.append(
                        make(t, classes, np.flatnonzero(gtr == g), np.flatnonzero(gte == g), name=f"domain{g}")
                    )
            else:
                held = sorted({int(g) for g in test_groups})
                mixed = sorted(set(held) & set(gtr.tolist()))
                if mixed:
                    raise ConfigError(
                        f"scenario.test_groups {held}: group(s) {mixed} also have training rows in {dataset.name!r}; "
                        "test groups must be held out whole by the dataset's split (CORe50: data.name=core50, "
                        "whose test split is data.options.test_sessions, default 3, 7, 10)"
                    )
                missing = [g for g in held if not (gte == g).any()]
                if missing:
                    raise ConfigError(
                        f"scenario.test_groups {held}: group(s) {missing} have no test rows in {dataset.name!r} "
                        f"(test-split groups: {sorted(set(gte.tolist()))})"
                    )
                groups = sorted(set(gtr.tolist()) - set(held))
                if n_tasks != len(groups):
                    raise ConfigError(
                        f"dataset {dataset.name!r} has {len(groups)} training groups besides the test groups "
                        f"{held}; set scenario.n_tasks={len(groups)}"
                    )
                te_idx = _subsample(np.flatnonzero(np.isin(gte, held)), max_test_per_task, rng)
                shared = (x_test[te_idx], y_test[te_idx])  # one copy, referenced by every task
                for t, g in enumerate(groups):
                    tasks.append(
                        make(t, classes, np.flatnonzero(gtr == g), None, name=f"domain{g}", shared_test=shared)
                    )
        else:
            all_tr, all_te = np.arange(len(ytr)), np.arange(len(yte))
            for t in range(n_tasks):
                if transform == "permutation":
                    perm = torch.as_tensor(rng.permutation(int(np.prod(dataset.input_shape))))
                    xform, name = (lambda a, p=perm: a.flatten(1)[:, p].reshape(a.shape)), f"permutation{t}"
                else:
                    angle = 180.0 * t / n_tasks
                    xform, name = (lambda a, ang=angle: rotate(a, ang)), f"rotation{angle:.0f}"
                tasks.append(make(t, classes, all_tr, all_te, xform, name))
    return Scenario(kind, tasks, k, tuple(dataset.input_shape), list(dataset.class_names), dataset.name)


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate images (N,C,H,W) (or flat square images) about their centre, keeping the dtype."""
    if degrees % 360 == 0 or x.shape[0] == 0:
        return x.clone()
    shape = x.shape
    if x.dim() == 2:
        side = math.isqrt(shape[1])
        x = x.view(shape[0], 1, side, side)
    theta = math.radians(degrees)
    mat = torch.tensor([[math.cos(theta), -math.sin(theta), 0.0], [math.sin(theta), math.cos(theta), 0.0]])
    out = []
    for chunk in x.split(4096):
        f = chunk.float()
        grid = F.affine_grid(mat.expand(f.shape[0], 2, 3), list(f.shape), align_corners=False)
        out.append(F.grid_sample(f, grid, align_corners=False))
    r = torch.cat(out)
    if x.dtype == torch.uint8:
        r = r.round().clamp_(0, 255).to(torch.uint8)
    return r.reshape(shape)
