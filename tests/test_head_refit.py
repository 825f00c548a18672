"""strategy.head_refit: lda replaces a finished expert's last layer by LDA on its own features."""

import torch

from helpers import run_digits_mesh
from modulemesh.mesh import Expert
from modulemesh.strategies.head_refit import last_linear, refit_head_lda
from modulemesh.strategies.icarl import penultimate


def blobs(n: int, seed: int):
    """Three 10-d Gaussian classes with a shared, strongly correlated covariance (where LDA beats class means)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(10, 10, generator=g) * 0.2 + torch.eye(10) * 2.0
    y = torch.randint(0, 3, (n,), generator=g)
    centres = torch.tensor([[1.0] + [0.0] * 9, [0.0, 1.0] + [0.0] * 8, [0.0, 0.0, 1.0] + [0.0] * 7])
    return torch.randn(n, 10, generator=g) @ mix + 8.0 * centres[y], y


def test_lda_head_is_the_closed_form_and_beats_an_untrained_head():
    torch.manual_seed(0)
    expert = Expert("e", [4, 7, 9], {"type": "mlp", "hidden": [16]}, (10,))
    x, y_local = blobs(3000, 0)
    y = torch.tensor([4, 7, 9])[y_local]
    xt, yt_local = blobs(1000, 1)
    before = float((expert(xt).argmax(1) == yt_local).float().mean())
    refit_head_lda(expert, x, y)
    with torch.no_grad():
        after = float((expert(xt).argmax(1) == yt_local).float().mean())
        # The head is LDA on the features: logit_c = h S^-1 m_c - m_c S^-1 m_c / 2 + log prior_c.
        h = penultimate(expert.net, x).double()
        m = torch.stack([h[y_local == c].mean(0) for c in range(3)])
        z = h - m[y_local]
        s = z.t() @ z / len(h)
        s += 1e-3 * s.diagonal().mean() * torch.eye(h.shape[1], dtype=torch.float64)
        want_w = torch.linalg.solve(s, m.t()).t()
        head = last_linear(expert)
        assert torch.allclose(head.weight.double(), want_w, rtol=1e-4, atol=1e-4)
    assert before < 0.6 and after > 0.9


def test_domain_il_run_with_lda_heads_keeps_each_copy_trainable(tmp_path):
    # init_from_previous copies the features but not the refit head: a copied LDA head would make SGD diverge.
    common = [
        "--set",
        "scenario.kind=domain_incremental",
        "--set",
        "scenario.transform=permutation",
        "--set",
        "scenario.n_tasks=3",
        "--set",
        "strategy.init_from_previous=true",
    ]
    sgd = run_digits_mesh(tmp_path, "sgd", *common)
    lda = run_digits_mesh(tmp_path, "lda", *common, "--set", "strategy.head_refit=lda")
    per_task = lda["within_expert_accuracy_per_task"]
    assert min(per_task) > 80.0
    assert lda["within_expert_accuracy"] >= sgd["within_expert_accuracy"] - 1.0


def test_head_refit_with_rejection_training_is_one_clear_line(tmp_path, capsys):
    from helpers import DIGITS_MESH_RUN
    from modulemesh.cli import main

    out = tmp_path / "x"
    extra = ["--set", "strategy.head_refit=lda", "--set", "strategy.reject_weight=1.0", "--out", str(out)]
    assert main([*DIGITS_MESH_RUN, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "strategy.head_refit" in err[0] and "reject_weight: 0" in err[0]
    assert not out.exists()  # nothing written


def test_skip_head_mlp_reads_every_hidden_layer_and_saves_like_any_expert(tmp_path):
    import pytest

    from modulemesh.errors import ConfigError

    torch.manual_seed(0)
    spec = {"type": "mlp", "hidden": [6, 5], "skip_head": True}
    e = Expert("e", [0, 1, 2], spec, (10,))
    x = torch.randn(4, 10)
    with torch.no_grad():
        h1 = e.net.hidden[0](x)
        h2 = e.net.hidden[1](h1)
        assert torch.equal(penultimate(e.net, x), torch.cat([h1, h2], 1))  # what head_refit's LDA reads
    assert last_linear(e).in_features == 11
    e.compress("int8").save(tmp_path / "e")
    back = Expert.load(tmp_path / "e")
    assert torch.equal(back(x), e(x))
    with pytest.raises(ConfigError, match="skip_head"):
        Expert("bad", [0, 1], {"type": "mlp", "hidden": [4], "skip_head": "yes"}, (10,))


def test_a_larger_ridge_keeps_an_lda_head_that_int8_rounding_can_hold():
    # An untrained trunk's ReLU features are strongly correlated, so S^-1 m_c has large entries that cancel; rounded
    # to 127 levels a row loses the cancellation. Shrinking S (strategy.head_ridge) keeps the head roundable.
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    acc = {}
    for ridge in (1e-3, 1e-1):
        torch.manual_seed(0)
        e = Expert("e", list(range(10)), {"type": "mlp", "hidden": [64, 64], "skip_head": True}, (64,))
        refit_head_lda(e, x[:1400], y[:1400], ridge=ridge)
        with torch.no_grad():
            exact = float((e(x[1400:]).argmax(1) == y[1400:]).float().mean())
            rounded = float((e.compress("int8")(x[1400:]).argmax(1) == y[1400:]).float().mean())
        acc[ridge] = (exact, rounded)
    assert acc[1e-3][0] > 0.85 and acc[1e-3][1] < 0.5  # exact LDA is good; its int8 rounding is not
    assert acc[1e-1][0] > 0.85 and acc[1e-1][1] > acc[1e-1][0] - 0.03


def test_a_ridge_that_is_not_positive_is_one_clear_line(tmp_path, capsys):
    from helpers import DIGITS_MESH_RUN
    from modulemesh.cli import main

    out = tmp_path / "x"
    assert main([*DIGITS_MESH_RUN, "--set", "strategy.head_ridge=0", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "head_ridge" in err[0] and not out.exists()
