"""Diagonal Fisher information of a trained model and importance selection.

``fisher_diagonal`` estimates, for every parameter theta_j,

    F_j = E_x [ (d log p(y | x; theta) / d theta_j)^2 ]

from per-sample gradients (``torch.func``: ``functional_call`` + ``vmap`` + ``grad``), computed in
batches and averaged over the data. Two label choices:

* ``kind="empirical"``: y is the true label of x (the seed's F_j = E[(dL(T(x))/dtheta_j)^2]);
* ``kind="true"``: y is sampled from the model's own prediction p(. | x), which makes F the
  expected Fisher of the model's predictive distribution (one sample per input).

``weighted=True`` multiplies each example's squared gradient by p(y_i | x_i): the observed label's
term of the true Fisher's expectation over labels, the estimate online EWC uses (as Mammoth does,
so its lambda values carry over). ``linear_fast_path=True`` computes the same numbers without
materializing per-sample gradients when every parameter sits in an ``nn.Linear`` fed (N, features)
inputs (about 30x faster than vmap on the 784-100-100-10 MLP); other nets fall back to vmap.

The model is evaluated in eval mode (BatchNorm uses its running statistics, dropout is off), so
each sample's gradient depends on that sample only. Importance selection keeps parameters with
F_j > tau (``select_threshold``) or the top-q fraction by F (``select_top_fraction``).
"""

from __future__ import annotations

from typing import Literal, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data.scenarios import as_float
from ..errors import DataError, ModuleMeshError, TrainingError

FisherKind = Literal["empirical", "true"]
MAX_GRAD_FLOATS = 2.5e8


def _check_data(x: torch.Tensor, y: Optional[torch.Tensor], what: str = "data") -> None:
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{what}: inputs must be a torch.Tensor, got {type(x).__name__}; convert with torch.as_tensor")
    if x.shape[0] == 0:
        raise DataError(f"{what} is empty; pass at least one example")
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise DataError(f"{what}: labels must be a 1-D tensor with one label per input ({x.shape[0]}), got {shape}")


