"""m2mKD building blocks: specs, cutting, stitches, hybrids, MoE routing, module-only training, folding, OOD sets."""

import pytest
import torch

from modulemesh.distill.m2mkd import OptimSection, ce_loss_fn, fit, fold_stitches, ood_transform, parse_ood
from modulemesh.distill.models import (
    Hybrid,
    MoEFeedForward,
    Stitch,
    build_modular,
    build_net,
    count_parameters,
    cut,
    looks_like_spec,
    moe_aux_loss,
    parse_spec,
    stitch_module,
)
from modulemesh.errors import ConfigError

SHAPE = (1, 8, 8)


def _x(n=6, seed=0):
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def test_parse_spec_forms_and_errors():
    a = parse_spec("moe_vit:dim=24,depth=3,heads=2,experts=3,k=2")
    b = parse_spec("{type: moe_vit, dim: 24, depth: 3, heads: 2, experts: 3, k: 2}")
    assert a == b and a["experts"] == 3 and a["mlp_ratio"] == 2.0 and a["patch"] is None
    assert looks_like_spec("vit") and looks_like_spec("{type: vit}") and not looks_like_spec("runs/x/teacher.json")
    with pytest.raises(ConfigError, match="unknown model type 'resnet'"):
        parse_spec("resnet:dim=3")
    with pytest.raises(ConfigError, match="unknown key.*experts"):
        parse_spec("vit:experts=4")
    with pytest.raises(ConfigError, match="not divisible by heads"):
        parse_spec("vit:dim=30,heads=4")
    with pytest.raises(ConfigError, match="k=3 is larger than experts=2"):
        parse_spec("moe_vit:experts=2,k=3")
    with pytest.raises(ConfigError, match="positive integer"):
        parse_spec("vit:depth=0")


def test_stitch_shapes_and_identity_init():
    s = Stitch(48, 64)
    assert s(torch.randn(3, 5, 48)).shape == (3, 5, 64)
    sq = Stitch(16, 16)
    assert torch.equal(sq.proj.weight, torch.eye(16)) and torch.equal(sq.proj.bias, torch.zeros(16))
    net = build_net(parse_spec("vit:dim=24,depth=3,heads=2,patch=4"), SHAPE, 10)
    segs = cut(net, 3)
    first, mid, last = (stitch_module(s, i, 3, 24, 32) for i, s in enumerate(segs))
    assert first.stitch_in is None and first.stitch_out.proj.weight.shape == (32, 24)
    assert mid.stitch_in.proj.weight.shape == (24, 32) and mid.stitch_out.proj.weight.shape == (32, 24)
    assert last.stitch_in is not None and last.stitch_out is None
    tokens = first(_x())
    assert tokens.shape == (6, 4, 32)  # 8x8 image, patch 4 -> 2x2 tokens, in the outer width
    assert mid(tokens).shape == (6, 4, 32) and last(tokens).shape == (6, 10)
    same = stitch_module(segs[1], 1, 3, 24, 24)
    assert same.stitch_in is None and same.stitch_out is None  # equal widths: no stitches unless asked
    assert stitch_module(segs[1], 1, 3, 24, 24, always=True).stitch_in is not None


@pytest.mark.parametrize(
    "spec", ["vit:dim=16,depth=4,heads=2,patch=4", "moe_vit:dim=16,depth=4,heads=2,experts=3,k=2,patch=3"]
)
def test_cut_recomposes_the_same_function(spec):
    torch.manual_seed(0)
    net = build_net(parse_spec(spec), SHAPE, 10).eval()
    x = _x()
    ref = net(x)
    for k in range(1, 5):
        segs = cut(net, k)
        assert [len(s.blocks) for s in segs] == [len(r) for r in _ranges(4, k)]
        h = x
        for s in segs:
            h = s(h)
        assert torch.equal(h, ref)
        # a partition: nothing shared twice, nothing lost
        assert sum(count_parameters(s) for s in segs) == count_parameters(net)
    with pytest.raises(ConfigError, match="only 4 transformer blocks"):
        cut(net, 5)


def _ranges(depth, k):
    base, extra = divmod(depth, k)
    return [range(base + (1 if i < extra else 0)) for i in range(k)]


def test_hybrid_with_the_meta_models_own_module_is_the_meta_model():
    torch.manual_seed(0)
    meta = build_net(parse_spec("vit:dim=16,depth=3,heads=2,patch=4"), SHAPE, 10).eval()
    segs = cut(meta, 3)
    x = _x()
    for i in range(3):
        out, mid = Hybrid(segs, i, segs[i])(x, boundary=True)
        assert torch.equal(out, meta(x))
        assert (mid is None) == (i == 2)


def test_moe_routes_each_token_to_k_experts_and_the_gate_learns_at_k1():
    torch.manual_seed(0)
    moe = MoEFeedForward(8, 16, experts=4, k=2)
    x = torch.randn(5, 7, 8)
    y = moe(x)
    assert y.shape == x.shape
    assert moe.last_load.sum().item() == pytest.approx(1.0)  # every token sent to exactly k experts
    assert moe.aux_loss.item() >= 0.99  # E * sum f_e P_e >= 1 up to rounding, = 1 when balanced
    # Dense reference: renormalized top-2 mixture of the experts.
    probs = torch.softmax(moe.gate(x.reshape(-1, 8)), -1)
    top = probs.topk(2, -1)
    w = torch.zeros_like(probs).scatter_(1, top.indices, top.values)
    w = w / w.sum(1, keepdim=True)
    dense = sum(w[:, e : e + 1] * moe.experts[e](x.reshape(-1, 8)) for e in range(4))
    assert torch.allclose(y.reshape(-1, 8), dense, atol=1e-6)
    one = MoEFeedForward(8, 16, experts=3, k=1)
    one(x).sum().backward()
    assert one.gate.weight.grad is not None and one.gate.weight.grad.abs().sum() > 0


