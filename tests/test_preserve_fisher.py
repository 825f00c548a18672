"""Diagonal Fisher from vmap'd per-sample gradients vs a brute-force per-sample loop; selection."""

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from modulemesh.errors import DataError, ModuleMeshError
from modulemesh.mesh.backbones import build_backbone
from modulemesh.preserve.fisher import (
    fisher_diagonal,
    importance_mass,
    select_threshold,
    select_top_fraction,
    selected_fraction,
    threshold_for_top_fraction,
)


def digits(n=40):
    d = load_digits()
    x = torch.tensor(d.images[:n] / 16.0, dtype=torch.float32).unsqueeze(1)
    return x, torch.tensor(d.target[:n], dtype=torch.long)


def brute_force(model, x, labels):
    model.eval()
    total = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for xi, yi in zip(x, labels):
        model.zero_grad()
        F.cross_entropy(model(xi.unsqueeze(0)), yi.view(1)).backward()
        for k, p in model.named_parameters():
            total[k] += p.grad.detach() ** 2
    return {k: v / len(x) for k, v in total.items()}


@pytest.mark.parametrize("spec", [{"type": "mlp", "hidden": [12, 9]}, {"type": "cnn", "channels": [3, 4], "hidden": 8}])
def test_empirical_fisher_matches_per_sample_loop(spec):
    torch.manual_seed(0)
    x, y = digits(37)
    model = build_backbone(spec, (1, 8, 8), 10)
    if spec["type"] == "cnn":  # non-trivial BatchNorm statistics, used in eval mode
        model.train()
        model(torch.rand(64, 1, 8, 8))
    fast = fisher_diagonal(model, (x, y), kind="empirical", batch_size=8)  # 37 = 4 full batches + 5
    slow = brute_force(model, x, y)
    assert fast.keys() == slow.keys()
    for k in slow:
        assert torch.allclose(fast[k], slow[k], rtol=1e-4, atol=1e-9), k
    assert all(v.sum() > 0 for v in fast.values())


def test_true_fisher_uses_labels_sampled_from_the_model():
    torch.manual_seed(1)
    x, y = digits(30)
    model = build_backbone({"type": "mlp", "hidden": [10]}, (1, 8, 8), 10)
    # Reproduce the sampled labels: one multinomial draw per input, batch by batch, same generator.
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        probs = torch.softmax(model(x), -1)
    sampled = torch.cat([torch.multinomial(probs[i : i + 30], 1, generator=g).squeeze(1) for i in range(0, 30, 30)])
    fast = fisher_diagonal(model, (x, None), kind="true", batch_size=30, generator=torch.Generator().manual_seed(5))
    slow = brute_force(model, x, sampled)
    for k in slow:
        assert torch.allclose(fast[k], slow[k], rtol=1e-4, atol=1e-9), k
    emp = fisher_diagonal(model, (x, y), kind="empirical")
    assert not torch.allclose(emp["1.weight"], fast["1.weight"])  # sampled labels differ from the true ones


def test_true_fisher_converges_to_the_expectation_over_labels():
    torch.manual_seed(2)
    x, _ = digits(4)
    model = build_backbone({"type": "mlp", "hidden": [6]}, (1, 8, 8), 10)
    with torch.no_grad():
        probs = torch.softmax(model(x), -1)
    exact = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(4):  # E_{y ~ p(.|x)} [g_y^2], summed exactly over the 10 labels
        for c in range(10):
            g = brute_force(model, x[i : i + 1], torch.tensor([c]))
            for k in exact:
                exact[k] += probs[i, c] * g[k] / 4
    reps = x.repeat(500, 1, 1, 1)
    mc = fisher_diagonal(model, (reps, None), kind="true", batch_size=500, generator=torch.Generator().manual_seed(0))
    for k in exact:
        assert abs(float(mc[k].sum()) / float(exact[k].sum()) - 1) < 0.1, k


def test_fisher_keeps_the_model_mode_and_rejects_bad_input():
    model = build_backbone({"type": "mlp", "hidden": [5]}, (1, 8, 8), 10)
    model.train()
    x, y = digits(10)
    fisher_diagonal(model, (x, y))
    assert model.training
    with pytest.raises(ModuleMeshError, match="unknown Fisher kind"):
        fisher_diagonal(model, (x, y), kind="exact")
    with pytest.raises(DataError, match="needs labels"):
        fisher_diagonal(model, (x, None))
    with pytest.raises(DataError, match="one label per input"):
        fisher_diagonal(model, (x, y[:3]))
    with pytest.raises(DataError, match="empty"):
        fisher_diagonal(model, (x[:0], y[:0]))


def test_uint8_inputs_are_scaled():
    torch.manual_seed(0)
    model = build_backbone({"type": "mlp", "hidden": [5]}, (1, 8, 8), 10)
    x, y = digits(12)
    as_uint8 = (x * 255).round().to(torch.uint8)
    a = fisher_diagonal(model, (as_uint8, y))
    b = fisher_diagonal(model, (as_uint8.float() / 255, y))
    assert all(torch.allclose(a[k], b[k]) for k in a)


def test_threshold_and_top_fraction_selection():
    fisher = {"a": torch.tensor([[0.0, 5.0], [1.0, 3.0]]), "b": torch.tensor([2.0, 0.5, 4.0, 0.0])}
    m = select_threshold(fisher, 1.0)
    assert m["a"].tolist() == [[False, True], [False, True]] and m["b"].tolist() == [True, False, True, False]
    top = select_top_fraction(fisher, 0.25)  # 2 of 8: values 5 and 4
    assert top["a"].tolist() == [[False, True], [False, False]] and top["b"].tolist() == [False, False, True, False]
    assert selected_fraction(top) == 0.25
    assert importance_mass(fisher, top) == pytest.approx(9.0 / 15.5)
    per = select_top_fraction(fisher, 0.5, scope="per_tensor")
    assert per["a"].sum() == 2 and per["b"].sum() == 2 and per["b"].tolist() == [True, False, True, False]
    tau = threshold_for_top_fraction(fisher, 0.5)  # keep 5, 4, 3, 2
    assert select_threshold(fisher, tau)["b"].tolist() == [True, False, True, False]
    assert selected_fraction(select_threshold(fisher, tau)) == 0.5
    with pytest.raises(ModuleMeshError):
        select_top_fraction(fisher, 0.0)
    with pytest.raises(ModuleMeshError):
        select_threshold(fisher, -1.0)


def test_diverged_weights_are_a_training_error():
    """A NaN model makes a non-finite Fisher: a training failure, so compare --tune records the point as failed."""
    from modulemesh.errors import TrainingError

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(TrainingError, match="not finite"):
        fisher_diagonal(model, (x, y))
