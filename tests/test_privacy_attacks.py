"""Issue 11.5: the calibrated membership attack has power (AUC >= 0.6 against a deliberately overfit
model) and none against a model that never saw the members."""

import torch
import torch.nn.functional as F

from modulemesh.data.datasets import load_dataset
from modulemesh.data.scenarios import as_float
from modulemesh.mesh.backbones import build_backbone
from modulemesh.privacy import (
    calibrated_scores,
    log_confidence,
    loss_scores,
    membership_auc,
    reference_confidences,
    train_reference_models,
)


def train_mlp(x, y, seed, steps=300):
    """Full-batch Adam for many steps on few examples: memorizes its training set (train acc 100%)."""
    torch.manual_seed(seed)
    net = build_backbone({"type": "mlp", "hidden": [128]}, (1, 8, 8), 10)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xf = as_float(x)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(xf), y).backward()
        opt.step()
    return net.eval()


def test_calibrated_attack_has_power_against_an_overfit_model_and_none_without_membership():
    ds = load_dataset("digits")
    x = torch.cat([torch.as_tensor(ds.x_train), torch.as_tensor(ds.x_test)])
    y = torch.cat([torch.as_tensor(ds.y_train), torch.as_tensor(ds.y_test)]).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    members, non_members, population = perm[:150], perm[150:300], perm[300:]
    target = train_mlp(x[members], y[members], seed=1)
    refs = train_reference_models(train_mlp, x[population], y[population], k=4, size=150, seed=2)
    probe = torch.cat([members, non_members])
    ref_phi = reference_confidences(refs, x[probe], y[probe])
    scores = calibrated_scores(log_confidence(target, x[probe], y[probe]), ref_phi)
    auc = membership_auc(scores[:150], scores[150:])
    plain = loss_scores(target, x[probe], y[probe])
    plain_auc = membership_auc(plain[:150], plain[150:])
    assert auc >= 0.6, (auc, plain_auc)
    assert auc > plain_auc, (auc, plain_auc)  # calibration is what gives the attack its power
    # Control: a model trained on other examples of the same population; "members" mean nothing to it.
    outsider = train_mlp(x[population[-150:]], y[population[-150:]], seed=1)
    control = calibrated_scores(log_confidence(outsider, x[probe], y[probe]), ref_phi)
    assert abs(membership_auc(control[:150], control[150:]) - 0.5) < 0.08


def test_auc_edge_cases():
    assert membership_auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert membership_auc(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])) == 0.5
