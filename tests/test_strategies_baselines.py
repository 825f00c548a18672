"""The classic baselines on the shared loop: each runs end to end and shows its defining behaviour."""

import pytest
import torch

from modulemesh.config import ExperimentConfig, load_config
from modulemesh.data.scenarios import as_float
from modulemesh.runner import build_experiment, run_experiment
from modulemesh.strategies.ewc import per_sample_fisher
from modulemesh.strategies.icarl import features, herding
from modulemesh.strategies.monolithic import add_quadratic_penalty_grad, quadratic_penalty
from modulemesh.training.evaluate import evaluate_task as evaluate
from modulemesh.training.loop import Context, Trainer

FAST = ["data.name=digits", "train.batch_size=16", "train.epochs=1", "train.lr=0.1", "strategy.buffer_size=60"]


def config(strategy, *extra):
    return load_config(ExperimentConfig, None, [*FAST, f"strategy.name={strategy}", *extra], device="cpu")


def trained(strategy, tasks=1, *extra):
    """Scenario, mesh, strategy and trainer after training the first ``tasks`` tasks."""
    cfg = config(strategy, *extra)
    scenario, mesh, s = build_experiment(cfg)
    s.setup(mesh)
    trainer = Trainer(mesh, s, cfg.train, torch.device("cpu"), seed=0)
    stats = [trainer.train_task(task, scenario) for task in scenario.tasks[:tasks]]
    return scenario, mesh, s, trainer, stats


@pytest.mark.parametrize("strategy", ["ewc", "si", "lwf", "icarl", "er", "der", "derpp"])
def test_baseline_runs_end_to_end(tmp_path, strategy):
    # lambda=90 (Mammoth, MNIST) makes SGD at lr 0.05 unstable on the 64-pixel digits: lr * 2 * lambda * F > 2
    extra = ["strategy.lambda=5"] if strategy == "ewc" else []
    cfg = config(strategy, "train.epochs=3", *extra)
    m = run_experiment(cfg, tmp_path / strategy)
    assert len(m["accuracy_matrix"]) == 5 and m["strategy"] == strategy
    assert len(m["experts"]) == 1 and all(p > 0 for p in m["params_trained_per_task"])
    assert m["accuracy_matrix"][0][0] > 75  # the first two digits are learned
    assert m["average_accuracy"] > 15  # at least what plain fine-tuning keeps (~ the last task)
    assert (tmp_path / strategy / "metrics.json").exists()


@pytest.mark.parametrize("strategy", ["ewc", "si", "icarl", "er", "der"])
def test_state_is_tensors_and_round_trips(strategy):
    _, _, s, _, _ = trained(strategy, 2)
    state = s.state_dict()
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    fresh = type(s)(s.cfg, s.scenario, s.cfg.strategy.model_extra)
    fresh.load_state_dict(state)
    again = fresh.state_dict()
    assert again.keys() == state.keys()
    for k in state:
        torch.testing.assert_close(again[k], state[k], equal_nan=True, rtol=0, atol=0)


def test_ewc_penalty_zero_at_anchor_and_quadratic_away_from_it():
    _, mesh, s, _, _ = trained("ewc", 1)
    net = mesh.experts[0].net
    assert s.fisher and all((f >= 0).all() for f in s.fisher.values())
    assert sum(float(f.sum()) for f in s.fisher.values()) > 0
    assert float(s.penalty(net).detach()) == 0.0
    direction = {k: torch.randn_like(p) * 0.01 for k, p in net.named_parameters()}
    values = []
    for scale in (1.0, 2.0):
        with torch.no_grad():
            for k, p in net.named_parameters():
                p.copy_(s.anchor[k] + scale * direction[k])
        values.append(float(s.penalty(net).detach()))
    assert values[0] > 0 and values[1] == pytest.approx(4 * values[0], rel=1e-4)


def test_penalty_gradient_added_after_backward_equals_autograd_of_the_penalty():
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    importance = {k: torch.rand_like(p) for k, p in net.named_parameters()}
    anchor = {k: p.detach() + 0.1 * torch.randn_like(p) for k, p in net.named_parameters()}
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    (torch.nn.functional.cross_entropy(net(x), y) + quadratic_penalty(net, importance, anchor, 3.0)).backward()
    expected = {k: p.grad.clone() for k, p in net.named_parameters()}
    net.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    add_quadratic_penalty_grad(net, importance, anchor, 3.0)
    for k, p in net.named_parameters():
        torch.testing.assert_close(p.grad, expected[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["linear", "conv"])  # the matmul fast path and the vmap path
def test_ewc_fisher_matches_per_example_loop(kind):
    if kind == "linear":
        net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
        x = torch.randn(7, 4)
    else:
        net = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(4, 3))
        x = torch.randn(7, 1, 4)
    y = torch.randint(0, 3, (7,))
    fisher = per_sample_fisher(net, x, y, chunk=3, weighted=True)
    expected = {k: torch.zeros_like(p) for k, p in net.named_parameters()}
    for i in range(7):
        net.zero_grad()
        ll = torch.log_softmax(net(x[i : i + 1]), 1)[0, y[i]]
        ll.backward()
        for k, p in net.named_parameters():
            expected[k] += ll.exp().detach() * p.grad.pow(2) / 7
    for k in expected:
        torch.testing.assert_close(fisher[k], expected[k], rtol=1e-4, atol=1e-7)


