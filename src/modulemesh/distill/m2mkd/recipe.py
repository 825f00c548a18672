"""m2mKD's training recipe: AdamW + warm-up/cosine ``fit``, the CE and whole-model KD losses (plus the
MoE load-balancing loss), FLOP accounting, stitch folding and the hash that keys every stage's output."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...data.scenarios import as_float
from ...training.fit import fit as train_for_steps
from ...training.losses import kd_loss
from ...training.optim import OptimizerSpec
from ..models import ModularNet, StitchedModule, moe_aux_loss
from .config import M2MKDConfig, OptimSection


def inference_flops(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs per sample of one forward pass (torch.utils.flop_counter), measured on the batch ``x``."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(as_float(x))
    model.train(was)
    return fc.get_total_flops() / max(1, x.shape[0])


def fit(
    params: Sequence[nn.Parameter],
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    optim: OptimSection,
    lr: float,
    seed: int,
    modules: Sequence[nn.Module] = (),
    on_step: Optional[Callable[[int], None]] = None,
) -> dict[str, Any]:
    """``training.fit`` with m2mKD's recipe (AdamW, warm-up + cosine decay, clipping): ``steps`` minibatches of (x, y).

    ``loss_fn(xb, yb, idx)`` returns the loss (``idx``: the batch's rows of x, for cached teacher
    logits). The first batch is also run once under ``FlopCounterMode`` to measure FLOPs per step
    (forward + backward), its gradients discarded. Returns steps, seconds, flops_per_step,
    train_flops and the mean loss of the last tenth.
    """
    spec = OptimizerSpec(
        "adamw",
        lr,
        weight_decay=optim.weight_decay,
        schedule="warmup_cosine",
        warmup=optim.warmup,
        grad_clip=optim.grad_clip,
    )
    result = train_for_steps(
        params,
        loss_fn,
        (x, y),
        steps=steps,
        optimizer=spec,
        batch_size=optim.batch_size,
        seed=seed,
        modules=modules,
        count_flops=True,
        on_step=(lambda step, loss: on_step(step)) if on_step else None,
        lr_hint="optim.lr",
    )
    stats = result.as_dict()
    del stats["stopped_early"]
    return stats


def ce_loss_fn(model: nn.Module, aux_weight: float) -> Callable[..., torch.Tensor]:
    def loss(xb: torch.Tensor, yb: torch.Tensor, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = F.cross_entropy(model(xb), yb)
        aux = moe_aux_loss(model)
        return out + aux_weight * aux if (aux is not None and aux_weight > 0) else out

    return loss


def config_hash(*parts: Any) -> str:
    """A short hash of a stage's inputs, stored in its manifest: a finished stage is reused only for the same inputs."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def kd_loss_fn(
    student: nn.Module, teacher: nn.Module, cfg: M2MKDConfig, cached: Optional[torch.Tensor] = None
) -> Callable[..., torch.Tensor]:
    """Whole-model KD (Hinton): ``kd_loss(student(x), teacher(x), y)`` with the distill alpha/temperature, plus the MoE
    aux loss.

    ``cached``: the teacher's logits for every training row (then ``idx`` picks the batch's rows).
    """
    teacher.eval()
    dc, aux_w = cfg.distill, cfg.optim.aux_weight

    def loss(xb: torch.Tensor, yb: torch.Tensor, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        if cached is not None and idx is not None:
            t = cached[idx.to(cached.device)]
        else:
            with torch.no_grad():
                t = teacher(xb)
        out = kd_loss(student(xb), t, yb, alpha=dc.alpha, T=dc.temperature)
        aux = moe_aux_loss(student)
        return out + aux_w * aux if (aux is not None and aux_w > 0) else out

    return loss


@torch.no_grad()
def meta_tokens(segments: Sequence[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
    for s in segments:
        x = s(x)
    return x


def boundary_loss(s_mid: torch.Tensor, m_mid: torch.Tensor) -> torch.Tensor:
    """MSE between the student module's output tokens and the meta model's, relative to the
    latter's mean square (so the weight does not depend on the meta model's token scale)."""
    return F.mse_loss(s_mid, m_mid) / m_mid.pow(2).mean().clamp_min(1e-8)


def add_logit_cost(stats: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Charge the one-off teacher-logit pass (FLOPs and seconds) to a training phase's stats."""
    if not extra:
        return stats
    out = dict(stats)
    out["teacher_logits"] = extra
    out["train_flops"] = stats["train_flops"] + extra["flops"]
    out["seconds"] = round(stats["seconds"] + extra["seconds"], 3)
    return out


@torch.no_grad()
def fold_stitches(kept: ModularNet, x_train: torch.Tensor, samples: int = 512) -> tuple[ModularNet, dict[str, Any]]:
    """Replace each stitch pair (stitch_out of module i, stitch_in of module i+1) by one least-squares Linear.

    The pair is LayerNorm-Linear-LayerNorm-Linear, so the fold is exact only where that map is
    affine on the data; the R^2 of each fit on ``samples`` training inputs is reported.
    """
    parts = list(kept.parts)
    k = len(parts)
    if all(p.stitch_in is None and p.stitch_out is None for p in parts):
        return kept, {"boundaries": [], "note": "no stitches to fold (equal widths)"}
    device = next(kept.parameters()).device
    h = as_float(x_train[:samples].to(device))
    links, r2 = [], []
    for i in range(k - 1):
        a = parts[i].body(h)  # h is what module i's body reads (after its stitch_in)
        target = parts[i + 1].stitch_in(parts[i].stitch_out(a))
        src = a.reshape(-1, a.shape[-1])
        tgt = target.reshape(-1, target.shape[-1])
        design = torch.cat([src, torch.ones(src.shape[0], 1, device=device)], 1)
        sol = torch.linalg.lstsq(design.cpu().double(), tgt.cpu().double()).solution.float().to(device)
        lin = nn.Linear(src.shape[1], tgt.shape[1]).to(device)
        lin.weight.copy_(sol[:-1].T)
        lin.bias.copy_(sol[-1])
        resid = (design @ sol - tgt).pow(2).sum()
        total = (tgt - tgt.mean(0)).pow(2).sum().clamp_min(1e-12)
        r2.append(float(1 - resid / total))
        links.append(lin)
        h = target
    folded = ModularNet([StitchedModule(p.body) for p in parts], links).to(device)
    return folded, {"boundaries": [{"between": [i, i + 1], "r2": v} for i, v in enumerate(r2)]}


@torch.no_grad()
def calibrate_stitches(
    kept: ModularNet, meta_segments: Sequence[nn.Module], x_train: torch.Tensor, samples: int = 512
) -> dict[str, Any]:
    """Refit each module's output stitch so the assembled prefix hands the next module the meta model's tokens.

    Module i+1 was distilled reading ``meta[:i+1](x)``; assembled, it reads module i's output instead.
    At each boundary module i's ``stitch_out`` Linear is refit by ridge regression (on ``samples``
    training inputs, shrunk towards its distilled weights) from its normalized input to the meta
    model's tokens, in order, so later boundaries see the calibrated prefix. (A plain least-squares
    map folded after the Linear blew its weights up to ~1e5: LayerNorm outputs span one dimension
    less than their width, and fine-tuning from there fell apart.) Boundaries without a stitch (equal
    widths) are left as they are. Returns the R^2 of the handed-over tokens before and after.
    """
    parts = list(kept.parts)
    device = next(kept.parameters()).device
    h = as_float(x_train[:samples].to(device))
    m = h
    out = []
    for i in range(len(parts) - 1):
        m = meta_segments[i](m)
        part = parts[i]
        u = part(h)
        tgt = m.reshape(-1, m.shape[-1])
        so = part.stitch_out
        if so is None or u.shape[-1] != m.shape[-1]:
            out.append({"between": [i, i + 1], "r2_before": _r2(u.reshape(tgt.shape), tgt), "r2_after": None})
            h = u
            continue
        z = so.norm(part.body(part.stitch_in(h) if part.stitch_in is not None else h))
        z = z.reshape(-1, z.shape[-1]).double()
        w, c = so.proj.weight.double(), so.proj.bias.double()
        resid = tgt.double() - (z @ w.T + c)
        zm, rm = z.mean(0), resid.mean(0)
        zc, rc = z - zm, resid - rm
        gram = zc.T @ zc
        ridge = 1e-3 * gram.diagonal().mean().clamp_min(1e-12)
        dw = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=device), zc.T @ rc).T
        so.proj.weight.copy_((w + dw).float())
        so.proj.bias.copy_((c + rm - dw @ zm).float())
        h = part(h)
        out.append(
            {
                "between": [i, i + 1],
                "r2_before": _r2(u.reshape(tgt.shape), tgt),
                "r2_after": _r2(h.reshape(tgt.shape), tgt),
            }
        )
    return {"boundaries": out, "samples": int(min(samples, x_train.shape[0]))}


def _r2(pred: torch.Tensor, target: torch.Tensor) -> float:
    total = (target - target.mean(0)).pow(2).sum().clamp_min(1e-12)
    return float(1 - (pred - target).pow(2).sum() / total)
