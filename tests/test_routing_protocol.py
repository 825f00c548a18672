"""Domain-IL trains the new expert alone; nothing the run fits or decides looks at the test split."""

import dataclasses

import torch
import torch.nn.functional as F

from modulemesh import runner
from modulemesh.config import ExperimentConfig, load_config
from modulemesh.data.scenarios import as_float
from modulemesh.mesh import ModuleMesh
from modulemesh.training.loop import Context, Trainer

DOMAIN = [
    "data.name=digits",
    "scenario.kind=domain_incremental",
    "scenario.transform=permutation",
    "scenario.n_tasks=3",
    "strategy.name=modulemesh",
    "router.type=density",
    "router.components=4",
    "train.batch_size=16",
    "expert.backbone={type: mlp, hidden: [32]}",
]


def test_domain_il_new_expert_gradient_equals_training_it_alone():
    cfg = load_config(ExperimentConfig, None, DOMAIN)
    torch.manual_seed(0)
    scenario, mesh, strategy = runner.build_experiment(cfg)
    trainer = Trainer(mesh, strategy, cfg.train, torch.device("cpu"), seed=0)
    trainer.train_task(scenario.tasks[0], scenario)  # expert0 trained, its density fit, frozen from now on
    task = scenario.tasks[1]
    ctx = Context(mesh, scenario, task, torch.device("cpu"), trainer.generator, 16)
    strategy.before_task(ctx)
    new = mesh.experts[1]
    assert mesh.experts[0].frozen and not new.frozen
    mesh.train()
    ctx.x, ctx.y, ctx.t = as_float(task.x_train[:16]), task.y_train[:16], torch.full((16,), task.id)
    ctx.n_current = 16
    strategy.before_batch(ctx)
    ctx.out = mesh(ctx.x, ctx.t)
    assert torch.equal(ctx.out.weights, F.one_hot(torch.ones(16, dtype=torch.long), 2).float())  # no frozen share
    grads = torch.autograd.grad(strategy.loss(ctx), list(new.parameters()))
    alone = torch.autograd.grad(F.cross_entropy(new(ctx.x), ctx.y), list(new.parameters()))
    for g, a in zip(grads, alone):
        assert torch.allclose(g, a, atol=1e-6)
    assert max(float(a.abs().max()) for a in alone) > 1e-3  # a real gradient, not zeros on both sides
    # The old expert's density is fit; the new one's is fit only when its task ends.
    assert mesh.router.densities[0] is not None and mesh.router.densities[1] is None


def test_replacing_the_test_split_with_noise_changes_no_fit_choice_or_policy(tmp_path, monkeypatch):
    overrides = [
        *DOMAIN,
        "scenario.transform=rotation",
        "strategy.policy=auto",
        "strategy.reuse_accuracy=90",
        "strategy.update_accuracy=40",
        "strategy.router_weight=0.5",
        "router.clusters=2",
        "router.probe_weight=5.0",  # the task probe is fit on the replay buffer: training data only
    ]
    cfg = load_config(ExperimentConfig, None, overrides)
    clean = runner.run_experiment(cfg, tmp_path / "clean")

    real_build = runner.build_scenario

    def noisy_build(*args, **kwargs):
        sc = real_build(*args, **kwargs)
        g = torch.Generator().manual_seed(1)
        sc.tasks = [
            dataclasses.replace(t, x_test=torch.rand(t.x_test.shape, generator=g).mul(255).to(t.x_test.dtype))
            for t in sc.tasks
        ]
        return sc

    monkeypatch.setattr(runner, "build_scenario", noisy_build)
    noisy = runner.run_experiment(cfg, tmp_path / "noisy")
    # Not vacuous: the noise did reach evaluation.
    assert abs(noisy["average_accuracy"] - clean["average_accuracy"]) > 20
    assert [t["report"] for t in noisy["per_task"]] == [t["report"] for t in clean["per_task"]]
    a, b = ModuleMesh.load(tmp_path / "clean" / "mesh"), ModuleMesh.load(tmp_path / "noisy" / "mesh")
    sa, sb = a.router.export_state(), b.router.export_state()
    assert "probe.weight" in sa and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for ea, eb in zip(a.experts, b.experts):
        assert all(torch.equal(v, eb.state_dict()[k]) for k, v in ea.state_dict().items())
