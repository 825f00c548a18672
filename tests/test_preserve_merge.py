"""Fisher-weighted merging vs plain averaging, checked by hand."""

import pytest
import torch

from modulemesh.errors import ModuleMeshError
from modulemesh.preserve.merge import average_states, fisher_merge


def test_weighted_average():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(7)}
    assert torch.allclose(average_states([a, b])["w"], torch.tensor([2.0, 4.0]))
    assert torch.allclose(average_states([a, b], [3, 1])["w"], torch.tensor([1.5, 3.0]))
    assert average_states([a, b])["n"] == 3  # integer buffers come from the first model


def test_fisher_merge_by_hand():
    a = {"w": torch.tensor([1.0, 2.0, 5.0]), "bn.running_mean": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0, 7.0]), "bn.running_mean": torch.tensor([1.0])}
    fa = {"w": torch.tensor([1.0, 0.0, 0.0])}
    fb = {"w": torch.tensor([3.0, 2.0, 0.0])}
    m = fisher_merge([a, b], [fa, fb])
    # entry 0: (1*1 + 3*3) / 4 = 2.5; entry 1: only b has Fisher -> 6; entry 2: no Fisher -> plain mean 6
    assert torch.allclose(m["w"], torch.tensor([2.5, 6.0, 6.0]))
    assert torch.allclose(m["bn.running_mean"], torch.tensor([0.5]))
    # model weights multiply the Fisher: (0.75*1*1 + 0.25*3*3) / (0.75 + 0.75) = 2.0
    assert float(fisher_merge([a, b], [fa, fb], weights=[3, 1])["w"][0]) == pytest.approx(2.0)


def test_equal_fisher_is_plain_averaging():
    torch.manual_seed(0)
    states = [{"w": torch.randn(4, 3)} for _ in range(3)]
    f = {"w": torch.full((4, 3), 0.7)}
    assert torch.allclose(fisher_merge(states, [f, f, f])["w"], average_states(states)["w"], atol=1e-6)


def test_merge_rejects_mismatched_models():
    a = {"w": torch.zeros(2)}
    with pytest.raises(ModuleMeshError, match="same-architecture"):
        average_states([a, {"w": torch.zeros(3)}])
    with pytest.raises(ModuleMeshError, match="different tensors"):
        average_states([a, {"v": torch.zeros(2)}])
    with pytest.raises(ModuleMeshError, match="one per model"):
        fisher_merge([a, a], [{"w": torch.ones(2)}])
    with pytest.raises(ModuleMeshError, match="negative"):
        fisher_merge([a, a], [{"w": torch.ones(2)}, {"w": -torch.ones(2)}])
    with pytest.raises(ModuleMeshError, match="weights"):
        average_states([a, a], [1.0])
