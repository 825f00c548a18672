"""The data of a simulated federation: one training pool split over clients, a public proxy set, a test set.

Everything stays a tensor on the run's device; a client's data is its index set into the pool
(``parts``). ``BatchSampler`` draws every client's minibatch at once (each from its own indices),
``local_steps`` says how many steps a client takes per round, and ``round_generator`` gives the
seeded random stream of one round, so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np
import torch

from ...data.scenarios import as_float  # noqa: F401  (re-exported: the one uint8 -> float conversion)
from ...errors import DataError
from .. import partition as part_mod


@dataclass
class FedData:
    """Training pool split over clients, plus a public proxy set and a test set (all tensors)."""

    x: torch.Tensor
    y: torch.Tensor
    parts: list[torch.Tensor]
    x_proxy: torch.Tensor
    y_proxy: torch.Tensor  # for diagnostics only; never used for training
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]

    @property
    def counts(self) -> list[int]:
        return [len(p) for p in self.parts]

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(self, device: str | torch.device) -> "FedData":
        fields = ("x", "y", "x_proxy", "y_proxy", "x_test", "y_test")
        return replace(self, **{f: getattr(self, f).to(device) for f in fields})

    def client_view(self, pid: int) -> "FedData":
        """What client ``pid`` holds: its own examples only (re-indexed), the public proxy and test sets."""
        idx = self.parts[pid]
        return replace(self, x=self.x[idx], y=self.y[idx], parts=[torch.arange(len(idx))])

    def proxy_nbytes(self) -> int:
        """Bytes of the public proxy images as stored (what shipping them to one client costs)."""
        return self.x_proxy.numel() * self.x_proxy.element_size()


def _features(x) -> torch.Tensor:
    """uint8 images stay uint8 (as_float scales them per batch); other numbers become float32."""
    x = torch.as_tensor(x)
    return x if x.dtype == torch.uint8 else x.float()


def make_fed_data(
    x_train,
    y_train,
    x_test,
    y_test,
    num_clients: int,
    partition: str = "dirichlet",
    alpha: float = 1.0,
    proxy_size: int = 0,
    seed: int = 0,
    num_classes: Optional[int] = None,
    min_size: int = 1,
    max_train: Optional[int] = None,
    max_test: Optional[int] = None,
    device: str | torch.device = "cpu",
    sizes: str = "balanced",
) -> FedData:
    """Hold out ``proxy_size`` random training examples as the unlabelled public set; split the rest."""
    x_train, y_train = _features(x_train), torch.as_tensor(y_train).long()
    x_test, y_test = _features(x_test), torch.as_tensor(y_test).long()
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise DataError("features and labels differ in length")
    rng = np.random.default_rng([seed, 7])
    if max_train is not None and max_train < len(x_train):
        keep = torch.as_tensor(np.sort(rng.permutation(len(x_train))[:max_train]))
        x_train, y_train = x_train[keep], y_train[keep]
    if max_test is not None and max_test < len(x_test):
        keep = torch.as_tensor(np.sort(rng.permutation(len(x_test))[:max_test]))
        x_test, y_test = x_test[keep], y_test[keep]
    if proxy_size >= len(x_train):
        raise DataError(f"proxy_size {proxy_size} leaves no training data out of {len(x_train)} examples; lower it")
    perm = torch.as_tensor(rng.permutation(len(x_train)))
    proxy_idx, pool_idx = perm[:proxy_size].sort().values, perm[proxy_size:].sort().values
    x_pool, y_pool = x_train[pool_idx], y_train[pool_idx]
    parts = part_mod.partition(
        partition, y_pool.numpy(), num_clients, alpha=alpha, seed=seed, min_size=min_size, sizes=sizes
    )
    c = int(num_classes or int(max(y_train.max(), y_test.max())) + 1)
    dev = torch.device(device)
    return FedData(
        x_pool.to(dev),
        y_pool.to(dev),
        [torch.as_tensor(p) for p in parts],
        x_train[proxy_idx].to(dev),
        y_train[proxy_idx].to(dev),
        x_test.to(dev),
        y_test.to(dev),
        c,
        tuple(int(s) for s in x_train.shape[1:]),
    )


def fed_data_from_experiment(exp, device: str | torch.device = "cpu") -> FedData:
    """Load ``exp.data`` with ``modulemesh.data.datasets.load_dataset`` and split it per ``exp.federation``."""
    from ...data.datasets import load_dataset

    ds = load_dataset(exp.data.name, exp.data.root, **exp.data.options)
    fc = exp.federation
    return make_fed_data(
        ds.x_train,
        ds.y_train,
        ds.x_test,
        ds.y_test,
        fc.clients,
        fc.partition,
        fc.alpha,
        fc.distill.proxy_size,
        seed=exp.seed,
        num_classes=ds.num_classes,
        min_size=fc.min_client_size,
        max_train=fc.max_train,
        max_test=fc.max_test,
        device=device,
        sizes=fc.client_sizes,
    )


class BatchSampler:
    """Draws, per client and step, B indices (with replacement) from that client's own index set."""

    def __init__(self, parts: Sequence[torch.Tensor], batch_size: int, gen: torch.Generator):
        self.flat = torch.cat(list(parts))
        sizes = torch.tensor([len(p) for p in parts])
        self.starts = torch.cumsum(sizes, 0) - sizes
        self.sizes, self.b, self.gen = sizes, batch_size, gen

    def __call__(self) -> torch.Tensor:
        # drawn on the CPU generator (same numbers on every device); indexing moves them to the data
        u = torch.rand(len(self.sizes), self.b, generator=self.gen)
        r = (u * self.sizes[:, None]).long().clamp_max(self.sizes[:, None] - 1) + self.starts[:, None]
        return self.flat[r]


def local_steps(counts: Sequence[int], epochs: float, batch_size: int) -> torch.Tensor:
    return torch.tensor([max(1, math.ceil(epochs * n / batch_size)) for n in counts])


def round_generator(seed: int, r: int, stream: int) -> torch.Generator:
    """CPU generator of one (seed, round, stream): resuming at round r draws the same numbers."""
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, r, stream]).integers(2**62)))
