"""Membership audit of a federated run's final model: the calibrated attack of ``modulemesh.privacy``.

The plain loss-threshold attack scored about 0.5 even on the centrally trained model, so its 0.5 for
federated distillation said nothing. This audit uses offline LiRA (Carlini et al. 2022) instead:
each candidate's logit-scaled confidence under the run's model is compared with that of reference
models trained the same way (same backbone, optimizer, batch size and example passes) on data that
excludes every candidate. tests/test_privacy_attacks.py shows the attack has power (AUC >= 0.6
against a deliberately overfit model); a federated model near 0.5 now means the attack, which can
see membership, did not.

Candidates: ``n`` members drawn from the clients' private examples and ``n`` non-members from the
test set. Population for the references: the private pool and the test set without any candidate.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..mesh.backbones import build_backbone
from ..privacy import calibrated_scores, log_confidence, membership_auc, reference_confidences
from ..training.fit import fit
from ..training.optim import OptimizerSpec


def membership_audit(
    predict: Callable[[torch.Tensor], torch.Tensor],
    data,
    fed,
    seed: int = 0,
    n: int = 1000,
    references: int = 4,
    reference_size: int = 10_000,
) -> dict[str, Any]:
    """AUCs of the calibrated and the plain attack on ``predict`` (float inputs -> logits)."""
    g = torch.Generator().manual_seed(seed + 7_919)
    private = torch.cat(list(data.parts)).cpu()
    n = min(n, len(private) // 2, len(data.y_test) // 2)
    mem = private[torch.randperm(len(private), generator=g)[:n]]
    non = torch.randperm(len(data.y_test), generator=g)[:n]
    dev = data.x.device
    cand_x = torch.cat([data.x[mem.to(dev)], data.x_test[non.to(data.x_test.device)].to(dev)])
    cand_y = torch.cat([data.y[mem.to(dev)], data.y_test[non.to(data.y_test.device)].to(dev)])
    # Population: everything but the candidates.
    keep_pool = torch.ones(len(data.y), dtype=torch.bool)
    keep_pool[mem] = False
    keep_test = torch.ones(len(data.y_test), dtype=torch.bool)
    keep_test[non] = False
    pop_x = torch.cat([data.x[keep_pool.to(dev)], data.x_test[keep_test.to(data.x_test.device)].to(dev)])
    pop_y = torch.cat([data.y[keep_pool.to(dev)], data.y_test[keep_test.to(data.y_test.device)].to(dev)])
    # A reference sees its examples as often as the run's model saw the private pool (same epochs); at
    # most `reference_size` of them, so the audit costs minutes, not the run's whole training again.
    size = min(len(private), len(pop_y), reference_size)
    steps = max(1, int(fed.rounds * fed.local_epochs * size / fed.batch_size))
    refs = []
    for k in range(references):
        idx = torch.randperm(len(pop_y), generator=g)[:size].to(dev)
        refs.append(_reference(fed, data, pop_x[idx], pop_y[idx], steps, seed * 101 + k))
    target_phi = log_confidence(predict, cand_x, cand_y)
    scores = calibrated_scores(target_phi, reference_confidences(refs, cand_x, cand_y))
    return {
        "membership_auc": membership_auc(scores[:n], scores[n:]),
        "membership_auc_uncalibrated": membership_auc(target_phi[:n], target_phi[n:]),
        "membership_attack": f"offline LiRA, {references} reference models on {size:,} examples each, "
        f"{n} members vs {n} non-members",
    }


def _reference(fed, data, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int):
    with torch.random.fork_rng(devices=[]):  # the run's own random stream is left as it was
        torch.manual_seed(seed)
        model = build_backbone(fed.backbone, data.input_shape, data.num_classes).to(x.device)
    fit(
        model,
        lambda xb, yb, idx: F.cross_entropy(model(xb), yb),
        (x, y),
        steps=steps,
        optimizer=OptimizerSpec(lr=fed.lr, momentum=fed.momentum),
        batch_size=fed.batch_size,
        seed=seed,
        device=x.device,
        what="a membership reference model",
    )
    model.eval()
    return model
