"""What a piece of work costs: wall time and FLOPs, decompositions included.

``torch.utils.flop_counter`` counts matmuls and convolutions but nothing for the dense
decompositions (SVD, eigh, QR, Cholesky, solve, inverse, least squares). The density router's
closed-form fit is mostly SVD, so without these its cost would read as zero. Each formula below
is the textbook count for a dense double-loop implementation (Golub & Van Loan, *Matrix
Computations*, 4th ed., sections 5.2, 4.2, 8.3 and figure 8.6.1), one FLOP per multiply or add;
LAPACK's blocked codes do the same arithmetic. They are analytic counts, not measurements.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

aten = torch.ops.aten


def _formula(op):
    """Register a count for ``op`` unless torch (a newer release) already counts it."""
    if op in flop_registry:
        return lambda f: f
    return register_flop_formula(op)


def _batch(shape) -> int:
    n = 1
    for s in shape[:-2]:
        n *= s
    return n


def svd_flops(shape, compute_uv: bool = True) -> int:
    """Thin SVD of an m x n matrix, p = min(m, n), q = max(m, n): R-SVD (GVL fig. 8.6.1)."""
    m, n = shape[-2], shape[-1]
    p, q = min(m, n), max(m, n)
    per = 6 * q * p * p + 20 * p**3 if compute_uv else 4 * q * p * p - 4 * p**3 // 3
    return _batch(shape) * per


def eigh_flops(shape, eigenvectors: bool = True) -> int:
    """Symmetric QR algorithm: about 9 n^3 with eigenvectors, 4/3 n^3 without (GVL 8.3)."""
    n = shape[-1]
    return _batch(shape) * (9 * n**3 if eigenvectors else 4 * n**3 // 3)


def qr_flops(shape) -> int:
    """Householder QR of m x n (m >= n): 2 m n^2 - 2/3 n^3 (GVL 5.2)."""
    m, n = shape[-2], shape[-1]
    p = min(m, n)
    return _batch(shape) * (2 * max(m, n) * p * p - 2 * p**3 // 3)


def cholesky_flops(shape) -> int:
    n = shape[-1]
    return _batch(shape) * (n**3 // 3)


def solve_flops(a_shape, b_shape) -> int:
    """LU (2/3 n^3) plus two triangular solves per right-hand side (2 n^2 each)."""
    n = a_shape[-1]
    k = b_shape[-1] if len(b_shape) == len(a_shape) else 1
    return _batch(a_shape) * (2 * n**3 // 3 + 2 * n * n * k)


@_formula(aten._linalg_svd)
def _svd_formula(a_shape, full_matrices=True, compute_uv=True, *args, out_shape=None, **kwargs) -> int:
    return svd_flops(a_shape, compute_uv)


@_formula(aten._linalg_eigh)
def _eigh_formula(a_shape, uplo="L", compute_v=True, *args, out_shape=None, **kwargs) -> int:
    return eigh_flops(a_shape, compute_v)


@_formula(aten.linalg_qr)
def _qr_formula(a_shape, *args, out_shape=None, **kwargs) -> int:
    return qr_flops(a_shape)


@_formula(aten.linalg_cholesky_ex)
def _cholesky_formula(a_shape, *args, out_shape=None, **kwargs) -> int:
    return cholesky_flops(a_shape)


@_formula(aten._linalg_solve_ex)
def _solve_formula(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return solve_flops(a_shape, b_shape)


@_formula(aten.linalg_inv_ex)
def _inv_formula(a_shape, *args, out_shape=None, **kwargs) -> int:
    return _batch(a_shape) * 2 * a_shape[-1] ** 3


@_formula(aten.linalg_lstsq)
def _lstsq_formula(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    # QR of A, then Q^T b and a triangular solve per right-hand side.
    m, n = a_shape[-2], a_shape[-1]
    k = b_shape[-1] if len(b_shape) == len(a_shape) else 1
    return qr_flops(a_shape) + _batch(a_shape) * (4 * m * n * k + n * n * k)


@dataclass
class Cost:
    wall_time_s: float = 0.0
    flops: int = 0


@contextmanager
def measure(device: torch.device | None = None, count_flops: bool = True) -> Iterator[Cost]:
    """Time (and, if asked, count the FLOPs of) the block; the result fills in when it exits."""
    cost = Cost()
    counter = FlopCounterMode(display=False) if count_flops else None
    start = time.perf_counter()
    if counter is not None:
        counter.__enter__()
    try:
        yield cost
    finally:
        if counter is not None:
            counter.__exit__(None, None, None)
            cost.flops = int(counter.get_total_flops())
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        cost.wall_time_s = time.perf_counter() - start
