"""The experts' own evidence of which task an input belongs to, weighted into the density router's scores.

The density router scores expert i by log p_i(x), the density of its task's inputs. Two kinds of evidence
from the experts themselves can be added (each weight picked on the validation split):

- rejection (``router.expert_weight``, ``expert_task_log_prob``): each new expert was trained to reject the
  replayed inputs of the tasks before it, read by stick-breaking from the newest expert;
- a task probe (``router.probe_weight``, ``fit_task_probe``): a multinomial logistic regression from what
  every expert outputs on an input to the expert that owns it, refit on the replay buffer when each task
  ends. Why: an expert can only learn to reject the tasks that came before it, and is frozen afterwards; the
  probe is refit after every task, so it also learns what old experts say on later tasks' inputs, without
  changing any expert (TPL, Lin et al. 2024, uses other tasks' replay data against a task for the same reason).
  Its state is a few numbers per expert; it is dropped when the set of experts changes (refit at the next task
  end, or with ``DensityRouter.fit_probe``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import ModuleMeshError

# L2 penalty on the probe's weights (the loss is a per-example mean): chosen on the validation split of
# Split-MNIST and Split-Fashion-MNIST (seed 0) among 0.03-3 by benchmarks/routing_weights.py, which refits the
# probe from a finished run's buffer; both pick 1.0, a plateau from 0.3 to 3 on Split-MNIST.
PROBE_L2 = 1.0


def expert_task_log_prob(expert_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, E) log P(task = j | x) from the experts alone, by stick-breaking from the newest expert.

    Expert k was trained (``strategy.reject_weight``) to tell its own task's inputs from the replayed
    inputs of every earlier task, with m_k(x) = logsumexp of its logits as the logit of "mine": so
    sigma(m_k) = P(x is task k | x is one of tasks 0..k). Then P(task j) = sigma(m_j) prod_{k>j} (1 - sigma(m_k)),
    with sigma(m_0) = 1 (the first expert has no earlier task to reject). This is the OOD-detection view of
    class-IL task prediction (Kim et al. 2022) with each expert judging only the tasks it saw rejected.
    """
    m = torch.stack([torch.logsumexp(z.float(), 1) for z in expert_logits], 1)
    log_in, log_out = -F.softplus(-m), -F.softplus(m)
    log_in = torch.cat([torch.zeros_like(log_in[:, :1]), log_in[:, 1:]], 1)
    later_out = log_out.flip(1).cumsum(1).flip(1) - log_out  # sum over k > j
    return log_in + later_out


def probe_inputs(expert_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, D) what the probe reads: per expert, its class log-probabilities and the logsumexp of its logits
    (the 'mine' logit the rejection training shapes); D = sum over experts of (classes + 1)."""
    parts = []
    for z in expert_logits:
        z = z.float()
        parts += [F.log_softmax(z, 1), torch.logsumexp(z, 1, keepdim=True)]
    return torch.cat(parts, 1)


@torch.no_grad()
def fit_task_probe(
    inputs: torch.Tensor, owner: torch.Tensor, num_experts: int, l2: float = PROBE_L2
) -> dict[str, torch.Tensor]:
    """Multinomial logistic regression ``owner`` (N,) in [0, num_experts) from ``inputs`` (N, D), every expert's
    rows weighted equally (a reservoir buffer holds more of some tasks than others); full-batch L-BFGS in float64,
    so the same rows give the same probe. Returns {"weight": (E, D), "bias": (E,)}."""
    if inputs.ndim != 2 or owner.shape != inputs.shape[:1]:
        raise ModuleMeshError(
            f"a task probe needs (N, D) inputs and (N,) owners; got {tuple(inputs.shape)}, {tuple(owner.shape)}"
        )
    x, y = inputs.detach().double().cpu(), owner.detach().long().cpu()
    counts = torch.bincount(y, minlength=num_experts).double()
    row_w = (1.0 / counts.clamp_min(1))[y]
    row_w = row_w / row_w.sum()
    with torch.enable_grad():
        w = torch.zeros(num_experts, x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(num_experts, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            nll = F.cross_entropy(x @ w.t() + b, y, reduction="none")
            loss = (row_w * nll).sum() + 0.5 * l2 * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    return {"weight": w.detach().float(), "bias": b.detach().float()}


def task_probe_log_prob(probe: dict[str, torch.Tensor], expert_logits: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """(N, E) the probe's log P(expert owns x), or None when it was fit for a different set of experts."""
    x = probe_inputs(expert_logits)
    w, b = probe["weight"].to(x.device), probe["bias"].to(x.device)
    if w.shape != (len(expert_logits), x.shape[1]):
        return None
    return F.log_softmax(x @ w.t() + b, 1)