def fisher_diagonal(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, None],
    kind: FisherKind = "empirical",
    batch_size: int = 256,
    max_samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str | None = None,
    weighted: bool = False,
    linear_fast_path: bool = False,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of ``model`` on ``data = (x, y)``; returns ``{param_name: tensor}`` (CPU, float32).

    ``y`` may be ``None`` for ``kind="true"`` (labels are sampled from the model). ``max_samples``
    uses only the first N inputs. ``generator`` makes the sampled labels of ``kind="true"``
    reproducible. ``batch_size`` is lowered for big models so the per-sample gradients of one batch
    stay under about 1 GB. Parameters with ``requires_grad=False`` are left out of the result.
    ``weighted`` and ``linear_fast_path``: see the module doc (the fast path needs ``kind="empirical"``).
    """
    from torch.func import functional_call, grad, vmap

    if kind not in ("empirical", "true"):
        raise ModuleMeshError(
            f"unknown Fisher kind {kind!r}; use 'empirical' (true labels) or 'true' (labels sampled from the model)"
        )
    if batch_size < 1:
        raise ModuleMeshError(f"batch_size must be >= 1, got {batch_size}")
    x, y = data
    if kind == "empirical" and y is None:
        raise DataError("the empirical Fisher needs labels: pass data=(x, y), or use kind='true'")
    _check_data(x, y)
    if max_samples is not None:
        x = x[:max_samples]
        y = y[:max_samples] if y is not None else None
    if device is None:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            raise ModuleMeshError("model has no parameters; there is no Fisher information to compute") from None
    device = torch.device(device)

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    if not params:
        raise ModuleMeshError("model has no trainable parameters (all requires_grad=False); unfreeze it first")
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    # Per-sample gradients take batch_size x num_parameters floats; keep that under ~1 GB.
    batch_size = max(1, min(batch_size, int(MAX_GRAD_FLOATS // sum(p.numel() for p in params.values()))))

    def sample_loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor):
        logits = functional_call(model, (p, b), (xi.unsqueeze(0),))
        loss = -torch.log_softmax(logits, dim=-1)[0].gather(0, yi.reshape(1)).squeeze(0)
        return loss, (-loss).detach().exp()

    per_sample_grads = vmap(grad(sample_loss, has_aux=True), in_dims=(None, None, 0, 0))
    n = x.shape[0]
    was_training = model.training
    model.eval()
    try:
        total = None
        if linear_fast_path and kind == "empirical" and len(params) == len(list(model.parameters())):
            total = linear_fisher_sum(model, x.to(device), y.to(device), batch_size, weighted)
        if total is None:
            total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in params.items()}
            for start in range(0, n, batch_size):
                xb = as_float(x[start : start + batch_size].to(device))
                if kind == "empirical":
                    yb = y[start : start + batch_size].to(device).long()
                else:
                    with torch.no_grad():
                        probs = torch.softmax(functional_call(model, (params, buffers), (xb,)), dim=-1)
                    yb = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(device)
                grads, p_y = per_sample_grads(params, buffers, xb, yb)
                for k, g in grads.items():
                    if weighted:
                        total[k] += (p_y.view(-1, *[1] * (g.dim() - 1)) * g.float().pow(2)).sum(0)
                    else:
                        total[k] += g.float().pow(2).sum(0)
    finally:
        model.train(was_training)
    out = {k: (v / n).cpu() for k, v in total.items()}
    bad = [k for k, v in out.items() if not torch.isfinite(v).all()]
    if bad:
        raise TrainingError(  # the weights diverged: a training failure (compare --tune records it as one)
            f"Fisher of {bad[:3]} is not finite; the model produces NaN/inf on this data (check inputs and weights)"
        )
    return out


def linear_fisher_sum(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int, weighted: bool
) -> Optional[dict[str, torch.Tensor]]:
    """Sum over examples of [p(y_i|x_i) *] (d log p(y_i|x_i) / d theta)^2, exactly, without per-example gradients.

    For nets whose parameters all sit in ``nn.Linear`` layers fed (N, features) inputs, example i's
    weight gradient is the outer product g_i a_i^T of the layer's output gradient and input, so
    sum_i w_i (g_i a_i^T)^2 = (w * g^2)^T (a^2): one matmul per layer. Returns None for any other
    net (the caller uses vmap). The net must be in eval mode.
    """
    linears = {m: name for name, m in net.named_modules() if isinstance(m, nn.Linear)}
    owned = {f"{linears[m]}.{k}".lstrip(".") for m in linears for k, _ in m.named_parameters(recurse=False)}
    params = dict(net.named_parameters())
    if not linears or set(params) != owned or not all(p.requires_grad for p in params.values()):
        return None
    seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: seen.__setitem__(mod, (inp[0].detach(), out))) for m in linears
    ]
    fisher = {k: torch.zeros_like(p, requires_grad=False) for k, p in params.items()}
    try:
        for begin in range(0, int(y.shape[0]), chunk):
            seen.clear()
            with torch.enable_grad():
                ll = F.log_softmax(net(as_float(x[begin : begin + chunk])), dim=1).gather(
                    1, y[begin : begin + chunk, None]
                )[:, 0]
                if any(seen[m][0].dim() != 2 for m in linears):
                    return None  # sequence inputs: per-example gradients sum over positions
                mods = list(linears)
                grads = torch.autograd.grad(ll.sum(), [seen[m][1] for m in mods])
            w = ll.detach().exp() if weighted else torch.ones_like(ll)
            for m, g in zip(mods, grads):
                wg2 = g.pow(2) * w[:, None]
                prefix = f"{linears[m]}." if linears[m] else ""
                fisher[prefix + "weight"] += wg2.T @ seen[m][0].pow(2)
                if m.bias is not None:
                    fisher[prefix + "bias"] += wg2.sum(0)
    finally:
        for h in hooks:
            h.remove()
    return fisher


# ----------------------------------------------------------------------------- selection


def _flat(fisher: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if not fisher:
        raise ModuleMeshError("empty Fisher dict: nothing to select from")
    return torch.cat([v.reshape(-1).float() for v in fisher.values()])


def select_threshold(fisher: Mapping[str, torch.Tensor], tau: float) -> dict[str, torch.Tensor]:
    """Boolean masks of the parameters with F_j > tau (the seed's selection rule)."""
    if tau < 0:
        raise ModuleMeshError(f"tau must be >= 0 (Fisher values are non-negative), got {tau}")
    return {k: v > tau for k, v in fisher.items()}


def threshold_for_top_fraction(fisher: Mapping[str, torch.Tensor], q: float) -> float:
    """The tau at which ``select_threshold`` keeps (about) the top-q fraction of all parameters."""
    if not 0.0 < q <= 1.0:
        raise ModuleMeshError(f"top-q fraction must be in (0, 1], got {q}")
    flat = _flat(fisher)
    k = max(1, int(round(q * flat.numel())))
    if k >= flat.numel():
        return -1.0  # keep everything, including exact zeros
    kth = torch.topk(flat, k).values[-1].item()
    # Largest value strictly below the k-th one, so ties at the boundary are kept.
    below = flat[flat < kth]
    return float(below.max().item()) if below.numel() else -1.0


def select_top_fraction(
    fisher: Mapping[str, torch.Tensor], q: float, scope: Literal["global", "per_tensor"] = "global"
) -> dict[str, torch.Tensor]:
    """Boolean masks of the top-q fraction of parameters by Fisher, over the whole model or per tensor.

    Exactly ``round(q * n)`` entries are selected (ties broken by position).
    """
    if not 0.0 < q <= 1.0:
        raise ModuleMeshError(f"top-q fraction must be in (0, 1], got {q}")
    if scope not in ("global", "per_tensor"):
        raise ModuleMeshError(f"unknown scope {scope!r}; use 'global' or 'per_tensor'")
    if scope == "per_tensor":
        return {k: select_top_fraction({k: v}, q)[k] for k, v in fisher.items()}
    flat = _flat(fisher)
    k = max(1, int(round(q * flat.numel())))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.topk(flat, k).indices] = True
    out, start = {}, 0
    for name, v in fisher.items():
        out[name] = mask[start : start + v.numel()].view(v.shape)
        start += v.numel()
    return out


def selected_fraction(masks: Mapping[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return float(sum(int(m.sum()) for m in masks.values())) / max(total, 1)


def importance_mass(fisher: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> float:
    """Share of the total Fisher mass held by the selected parameters."""
    total = float(sum(v.sum() for v in fisher.values()))
    kept = float(sum(fisher[k][m].sum() for k, m in masks.items()))
    return kept / total if total > 0 else 0.0


def summarize(fisher: Mapping[str, torch.Tensor]) -> list[dict]:
    """Per-tensor shape, mean, max and share of the total Fisher mass (for reports)."""
    total = float(sum(v.sum() for v in fisher.values())) or 1.0
    return [
        {
            "name": k,
            "shape": list(v.shape),
            "mean": float(v.mean()),
            "max": float(v.max()),
            "mass": float(v.sum()) / total,
        }
        for k, v in fisher.items()
    ]


__all__ = [
    "fisher_diagonal",
    "linear_fisher_sum",
    "select_threshold",
    "select_top_fraction",
    "threshold_for_top_fraction",
    "selected_fraction",
    "importance_mass",
    "summarize",
]
