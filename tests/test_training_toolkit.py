"""The shared training toolkit: fit (and its vmapped many-client form), evaluate, the optimizer factory."""

import math

import pytest
import torch
import torch.nn.functional as F

from modulemesh.errors import DataError, ModuleMeshError, TrainingError
from modulemesh.training.evaluate import accuracy, accuracy_fraction, count_correct
from modulemesh.training.fit import TensorBatches, batch_order, fit, fit_stacked, sgd_update
from modulemesh.training.optim import OptimizerSpec, make_optimizer, warmup_cosine


def data(n=40, d=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, (x[:, :c].argmax(1))


def test_fit_is_exactly_a_plain_sgd_loop_over_seeded_batches():
    x, y = data()
    torch.manual_seed(0)
    a = torch.nn.Linear(5, 3)
    b = torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    res = fit(
        a,
        lambda xb, yb, idx: F.cross_entropy(a(xb), yb),
        (x, y),
        steps=7,
        batch_size=8,
        seed=3,
        optimizer=OptimizerSpec("sgd", lr=0.1, momentum=0.9),
    )
    opt = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    order = batch_order(40, 7, 8, 3)
    for idx in order:
        loss = F.cross_entropy(b(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert res.steps == 7 and not res.stopped_early
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    # every row is used once per epoch: 7 x 8 = 56 rows = one full permutation of 40 + 16
    assert sorted(order.reshape(-1)[:40].tolist()) == list(range(40))


def test_fit_stops_early_counts_flops_and_schedules_the_lr():
    x, y = data()
    model = torch.nn.Linear(5, 3)
    seen_lr = []
    spec = OptimizerSpec("adamw", lr=0.01, weight_decay=0.1, schedule="warmup_cosine", warmup=0.25, grad_clip=1.0)

    def loss_fn(xb, yb, idx):
        return F.cross_entropy(model(xb), yb)

    def on_step(step, loss):
        seen_lr.append(step)
        return step == 5

    res = fit(
        model,
        loss_fn,
        (x, y),
        steps=8,
        batch_size=10,
        optimizer=spec,
        count_flops=True,
        on_step=on_step,
        modules=[model],
    )
    assert res.steps == 5 and res.stopped_early and seen_lr == [1, 2, 3, 4, 5]
    # forward + backward of a 10x5 @ 5x3 linear layer: 2*10*5*3 forward, twice that backward
    assert (
        res.flops_per_step == pytest.approx(3 * 2 * 10 * 5 * 3, rel=0.35) and res.train_flops == 5 * res.flops_per_step
    )
    assert not model.training  # modules are left in eval mode
    f = warmup_cosine(8, 0.25)
    assert [f(0), f(1)] == [0.5, 1.0] and f(2) == 1.0 and f(7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)))


def test_fit_rejects_bad_input_with_clear_errors():
    x, y = data()
    frozen = torch.nn.Linear(5, 3).requires_grad_(False)
    with pytest.raises(TrainingError, match="frozen"):
        fit(frozen, lambda *b: frozen(b[0]).sum(), (x, y), steps=2, optimizer=OptimizerSpec())
    with pytest.raises(DataError, match="one label per input"):
        TensorBatches(x, y[:3], 2, 4, 0)
    model = torch.nn.Linear(5, 3)
    with pytest.raises(TrainingError, match="loss became nan at step 1; lower the learning rate"):
        fit(model, lambda xb, yb, idx: model(xb).sum() * float("nan"), (x, y), steps=2, optimizer=OptimizerSpec())


def test_fit_stacked_trains_each_client_like_its_own_sgd_loop():
    torch.manual_seed(0)
    k, n, d, c = 3, 12, 4, 2
    xs, ys = torch.randn(k, n, d), torch.randint(0, c, (k, n))
    w0 = torch.randn(k, c, d) * 0.1
    steps = torch.tensor([5, 2, 0])
    mask = None

    def loss_fn(p, xb, yb):
        return F.cross_entropy(xb @ p["w"].T, yb)

    def batch_fn(t):
        idx = torch.arange(t % 3 * 4, t % 3 * 4 + 4)
        return xs[:, idx], ys[:, idx]

    sq = {"w": torch.zeros_like(w0)}
    out, _ = fit_stacked({"w": w0}, loss_fn, batch_fn, steps, lr=0.5, momentum=0.9, sq_grads=sq, mask=mask)
    assert torch.equal(out["w"][2], w0[2]) and (sq["w"][2] == 0).all()  # a client with no steps is untouched
    for j in range(2):
        w = w0[j].clone().requires_grad_(True)
        opt = torch.optim.SGD([w], lr=0.5, momentum=0.9)
        for t in range(int(steps[j])):
            xb, yb = batch_fn(t)
            opt.zero_grad()
            F.cross_entropy(xb[j] @ w.T, yb[j]).backward()
            opt.step()
        torch.testing.assert_close(out["w"][j], w.detach(), rtol=1e-5, atol=1e-6)
    # a mask of zeros freezes a member entirely
    frozen, _ = fit_stacked({"w": w0}, loss_fn, batch_fn, steps, lr=0.5, mask=torch.tensor([1.0, 0.0, 1.0]))
    assert torch.equal(frozen["w"][1], w0[1]) and not torch.equal(frozen["w"][0], w0[0])


def test_sgd_update_in_place_path_gives_the_same_numbers_as_the_formula():
    # without momentum a fresh gradient is scaled in place (no stack-sized temporary); the numbers must be
    # bit-identical to ``p - lr * a * g``, and a non-contiguous gradient (a view) must not be written to
    torch.manual_seed(0)
    p = {"w": torch.randn(4, 3, 5), "v": torch.randn(4, 5, 3)}
    g = {"w": torch.randn(4, 3, 5), "v": torch.randn(4, 3, 5).transpose(1, 2)}
    a = torch.tensor([1.0, 0.0, 0.3, 1.7])
    want = {n: p[n] - 0.1 * a.view(4, 1, 1) * g[n] for n in p}
    g_view = g["v"].clone()
    sgd_update(p, {n: t if n == "v" else t.clone() for n, t in g.items()}, 0.1, a)
    assert all(torch.equal(p[n], want[n]) for n in p)
    assert torch.equal(g["v"], g_view)


def test_evaluate_reports_percent_and_counts_across_batch_boundaries():
    x = torch.eye(4).repeat(3, 1)  # 12 rows
    y = torch.tensor([0, 1, 2, 3] * 3)
    y[[1, 6]] = 0  # two rows the identity "model" gets wrong
    model = torch.nn.Identity()
    model.register_parameter("p", torch.nn.Parameter(torch.zeros(1)))
    assert count_correct(model, x, y, batch_size=5) == 10
    assert accuracy(model, x, y, batch_size=5) == pytest.approx(100 * 10 / 12)
    assert accuracy_fraction(model, x, y, batch_size=7) == 10 / 12
    with pytest.raises(DataError, match="empty"):
        accuracy(model, x[:0], y[:0])


def test_optimizer_factory():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = make_optimizer(net.parameters(), "adamw", lr=0.1, weight_decay=0.05)
    decay, no_decay = opt.param_groups
    assert [p.dim() for p in decay["params"]] == [2] and decay["weight_decay"] == 0.05
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
    assert isinstance(make_optimizer(net.parameters(), "adam"), torch.optim.Adam)
    with pytest.raises(ModuleMeshError, match="unknown optimizer 'lbfgs'; use sgd, adam or adamw"):
        make_optimizer(net.parameters(), "lbfgs")
