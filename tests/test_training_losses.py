"""KD losses against hand-computed values; the teacher-logit cache."""

import math

import pytest
import torch
from torch import nn

from modulemesh.errors import ModuleMeshError
from modulemesh.training.losses import (
    kd_loss,
    kl_divergence,
    l2_penalty,
    seed_distill_loss,
    soft_cross_entropy,
    soft_target_loss,
)
from modulemesh.training.teacher_logits import teacher_cache_path, teacher_logits

S = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]])
T_ = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
Y = torch.tensor([1, 2])


def softmax(row, t):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def hand_kl(t):
    total = 0.0
    for s_row, t_row in zip(S.tolist(), T_.tolist()):
        p, q = softmax(t_row, t), softmax(s_row, t)
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return total / 2  # batchmean


def hand_ce():
    return sum(-math.log(softmax(row, 1.0)[y]) for row, y in zip(S.tolist(), Y.tolist())) / 2


def test_kl_and_kd_match_hand_computation():
    assert float(kl_divergence(S, T_, T=1.0)) == pytest.approx(hand_kl(1.0), rel=1e-5)
    assert float(kl_divergence(S, T_, T=3.0)) == pytest.approx(hand_kl(3.0), rel=1e-5)
    expected = 0.3 * hand_ce() + 0.7 * 9.0 * hand_kl(3.0)
    assert float(kd_loss(S, T_, Y, alpha=0.3, T=3.0)) == pytest.approx(expected, rel=1e-5)
    assert float(kd_loss(S, T_, Y, alpha=1.0, T=3.0)) == pytest.approx(hand_ce(), rel=1e-5)
    assert float(kd_loss(S, T_, None, alpha=0.0, T=2.0)) == pytest.approx(4.0 * hand_kl(2.0), rel=1e-5)
    assert float(kl_divergence(S, S)) == pytest.approx(0.0, abs=1e-7)


def test_kd_gradient_flows_to_the_student_only():
    s = S.clone().requires_grad_(True)
    t = T_.clone().requires_grad_(True)
    kd_loss(s, t, Y, alpha=0.5, T=2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_seed_form_adds_an_l2_penalty():
    params = [torch.tensor([1.0, -2.0]), torch.tensor([[0.5]])]
    assert float(l2_penalty(params)) == pytest.approx(5.25)
    assert float(seed_distill_loss(S, T_, params, lam=0.1)) == pytest.approx(hand_kl(1.0) + 0.525, rel=1e-5)
    assert float(seed_distill_loss(S, T_)) == pytest.approx(hand_kl(1.0), rel=1e-5)


def test_bad_inputs_are_explained():
    with pytest.raises(ModuleMeshError, match="differ in shape"):
        kd_loss(S, T_[:, :2], Y)
    with pytest.raises(ModuleMeshError, match="needs the true labels"):
        kd_loss(S, T_, None, alpha=0.5)
    with pytest.raises(ModuleMeshError, match="alpha"):
        kd_loss(S, T_, Y, alpha=2.0)
    with pytest.raises(ModuleMeshError, match="temperature"):
        kl_divergence(S, T_, T=0.0)
    with pytest.raises(ModuleMeshError, match="params"):
        seed_distill_loss(S, T_, None, lam=0.1)


def test_teacher_logits_are_cached_on_disk(tmp_path):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    first = teacher_logits(teacher, x, cache_dir=tmp_path, batch_size=4)
    assert len(calls) == 3 and teacher_cache_path(teacher, x, tmp_path).exists()
    with torch.no_grad():
        assert torch.allclose(first, teacher(x.float() / 255))
    calls.clear()
    again = teacher_logits(teacher, x, cache_dir=tmp_path)
    assert calls == [] and torch.equal(first, again)  # hit: the teacher did not run
    with torch.no_grad():
        teacher[1].bias.add_(1.0)  # a changed teacher misses the cache
    changed = teacher_logits(teacher, x, cache_dir=tmp_path)
    assert calls and torch.allclose(changed, first + 1.0, atol=1e-6)
    assert len(list(tmp_path.glob("teacher_logits_*.safetensors"))) == 2
    calls.clear()
    teacher_logits(teacher, x[:5], cache_dir=tmp_path)  # other inputs miss too
    assert calls
    path = teacher_cache_path(teacher, x, tmp_path)
    path.write_bytes(b"garbage")  # a corrupt cache file is recomputed
    assert torch.allclose(teacher_logits(teacher, x, cache_dir=tmp_path), changed)


def test_soft_target_loss_is_t_squared_kl_and_soft_ce_matches_hand_computation():
    T = 3.0
    assert torch.allclose(soft_target_loss(S, T_, T), kl_divergence(S, T_, T) * T * T)
    p = torch.softmax(T_, -1)
    by_hand = -sum(float((p[i] * torch.log_softmax(S[i], -1)).sum()) for i in range(2)) / 2
    assert float(soft_cross_entropy(S, p)) == pytest.approx(by_hand, rel=1e-6)
    # CE against one-hot targets is the ordinary cross-entropy
    onehot = torch.nn.functional.one_hot(Y, 3).float()
    assert float(soft_cross_entropy(S, onehot)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(S, Y)), rel=1e-6
    )
    with pytest.raises(ModuleMeshError, match="differ in shape"):
        soft_cross_entropy(S, p[:, :2])
