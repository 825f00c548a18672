"""Federated distillation math (seed 004): confidence-weighted aggregation of client logits and KD loss.

Clients send logits ``S_k(x)`` on a public, unlabelled proxy set. The server combines them as

    S(x) = sum_k alpha_k(x) S_k(x),   alpha_k(x) = softmax_k( conf(S_k(x)) / tau )

over the clients that answered (``mask``). ``conf`` is one of

* ``neg_entropy``: ``-H(softmax(S_k(x)))`` in nats, in ``[-log C, 0]``; a client sure of x scores 0,
* ``max_prob``: ``max_c softmax(S_k(x))_c``, in ``[1/C, 1]``,
* ``uniform``: 0 for every client, i.e. the plain mean (FedMD-style).

``tau`` (the confidence temperature) sets how sharply confident clients win: tau -> 0 picks the
most confident client per example, large tau is the plain mean.

``space`` chooses what is averaged: ``logits`` (seed 004's formula; each client's logits are
first shifted to log-probabilities, which changes no softmax but stops a client from winning by
adding a constant) or ``probs`` (a mixture of the clients' probability vectors; the log of the
mixture is returned so the result is again a logit tensor). ``robust`` replaces the weighted sum by
a coordinate-wise ``median`` or ``trimmed_mean`` of the clients' log-probabilities (ignoring the
confidence weights), to bound what one poisoned client can do.

``class_counts`` (``(K, C)``: how many training examples of each class each client holds, sent
once) makes the weights per class: client k's vote for class c is weighted by
``alpha_k(x) * n_kc``, normalised over the clients per class, so with ``score="uniform"`` each
class's soft label is the vote of its holders in proportion to their share of its examples
(``n_kc / sum_j n_jc``), and a client that never saw class c has no say on c. This is the
class-level ensemble of FedGen (Zhu et al. 2021) and FedFTG (Zhang et al. 2022), whose weights
``n_k^y / n^y`` weight each client's output for a *known* label y (their generators sample y); on an
unlabelled proxy example we apply them to every output coordinate c and renormalise over classes.
Under label skew a client's output on a class it never trained on is not evidence (it has only
ever seen that class as a negative), while plain or confidence-weighted averaging lets confidently
wrong clients outvote the few that hold the class. A class no answering client holds falls back to
the confidence weights.

``sharpen`` is DS-FL's entropy-reduction aggregation (Itahara et al. 2021): the aggregated
probabilities ``p`` become ``softmax(p / T_era)``; T_era < 1 lowers the entropy of the soft labels,
which DS-FL found to speed up and stabilise distillation under label skew.

The student minimises the training toolkit's ``training.losses.soft_target_loss``:
``T^2 * KL(softmax(S/T) || softmax(student/T))`` (Hinton et al.), averaged over the batch.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..errors import ConfigError
from .aggregate import coordinate_median, trimmed_mean

SCORES = ("neg_entropy", "max_prob", "uniform")
SPACES = ("logits", "probs")
ROBUST = ("none", "median", "trimmed_mean")


def confidence(logits: torch.Tensor, score: str = "neg_entropy") -> torch.Tensor:
    """Per-example confidence of logits ``(..., C)`` -> ``(...)``."""
    if score == "neg_entropy":
        logp = torch.log_softmax(logits.float(), dim=-1)
        return (logp.exp() * logp).sum(-1)
    if score == "max_prob":
        return torch.softmax(logits.float(), dim=-1).max(-1).values
    if score == "uniform":
        return torch.zeros(logits.shape[:-1], device=logits.device)
    raise ConfigError(f"unknown confidence score {score!r}; choose one of {', '.join(SCORES)}")


def client_weights(
    logits: torch.Tensor, score: str = "neg_entropy", tau: float = 1.0, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """alpha ``(K, N)`` from client logits ``(K, N, C)``: softmax over the K clients of conf / tau.

    ``mask`` (``(K,)`` or ``(K, N)`` bool) marks which clients answered; absent ones get weight 0.
    """
    if logits.dim() != 3:
        raise ConfigError(f"client logits must have shape (clients, examples, classes); got {tuple(logits.shape)}")
    if not tau > 0:
        raise ConfigError(f"confidence temperature tau must be > 0, got {tau}")
    conf = confidence(logits, score) / tau
    if mask is not None:
        m = mask.to(conf.device, torch.bool)
        if m.dim() == 1:
            m = m[:, None].expand_as(conf)
        if not m.any(0).all():
            raise ConfigError("no client answered for some proxy examples; at least one client must send logits")
        conf = conf.masked_fill(~m, -math.inf)
    return torch.softmax(conf, dim=0)


def aggregate_logits(
    logits: torch.Tensor,
    score: str = "neg_entropy",
    tau: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    space: str = "logits",
    robust: str = "none",
    trim: float = 0.1,
    class_counts: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Combine client logits ``(K, N, C)`` into global soft labels ``(N, C)`` (as logits).

    ``class_counts`` (``(K, C)``, optional): per-class training examples of each client; the
    weights become per class (see the module docstring).
    """
    if space not in SPACES:
        raise ConfigError(f"unknown aggregation space {space!r}; choose one of {', '.join(SPACES)}")
    logp = torch.log_softmax(logits.float(), dim=-1)
    if robust != "none":
        if robust not in ROBUST:
            raise ConfigError(f"unknown robust aggregation {robust!r}; choose one of {', '.join(ROBUST)}")
        if class_counts is not None:
            raise ConfigError("class-count weights need robust='none' (median and trimmed mean take no weights)")
        if mask is not None:
            if mask.dim() != 1:
                raise ConfigError("robust aggregation takes a per-client mask of shape (clients,)")
            logp = logp[mask.to(logp.device, torch.bool)]
        return coordinate_median(logp) if robust == "median" else trimmed_mean(logp, trim)
    alpha = client_weights(logits, score, tau, mask)[..., None]  # (K, N, 1)
    if class_counts is not None:
        alpha = per_class_weights(alpha, class_counts)  # (K, N, C)
    if space == "logits":
        return (alpha * logp.masked_fill(alpha == 0, 0.0)).sum(0)
    probs = (alpha * logp.exp()).sum(0)
    return probs.clamp_min(1e-12).log()


def per_class_weights(alpha: torch.Tensor, class_counts: torch.Tensor) -> torch.Tensor:
    """Per-class client weights ``(K, N, C)``: ``alpha_k(x) * n_kc`` normalised over the clients for each class.

    ``alpha`` ``(K, N, 1)`` are the per-example client weights (0 for clients that did not answer);
    ``class_counts`` ``(K, C)``. Classes that no answering client holds keep ``alpha``.
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float32, device=alpha.device)
    if counts.dim() != 2 or counts.shape[0] != alpha.shape[0]:
        raise ConfigError(
            f"class counts must have shape (clients, classes) = ({alpha.shape[0]}, C); got {tuple(counts.shape)}"
        )
    if (counts < 0).any():
        raise ConfigError("class counts must be >= 0")
    w = alpha * counts[:, None, :]  # (K, N, C)
    total = w.sum(0, keepdim=True)
    return torch.where(total > 0, w / total.clamp_min(1e-30), alpha.expand_as(w))


def sharpen(soft: torch.Tensor, temperature: float) -> torch.Tensor:
    """DS-FL's entropy reduction of soft labels (as logits ``(N, C)``): log of ``softmax(softmax(soft) / T)``."""
    if not temperature > 0:
        raise ConfigError(f"sharpening temperature must be > 0, got {temperature}")
    if temperature == 1.0:
        return soft
    return torch.log_softmax(torch.softmax(soft.float(), dim=-1) / temperature, dim=-1)