def test_si_importance_is_nonnegative_and_nonzero():
    _, mesh, s, _, _ = trained("si", 2)
    assert set(s.omega) == {k for k, _ in mesh.experts[0].net.named_parameters()}
    assert all((o >= 0).all() for o in s.omega.values())
    assert sum(float(o.sum()) for o in s.omega.values()) > 0
    assert float(s.penalty(mesh.experts[0].net).detach()) > 0  # task 2 moved the weights away from the anchor


def test_er_appends_replay_rows_after_the_first_task():
    scenario, _, s, trainer, stats = trained("er", 2)
    n0, n1 = (int(t.y_train.shape[0]) for t in scenario.tasks[:2])
    # The buffer is empty only at the very first step; from then on every step carries a replay minibatch.
    assert stats[0].samples == n0 + (stats[0].steps - 1) * 16
    assert stats[1].samples == n1 + stats[1].steps * 16
    assert len(s.buffer) == 60 and s.buffer.seen == n0 + n1
    assert set(s.buffer.y.tolist()) >= set(scenario.tasks[0].classes)  # old classes are kept


def test_der_stores_logits_and_derpp_replays_labels():
    scenario, mesh, s, _, stats = trained("der", 1)
    logits = s.buffer.extras["logits"]
    assert logits.shape == (60, scenario.num_classes) and logits.abs().sum() > 0
    with torch.no_grad():  # stored logits are the network's outputs when each example was seen
        now = mesh.experts[0](as_float(s.buffer.x))
    assert float((now - logits).pow(2).mean()) < float(now.pow(2).mean())
    scenario, _, _, _, stats_pp = trained("derpp", 2)
    n1 = int(scenario.tasks[1].y_train.shape[0])
    assert stats_pp[1].samples == n1 + stats_pp[1].steps * 32  # one logit and one label replay minibatch


def test_lwf_distillation_is_zero_when_the_model_equals_the_old_one():
    scenario, mesh, s, trainer, _ = trained("lwf", 1)
    task = scenario.tasks[1]
    ctx = Context(mesh, scenario, task, torch.device("cpu"), torch.Generator().manual_seed(0), 16)
    s.before_task(ctx)
    ctx.x, ctx.y, ctx.t = as_float(task.x_train[:16]), task.y_train[:16], torch.full((16,), task.id)
    ctx.n_current = 16
    ctx.out = mesh(ctx.x, None)
    assert float(s.distill(ctx).detach()) == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        mesh.experts[0].net[-1].bias[scenario.tasks[0].classes[0]] += 3.0  # shift one old class's logit
    ctx.out = mesh(ctx.x, None)
    assert float(s.distill(ctx).detach()) > 1e-4


def test_herding_picks_the_example_nearest_the_mean_first():
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    order = herding(feats, 10)
    assert len(set(order.tolist())) == 10
    assert int(order[0]) == int((feats - feats.mean(0)).norm(dim=1).argmin())
    # the herded prefix tracks the mean better than a random subset of the same size
    assert (feats[order].mean(0) - feats.mean(0)).norm() < (feats[:10].mean(0) - feats.mean(0)).norm()


def test_icarl_exemplars_are_herded_and_nme_classifies():
    scenario, mesh, s, _, _ = trained("icarl", 1, "train.epochs=3")
    task = scenario.tasks[0]
    assert sorted(s.ex_y.unique().tolist()) == task.classes
    assert all(int((s.ex_y == c).sum()) == 30 for c in task.classes)  # 60 slots / 2 classes seen
    net = mesh.experts[0].net
    for c in task.classes:
        pool = task.x_train[task.y_train == c]
        f = features(net, pool)
        nearest = int((f - f.mean(0)).norm(dim=1).argmin())
        assert torch.equal(s.ex_x[s.ex_y == c][0], pool[nearest])
    scores = s.predict_log_probs(mesh, as_float(task.x_test[:8]), None)
    assert scores.shape == (8, scenario.num_classes)
    assert set(scores.argmax(1).tolist()) <= set(task.classes)  # NME only predicts classes with exemplars
    acc, _, _ = evaluate(mesh, task, scenario, torch.device("cpu"), strategy=s)
    assert acc > 85
