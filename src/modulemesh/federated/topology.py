"""Who talks to whom: peer graphs as sorted neighbour lists (undirected, no self loops).

``ring(n)``, ``full(n)``, ``star(n, hub=0)``, ``random_regular(n, k, seed)`` and the dispatcher
``build(kind, n, degree, seed)``. ``random_regular`` uses the pairing (configuration) model with
rejection of self loops and double edges, so every peer has exactly k neighbours.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import numpy as np

from ..errors import ConfigError

KINDS = ("ring", "full", "star", "random")

Graph = list[list[int]]


def _n(n: int) -> None:
    if n < 1:
        raise ConfigError(f"a topology needs at least one peer, got {n}")


def ring(n: int) -> Graph:
    _n(n)
    if n == 1:
        return [[]]
    return [sorted({(i - 1) % n, (i + 1) % n}) for i in range(n)]


def full(n: int) -> Graph:
    _n(n)
    return [[j for j in range(n) if j != i] for i in range(n)]


def star(n: int, hub: int = 0) -> Graph:
    _n(n)
    if not 0 <= hub < n:
        raise ConfigError(f"star hub {hub} is not a peer index in [0, {n})")
    return [[j for j in range(n) if j != hub] if i == hub else [hub] for i in range(n)]


def random_regular(n: int, k: int, seed: int = 0, max_tries: int = 1000) -> Graph:
    _n(n)
    if not 0 <= k < n or (n * k) % 2:
        raise ConfigError(f"a random {k}-regular graph on {n} peers needs 0 <= k < n and n*k even")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        stubs = rng.permutation(np.repeat(np.arange(n), k)).reshape(-1, 2)
        if (stubs[:, 0] == stubs[:, 1]).any():
            continue
        edges = {tuple(sorted(map(int, e))) for e in stubs}
        if len(edges) != len(stubs):
            continue
        nbrs: Graph = [[] for _ in range(n)]
        for a, b in edges:
            nbrs[a].append(b)
            nbrs[b].append(a)
        return [sorted(x) for x in nbrs]
    raise ConfigError(
        f"could not draw a simple {k}-regular graph on {n} peers in {max_tries} tries; change degree or seed"
    )


def build(kind: str, n: int, degree: int = 4, seed: int = 0) -> Graph:
    if kind == "ring":
        return ring(n)
    if kind == "full":
        return full(n)
    if kind == "star":
        return star(n)
    if kind == "random":
        return random_regular(n, min(degree, n - 1), seed)
    raise ConfigError(f"unknown topology {kind!r}; choose one of {', '.join(KINDS)}")


def is_connected(graph: Sequence[Sequence[int]]) -> bool:
    if not graph:
        return True
    seen = {0}
    todo = deque([0])
    while todo:
        for j in graph[todo.popleft()]:
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return len(seen) == len(graph)


def num_edges(graph: Sequence[Sequence[int]]) -> int:
    return sum(len(x) for x in graph) // 2
