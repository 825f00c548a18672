"""ReplayBuffer: a fixed-size memory of past examples, filled by reservoir sampling.

Reservoir sampling keeps every example seen so far in the buffer with equal probability
(capacity / seen), whatever the task order, which is what ER and DER assume. Extra per-example
tensors (e.g. DER's logits) ride along in ``extras``.

Images decoded from 8-bit pixels (``as_float``: k / 255) are kept as those 8-bit pixels: the same
values come back bit for bit, at a quarter of float32's bytes, so every replay method's memory is
counted on the same footing (a method offering raw uint8 rows and one offering decoded floats keep
the same bytes). Rows that are not exactly k / 255 switch the buffer to float32 storage.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch


class ReplayBuffer:
    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 0:
            raise ValueError("buffer capacity must be >= 0")
        self.capacity = int(capacity)
        self.seen = 0
        self.x: Optional[torch.Tensor] = None
        self.y: Optional[torch.Tensor] = None
        self.t: Optional[torch.Tensor] = None
        self.extras: dict[str, torch.Tensor] = {}
        self.seed = int(seed)

    def __len__(self) -> int:
        # Reservoir sampling fills slots 0..capacity-1 in order, so the filled part is a prefix.
        return min(self.seen, self.capacity)

    def add(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, **extras: torch.Tensor) -> None:
        """Offer a batch of examples; each lands in the buffer with reservoir probability."""
        n = int(y.shape[0])
        if self.capacity == 0 or n == 0:
            self.seen += n
            return
        # Randomness derived from (seed, examples seen) so a resumed run continues identically.
        rng = np.random.default_rng([self.seed, self.seen])
        positions = self.seen + np.arange(n)
        slots = np.where(positions < self.capacity, positions, rng.integers(0, positions + 1))
        accepted = np.flatnonzero(slots < self.capacity)
        # Several examples may draw the same slot; the last one offered wins, as in the sequential algorithm.
        slots_acc = slots[accepted]
        _, last = np.unique(slots_acc[::-1], return_index=True)
        keep = accepted[::-1][last]
        self._write(torch.as_tensor(slots[keep]), torch.as_tensor(keep), x, y, t, extras)
        self.seen += n

    @staticmethod
    def _as_pixels(x: torch.Tensor) -> Optional[torch.Tensor]:
        """``x`` as uint8 when it is exactly 8-bit pixels decoded by ``as_float`` (else None)."""
        if x.dtype == torch.uint8:
            return x
        if not x.numel():
            return x.to(torch.uint8)  # no rows: nothing says they are not pixels
        if x.dtype != torch.float32:
            return None
        k = (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)
        return k if torch.equal(k.float().div_(255.0), x) else None

    def _write(self, slots, rows, x, y, t, extras) -> None:
        pixels = self._as_pixels(x[rows.to(x.device)]) if (self.x is None or self.x.dtype == torch.uint8) else None
        if pixels is None and self.x is not None and self.x.dtype == torch.uint8:
            self.x = self.x.float().div_(255.0)  # a non-pixel row: keep everything as float from now on
        if self.x is None:
            dtype = torch.uint8 if pixels is not None else x.dtype
            self.x = torch.zeros((self.capacity, *x.shape[1:]), dtype=dtype, device=x.device)
            self.y = torch.full((self.capacity,), -1, dtype=torch.long, device=y.device)
            self.t = torch.full((self.capacity,), -1, dtype=torch.long, device=y.device)
        for name, v in extras.items():
            if name not in self.extras:
                self.extras[name] = torch.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype, device=v.device)
            self.extras[name][slots.to(v.device)] = v[rows.to(v.device)]
        dev = self.y.device
        values = pixels if (pixels is not None and self.x.dtype == torch.uint8) else x[rows.to(x.device)]
        if self.x.dtype != torch.uint8:
            values = values.float().div_(255.0) if values.dtype == torch.uint8 else values
        self.x[slots.to(self.x.device)] = values.to(self.x.device, self.x.dtype)
        self.y[slots.to(dev)] = y[rows.to(y.device)].to(dev)
        self.t[slots.to(dev)] = t[rows.to(t.device)].to(dev)

    def sample(
        self, n: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        size = len(self)
        idx = torch.randint(0, size, (min(n, size),), generator=generator)
        return self._take(idx)

    def _take(self, idx: torch.Tensor):
        return (
            self.x[idx.to(self.x.device)],
            self.y[idx.to(self.y.device)],
            self.t[idx.to(self.t.device)],
            {k: v[idx.to(v.device)] for k, v in self.extras.items()},
        )

    def all(self):
        return self._take(torch.arange(len(self)))

    def to(self, device: torch.device) -> "ReplayBuffer":
        if self.x is not None:
            self.x, self.y, self.t = self.x.to(device), self.y.to(device), self.t.to(device)
            self.extras = {k: v.to(device) for k, v in self.extras.items()}
        return self

    # -------------------------------------------------------- persistence (for resumable runs)
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.x is None:
            return {"seen": torch.tensor(self.seen)}
        state = {"seen": torch.tensor(self.seen), "x": self.x.cpu(), "y": self.y.cpu(), "t": self.t.cpu()}
        state.update({f"extra.{k}": v.cpu() for k, v in self.extras.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.seen = int(state["seen"])
        if "x" in state:
            self.x, self.y, self.t = state["x"], state["y"], state["t"]
            self.extras = {k[6:]: v for k, v in state.items() if k.startswith("extra.")}
