"""Split a labelled dataset over K clients: IID, Dirichlet label skew, or by task/domain.

Every function takes a ``seed`` and returns a list of K sorted ``int64`` index arrays that are
pairwise disjoint; ``iid`` and ``dirichlet`` together cover every index exactly once.

``dirichlet(labels, K, alpha)`` follows the usual recipe for label skew: for each class c, draw
proportions p_c ~ Dir(alpha * 1_K) and hand the examples of class c to the clients in those
proportions. Small alpha (0.1) gives each client a few dominant classes; large alpha (100)
approaches IID. That per-class convention cannot give every one of many clients an example at small
alpha (1,000 clients, alpha 0.1: most draws leave someone empty). ``dirichlet_clientwise`` is the
other convention (FedLab's and FedDyn's client-wise split): client sizes are fixed first
(``balanced``, or ``lognormal`` around N/K), then each client's label mix q_k ~ Dir(alpha * 1_C) is
drawn and its examples are taken class by class in those proportions from what is left; a class
that runs out is dropped from the remaining clients' mixes. ``label_skew`` measures the result
(mean total-variation distance between each client's label distribution and the global one: 0 for
IID, up to 1 - 1/C for one class each).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ConfigError, DataError

KINDS = ("iid", "dirichlet", "dirichlet_clientwise", "task")
SIZES = ("balanced", "lognormal")
LOGNORMAL_SIGMA = 0.3  # spread of client sizes in the lognormal convention (FedLab's default unbalance_sgm is 0..0.3)


def _check(n: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ConfigError(f"number of clients must be >= 1, got {num_clients}")
    if n < num_clients:
        raise DataError(f"cannot split {n} examples over {num_clients} clients; use fewer clients or more data")


def iid(n: int, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle ``range(n)`` and cut it into K nearly equal parts."""
    _check(n, num_clients)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_clients)]