def test_training_a_module_in_the_hybrid_updates_only_it_and_its_stitches():
    torch.manual_seed(0)
    meta = build_net(parse_spec("vit:dim=16,depth=2,heads=2,patch=4"), SHAPE, 10)
    for p in meta.parameters():
        p.requires_grad_(False)
    student = build_modular(parse_spec("moe_vit:dim=12,depth=2,heads=2,experts=2,k=1,patch=4"), SHAPE, 10, 2, 16)
    module, other = student.parts[1], student.parts[0]
    assert module.stitch_in is not None  # 16 -> 12
    before_meta = {k: v.clone() for k, v in meta.state_dict().items()}
    before_other = {k: v.clone() for k, v in other.state_dict().items()}
    before_mod = {k: v.clone() for k, v in module.state_dict().items()}
    hybrid = Hybrid(cut(meta, 2), 1, module)
    x, y = (_x(32) * 255).to(torch.uint8), torch.randint(0, 10, (32,))
    stats = fit(
        list(module.parameters()),
        ce_loss_fn(hybrid, 0.01),
        x,
        y,
        steps=3,
        optim=OptimSection(batch_size=8),
        lr=1e-2,
        seed=0,
        modules=[module],
    )
    assert stats["steps"] == 3 and stats["flops_per_step"] > 0
    assert all(torch.equal(v, meta.state_dict()[k]) for k, v in before_meta.items())
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before_other.items())
    changed = {k for k, v in module.state_dict().items() if not torch.equal(v, before_mod[k])}
    assert any(k.startswith("stitch_in.") for k in changed) and any(k.startswith("body.") for k in changed)
    assert moe_aux_loss(module) is not None


def test_fold_replaces_stitch_pairs_by_one_linear():
    torch.manual_seed(0)
    kept = build_modular(parse_spec("vit:dim=12,depth=3,heads=2,patch=4"), SHAPE, 10, 3, 20).eval()
    x = (_x(64) * 255).to(torch.uint8)
    folded, rep = fold_stitches(kept, x, samples=64)
    assert len(folded.links) == 2 and all(p.stitch_in is None and p.stitch_out is None for p in folded.parts)
    assert all(-1.0 < b["r2"] <= 1.0 for b in rep["boundaries"])
    assert count_parameters(folded) < count_parameters(kept)
    xf = x.float() / 255
    with torch.no_grad():
        a, b = kept(xf), folded(xf)
    # The least-squares link reproduces the kept network better than an untrained one would.
    fresh = build_modular(parse_spec("vit:dim=12,depth=3,heads=2,patch=4"), SHAPE, 10, 3, 20, layout="fold").eval()
    fresh.load_state_dict(
        {**fresh.state_dict(), **{k: v for k, v in folded.state_dict().items() if not k.startswith("links.")}}
    )
    with torch.no_grad():
        c = fresh(xf)
    assert (a - b).pow(2).mean() < (a - c).pow(2).mean()


def test_ood_transforms():
    img = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    img[:, 0, 3, 3] = 255
    assert torch.equal(ood_transform(img, "rotate:0"), img)
    assert torch.equal(ood_transform(img, "noise:0"), img)
    shifted = ood_transform(img, "shift:1")
    assert shifted[0, 0, 4, 4] == 255 and shifted[1, 0, 2, 2] == 255  # +1 then -1 pixel, alternating
    rot = ood_transform(img, "rotate:90")
    assert rot[0].sum() > 0 and not torch.equal(rot[0], img[0])
    noisy = ood_transform(img, "noise:0.3", seed=1)
    assert noisy.dtype == torch.uint8 and torch.equal(noisy, ood_transform(img, "noise:0.3", seed=1))
    with pytest.raises(ConfigError, match="unknown OOD transform"):
        parse_ood("blur:2")


def test_default_config_and_cli_teacher_path_or_spec():
    from modulemesh.distill.m2mkd import M2MKDConfig, apply_cli

    cfg = M2MKDConfig()
    assert cfg.student["type"] == "moe_vit" and cfg.teacher.spec["type"] == "vit"  # defaults are parsed like user input
    assert apply_cli([], "vit:dim=32", None, None, None) == {"teacher": {"spec": "vit:dim=32", "path": None}}
    assert apply_cli([], "runs/x/teacher.json", "vit", 3, 2) == {
        "teacher": {"path": "runs/x/teacher.json"},
        "student": "vit",
        "modules": 3,
        "jobs": 2,
    }


@pytest.mark.parametrize("shape, grid", [((3, 32, 32), (4, 4)), ((1, 10, 10), (4, 4))])
def test_color_and_odd_sized_images(shape, grid):
    net = build_net(parse_spec("moe_vit:dim=16,depth=2,heads=2,experts=2,k=1"), shape, 100)
    assert net.embed.grid == grid  # auto patch: ~4x4 tokens; 10x10 with patch 3 is zero-padded to 12x12
    x = torch.rand(3, *shape)
    h = cut(net, 2)[0](x)
    assert h.shape == (3, grid[0] * grid[1], 16) and net(x).shape == (3, 100)
