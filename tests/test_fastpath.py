"""The accelerator fast path, checked on the CPU: batched augmentation, mixed precision, the
deferred finiteness check, channels-last, compiled experts and in-model normalization. The CUDA
side (CUDA graphs, streaming from pinned memory, speed) is measured by benchmarks/gpu_check.sh."""

import tempfile

import pytest
import torch
import torch.nn.functional as F

from modulemesh.config import ExperimentConfig, load_config
from modulemesh.data.augment import BatchAugment, random_crop, random_flip
from modulemesh.errors import ConfigError, TrainingError
from modulemesh.mesh import Expert
from modulemesh.mesh.backbones import build_backbone
from modulemesh.runner import build_experiment, run_experiment
from modulemesh.training import fastpath
from modulemesh.training.loop import Trainer

CNN = [
    "data.name=digits",
    "train.count_flops=false",
    "strategy.name=finetune",
    "scenario.n_tasks=2",
    "train.epochs=2",
    "expert.backbone={type: cnn, channels: [8, 16], hidden: 32}",
]


def test_random_crop_takes_a_window_of_the_padded_image():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5) + 1
    g = torch.Generator().manual_seed(0)
    padded = F.pad(x, (2, 2, 2, 2))
    offsets = set()
    for _ in range(40):
        out = random_crop(x, 2, g)
        assert out.shape == x.shape
        for i in range(2):
            hits = [
                (dy, dx)
                for dy in range(5)
                for dx in range(5)
                if torch.equal(out[i], padded[i, :, dy : dy + 5, dx : dx + 5])
            ]
            assert len(hits) == 1
            offsets.add(hits[0])
    assert len(offsets) > 15  # offsets spread over the 25 possible windows
    assert torch.equal(random_crop(x, 0, g), x)


def test_random_flip_mirrors_about_half_of_the_images_and_is_seeded():
    x = torch.randn(400, 1, 4, 4)
    out = random_flip(x, torch.Generator().manual_seed(1))
    mirrored = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert bool((mirrored | kept).all()) and 150 < int(mirrored.sum()) < 250
    assert torch.equal(out, random_flip(x, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="image batches"):
        BatchAugment(2, True)(torch.randn(4, 64), torch.Generator())


def run(*extra):
    cfg = load_config(ExperimentConfig, None, [*CNN, *extra], device="cpu")
    with tempfile.TemporaryDirectory() as d:
        return run_experiment(cfg, d)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_as_well_as_fp32(amp):
    full, mixed = run(), run(f"train.amp={amp}")
    assert abs(mixed["average_accuracy"] - full["average_accuracy"]) < 5
    assert mixed["per_task"][0]["final_loss"] != full["per_task"][0]["final_loss"]  # autocast really ran


def test_fp16_hooks_see_unscaled_gradients():
    grads = {}
    for amp in ("off", "fp16"):
        cfg = load_config(ExperimentConfig, None, [*CNN, f"train.amp={amp}"], device="cpu")
        scenario, mesh, strategy = build_experiment(cfg)
        strategy.setup(mesh)
        seen = []
        strategy.after_backward = lambda ctx: seen.append(
            torch.cat([p.grad.flatten() for p in ctx.mesh.experts[0].parameters() if p.grad is not None]).norm().item()
        )
        Trainer(mesh, strategy, cfg.train, torch.device("cpu"), seed=0).train_task(scenario.tasks[0], scenario)
        grads[amp] = seen[0]
    # A hook that saw scaled gradients would read them 65,536 times too large; fp16 rounding moves
    # the first step's gradient by some ten percent.
    assert 0.5 < grads["fp16"] / grads["off"] < 2


@pytest.mark.parametrize("every,where", [(1, r"at task 0, epoch 0, step \d+;"), (4, r"one of steps \d+-\d+;")])
def test_a_nonfinite_loss_is_caught_every_n_steps(every, where):
    with pytest.raises(TrainingError, match=where):
        run("train.lr=1e30", f"train.check_finite_every={every}")


def test_channels_last_and_compiled_experts_keep_their_function_and_names():
    torch.manual_seed(0)
    expert = Expert("e", [0, 1, 2], {"type": "cnn", "channels": [4], "hidden": 8}, (3, 8, 8))
    x = torch.rand(5, 3, 8, 8)
    before, keys = expert(x), list(expert.state_dict())
    fastpath.prepare_experts([expert], channels_last=True, compile_mode="default", backend="eager")
    conv = expert.net.features[0].weight
    assert conv.is_contiguous()  # channels-last is for CUDA only (the CPU kernels crashed with it)
    torch.testing.assert_close(expert(x), before)
    if torch.cuda.is_available():
        gpu = expert.cuda()
        reference = gpu(x.cuda())
        fastpath.prepare_experts([gpu], channels_last=True, compile_mode="off")
        w = gpu.net.features[0].weight
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        torch.testing.assert_close(gpu(x.cuda()), reference, rtol=1e-4, atol=1e-4)
    assert list(expert.state_dict()) == keys  # compiled in place: saved experts look the same
    assert run("train.channels_last=true")["average_accuracy"] == pytest.approx(run()["average_accuracy"], abs=2)


def test_normalization_lives_in_the_expert_and_travels_with_it(tmp_path):
    spec = {"type": "cnn", "channels": [4], "hidden": 8, "normalize": {"mean": [0.3], "std": [0.2]}}
    torch.manual_seed(0)
    expert = Expert("e", [0, 1], spec, (1, 8, 8))
    torch.manual_seed(0)
    plain = Expert("e", [0, 1], {"type": "cnn", "channels": [4], "hidden": 8}, (1, 8, 8))
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(expert(x), plain((x - 0.3) / 0.2))
    expert.save(tmp_path / "e")
    torch.testing.assert_close(Expert.load(tmp_path / "e")(x), expert(x))
    with pytest.raises(ConfigError, match="normalize needs"):
        build_backbone({"type": "cnn", "normalize": {"mean": [0.1, 0.2], "std": [1.0, 1.0]}}, (1, 8, 8), 2)