def dirichlet(
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split; redraws (up to ``max_tries``) until every client has ``min_size`` examples."""
    y = np.asarray(labels).astype(np.int64).ravel()
    _check(len(y), num_clients)
    if not alpha > 0:
        raise ConfigError(f"Dirichlet alpha must be > 0 (0.1 = strong label skew, 100 = almost IID), got {alpha}")
    if min_size * num_clients > len(y):
        raise DataError(f"federation.min_client_size {min_size} x {num_clients} clients exceeds the {len(y)} examples")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise DataError(
        f"Dirichlet(alpha={alpha}) per-class split left a client with fewer than {min_size} examples after {max_tries} "
        "draws; raise alpha, lower federation.min_client_size, use fewer clients, or set "
        "federation.partition=dirichlet_clientwise (client sizes fixed first)"
    )


def client_sizes(n: int, num_clients: int, sizes: str = "balanced", seed: int = 0, min_size: int = 1) -> np.ndarray:
    """Examples per client summing to n: equal (``balanced``) or lognormal around n/K, each >= ``min_size``."""
    _check(n, num_clients)
    if min_size * num_clients > n:
        raise DataError(f"federation.min_client_size {min_size} x {num_clients} clients exceeds the {n} examples")
    if sizes == "balanced":
        return np.array([len(c) for c in np.array_split(np.arange(n), num_clients)], dtype=np.int64)
    if sizes != "lognormal":
        raise ConfigError(f"unknown client sizes {sizes!r}; choose one of {', '.join(SIZES)}")
    w = np.random.default_rng([seed, 11]).lognormal(0.0, LOGNORMAL_SIGMA, num_clients)
    spare = n - min_size * num_clients
    out = min_size + np.floor(w / w.sum() * spare).astype(np.int64)
    out[np.argsort(-w)[: n - out.sum()]] += 1  # hand out the rounding remainder to the largest clients
    return out


def dirichlet_clientwise(
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int = 0,
    sizes: str = "balanced",
    min_size: int = 1,
) -> list[np.ndarray]:
    """Client-wise label skew: sizes first, then each client's label mix q_k ~ Dir(alpha) over the classes."""
    y = np.asarray(labels).astype(np.int64).ravel()
    if not alpha > 0:
        raise ConfigError(f"Dirichlet alpha must be > 0 (0.1 = strong label skew, 100 = almost IID), got {alpha}")
    n_k = client_sizes(len(y), num_clients, sizes, seed, min_size)
    rng = np.random.default_rng([seed, 13])
    classes = np.unique(y)
    pools = [list(rng.permutation(np.flatnonzero(y == c))) for c in classes]
    left = np.array([len(p) for p in pools], dtype=np.int64)
    mixes = rng.dirichlet(np.full(len(classes), float(alpha)), num_clients)
    out: list[np.ndarray] = []
    for k in range(num_clients):
        want = np.zeros(len(classes), dtype=np.int64)
        need = int(n_k[k])
        while need > 0:  # draw in the client's proportions among the classes that still have examples
            q = mixes[k] * (left - want > 0)
            if q.sum() <= 0:  # the client's classes ran out: fall back to what remains, in proportion
                q = (left - want).astype(np.float64)
            got = np.minimum(rng.multinomial(need, q / q.sum()), left - want)
            want += got
            need -= int(got.sum())
        taken = []
        for c, m in enumerate(want):
            taken += pools[c][left[c] - m : left[c]]
        left -= want
        out.append(np.sort(np.asarray(taken, dtype=np.int64)))
    return out


def by_group(groups: Sequence[int] | np.ndarray, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Task/domain split: each group (task id, domain id) goes whole to one client.

    Groups are shuffled (seeded) and dealt round-robin, so with G groups and K clients each client
    gets G // K or G // K + 1 groups. Needs at least as many groups as clients.
    """
    g = np.asarray(groups).astype(np.int64).ravel()
    _check(len(g), num_clients)
    uniq = np.random.default_rng(seed).permutation(np.unique(g))
    if len(uniq) < num_clients:
        raise ConfigError(
            f"a task/domain split needs at least one group per client: {len(uniq)} groups for {num_clients} clients"
        )
    owner = {int(u): i % num_clients for i, u in enumerate(uniq)}
    who = np.array([owner[int(v)] for v in g])
    return [np.flatnonzero(who == k).astype(np.int64) for k in range(num_clients)]


def by_task(
    labels: Sequence[int] | np.ndarray, num_clients: int, n_tasks: int | None = None, seed: int = 0
) -> list[np.ndarray]:
    """Split classes into ``n_tasks`` contiguous tasks (default: one per client) and give tasks to clients."""
    y = np.asarray(labels).astype(np.int64).ravel()
    classes = np.unique(y)
    n_tasks = n_tasks or num_clients
    if n_tasks > len(classes):
        raise ConfigError(f"{n_tasks} tasks need at least {n_tasks} classes; the data has {len(classes)}")
    task_of_class = {int(c): t for t, chunk in enumerate(np.array_split(classes, n_tasks)) for c in chunk}
    return by_group(np.array([task_of_class[int(v)] for v in y]), num_clients, seed)


def partition(
    kind: str,
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    alpha: float = 1.0,
    seed: int = 0,
    min_size: int = 1,
    sizes: str = "balanced",
) -> list[np.ndarray]:
    """Dispatch on ``kind`` in ``iid | dirichlet | dirichlet_clientwise | task`` (``sizes``: clientwise only)."""
    y = np.asarray(labels)
    if kind == "iid":
        return iid(len(y), num_clients, seed)
    if kind == "dirichlet":
        return dirichlet(y, num_clients, alpha, seed, min_size=min_size)
    if kind == "dirichlet_clientwise":
        return dirichlet_clientwise(y, num_clients, alpha, seed, sizes=sizes, min_size=min_size)
    if kind == "task":
        return by_task(y, num_clients, seed=seed)
    raise ConfigError(f"unknown partition {kind!r}; choose one of {', '.join(KINDS)}")


def label_histogram(parts: Sequence[np.ndarray], labels: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    """(K, C) counts of each class on each client."""
    y = np.asarray(labels).astype(np.int64)
    return np.stack([np.bincount(y[p], minlength=num_classes) for p in parts]).astype(np.int64)


def label_skew(parts: Sequence[np.ndarray], labels: Sequence[int] | np.ndarray, num_classes: int) -> float:
    """Mean total-variation distance between clients' label distributions and the pooled one."""
    h = label_histogram(parts, labels, num_classes).astype(np.float64)
    glob = h.sum(0) / h.sum()
    local = h / np.maximum(h.sum(1, keepdims=True), 1)
    return float(0.5 * np.abs(local - glob).sum(1).mean())
