"""Cross-architecture transfer: unit selection, function-preserving growth, identity depth, reports."""

import pytest
import torch

from modulemesh.errors import ModuleMeshError
from modulemesh.mesh.backbones import build_backbone
from modulemesh.preserve.fisher import fisher_diagonal
from modulemesh.preserve.mapping import layer_chain, transfer

SHAPE = (1, 8, 8)


def mlp(hidden, seed=0):
    torch.manual_seed(seed)
    return build_backbone({"type": "mlp", "hidden": hidden}, SHAPE, 10)


def cnn(channels, hidden, seed=0):
    torch.manual_seed(seed)
    m = build_backbone({"type": "cnn", "channels": channels, "hidden": hidden}, SHAPE, 10)
    with torch.no_grad():  # non-trivial BatchNorm parameters and statistics
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
    return m


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


X = torch.rand(50, *SHAPE)
Y = torch.randint(0, 10, (50,))


def test_same_architecture_copies_everything():
    src, tgt = mlp([16, 12]), mlp([16, 12], seed=1)
    report = transfer(src, tgt, fisher_diagonal(src, (X, Y)))
    for (k, a), b in zip(src.state_dict().items(), tgt.state_dict().values()):
        assert torch.equal(a, b), k
    assert report.fraction_transferred == 1.0 and report.importance_mass_carried == pytest.approx(1.0)
    assert [r.relation for r in report.layers] == ["copied"] * 3


def test_narrower_keeps_the_most_important_units_and_stays_connected():
    src, tgt = mlp([6, 5]), mlp([3, 2], seed=1)
    fisher = {k: torch.full_like(v, 1e-6) for k, v in src.named_parameters()}
    fisher["1.weight"][[4, 1, 5]] = 1.0  # hidden-1 units 1, 4, 5 are the important ones
    fisher["3.weight"][[0, 3]] = 1.0  # hidden-2 units 0 and 3
    report = transfer(src, tgt, fisher)
    w1, w2, w3 = src[1].weight, src[3].weight, src[5].weight
    assert torch.equal(tgt[1].weight, w1[[1, 4, 5]]) and torch.equal(tgt[1].bias, src[1].bias[[1, 4, 5]])
    assert torch.equal(tgt[3].weight, w2[[0, 3]][:, [1, 4, 5]])  # columns follow the units kept below
    assert torch.equal(tgt[5].weight, w3[:, [0, 3]]) and torch.equal(tgt[5].bias, src[5].bias)
    rel = {r.target: r for r in report.layers}
    assert rel["1"].relation == "narrowed" and rel["1"].source_shape == [6, 64] and rel["1"].target_shape == [3, 64]
    assert 0.99 < rel["1"].importance_mass_carried < 1.0  # the dropped rows held almost no Fisher mass
    assert rel["5"].fraction_transferred == 1.0 and rel["5"].relation == "narrowed"


def test_wider_is_function_preserving_and_breaks_replica_symmetry():
    src, tgt = mlp([8, 6]), mlp([20, 15], seed=3)
    report = transfer(src, tgt, fisher_diagonal(src, (X, Y)), seed=0)
    assert torch.allclose(outputs(src, X), outputs(tgt, X), atol=1e-5)
    assert [r.relation for r in report.layers] == ["widened", "widened", "widened"]
    assert report.importance_mass_carried == pytest.approx(1.0)
    # Replicas copy incoming rows but split outgoing columns unevenly.
    rows = tgt[1].weight
    assert torch.equal(rows[:8], src[1].weight)
    dup = {j: i for i in range(8) for j in range(8, 20) if torch.equal(rows[i], rows[j])}
    assert sorted(dup) == list(range(8, 20)), "every extra unit must replicate an existing one"
    j = min(dup)
    i = dup[j]
    assert not torch.allclose(tgt[3].weight[:, i], tgt[3].weight[:, j])


def test_wider_cnn_is_function_preserving():
    src, tgt = cnn([3, 4], 8), cnn([5, 7], 12, seed=2)
    transfer(src, tgt, fisher_diagonal(src, (X, Y)))
    assert torch.allclose(outputs(src, X), outputs(tgt, X), atol=1e-5)
    assert torch.equal(tgt.features[1].running_var[:3], src.features[1].running_var)


def test_deeper_identity_layers_preserve_outputs():
    src, tgt = mlp([8, 6]), mlp([8, 6, 6, 6], seed=4)
    report = transfer(src, tgt, fisher_diagonal(src, (X, Y)))
    assert torch.allclose(outputs(src, X), outputs(tgt, X), atol=1e-6)
    assert [r.relation for r in report.layers] == ["copied", "copied", "identity", "identity", "copied"]
    assert torch.equal(tgt[5].weight, torch.eye(6))
    # wider and deeper at once
    tgt2 = mlp([16, 12, 20], seed=5)
    transfer(src, tgt2, fisher_diagonal(src, (X, Y)))
    assert torch.allclose(outputs(src, X), outputs(tgt2, X), atol=1e-5)


def test_beta_mixes_with_the_random_init_and_tau_filters():
    src, tgt = mlp([8]), mlp([8], seed=7)
    random_init = {k: v.clone() for k, v in tgt.state_dict().items()}
    fisher = fisher_diagonal(src, (X, Y))
    transfer(src, tgt, fisher, beta=0.25)
    for k, v in tgt.state_dict().items():
        assert torch.allclose(v, 0.25 * src.state_dict()[k] + 0.75 * random_init[k], atol=1e-6), k
    tgt = mlp([8], seed=7)
    tau = float(fisher["1.weight"].median())
    report = transfer(src, tgt, fisher, tau=tau)
    keep = fisher["1.weight"] > tau
    assert torch.equal(tgt[1].weight[keep], src[1].weight[keep])
    assert torch.equal(tgt[1].weight[~keep], random_init["1.weight"][~keep])
    assert report.layers[0].fraction_transferred < 0.6
    assert report.importance_mass_carried < 1.0
    tgt = mlp([8], seed=7)
    report = transfer(src, tgt, fisher, top_q=0.1)
    assert report.fraction_transferred == pytest.approx(0.1, abs=0.01)
    with pytest.raises(ModuleMeshError, match="beta"):
        transfer(src, mlp([8]), fisher, beta=1.5)
    with pytest.raises(ModuleMeshError, match="either tau"):
        transfer(src, mlp([8]), fisher, tau=0.1, top_q=0.5)


def test_conv_into_linear_is_reported_not_skipped():
    src, tgt = cnn([3, 4], 8), mlp([16], seed=1)
    before = {k: v.clone() for k, v in tgt.state_dict().items()}
    report = transfer(src, tgt, fisher_diagonal(src, (X, Y)))
    assert [r.relation for r in report.layers] == ["unmapped", "unmapped"]
    assert "features" in report.layers[0].note and "raw input" in report.layers[0].note
    assert any("features.0" in w and "no counterpart" in w for w in report.warnings)
    assert report.fraction_transferred == 0.0
    assert all(torch.equal(v, before[k]) for k, v in tgt.state_dict().items())
    assert "unmapped" in report.to_markdown()


def test_shallower_and_deeper_cnn_report_what_cannot_map():
    src, tgt = mlp([8, 8, 8]), mlp([8], seed=1)
    report = transfer(src, tgt, fisher_diagonal(src, (X, Y)))
    assert [r.relation for r in report.layers] == ["copied", "unmapped"]
    assert sum("no counterpart" in w for w in report.warnings) == 2
    src, tgt = cnn([3, 4], 8), cnn([3, 4, 4], 8, seed=1)
    report = transfer(src, tgt, fisher_diagonal(src, (X, Y)))
    assert [r.relation for r in report.layers] == ["copied", "copied", "new", "unmapped", "unmapped"]


def test_mismatched_outputs_and_non_chain_models():
    with pytest.raises(ModuleMeshError, match="outputs"):
        transfer(mlp([4]), build_backbone({"type": "mlp", "hidden": [4]}, SHAPE, 3))
    torch.manual_seed(0)
    a = build_backbone({"type": "resnet18", "width": 4}, SHAPE, 10)
    b = build_backbone({"type": "resnet18", "width": 8}, SHAPE, 10)
    assert layer_chain(a) is None
    report = transfer(a, b)
    assert report.mode == "by-name" and report.warnings  # width change of a ResNet is listed, not silently skipped
    assert any(r.relation == "copied" for r in report.layers) and any(r.relation == "unmapped" for r in report.layers)
    assert torch.equal(b.fc.bias, a.fc.bias)


def test_a_new_expert_can_start_from_an_old_expert():
    from modulemesh.mesh.expert import Expert

    torch.manual_seed(0)
    old = Expert("old", [3, 5, 7], {"type": "mlp", "hidden": [10]}, SHAPE)
    new = Expert("new", [3, 5, 7], {"type": "mlp", "hidden": [14, 12]}, SHAPE)
    y3 = torch.randint(0, 3, (50,))
    fisher = fisher_diagonal(old, (X, y3))
    assert "net.1.weight" in fisher
    report = transfer(old, new, fisher)
    assert [r.relation for r in report.layers] == ["widened", "identity", "widened"]
    assert torch.allclose(outputs(old, X), outputs(new, X), atol=1e-5)


def test_fit_output_layer_recovers_a_linear_head():
    from modulemesh.preserve.mapping import fit_output_layer

    torch.manual_seed(0)
    model = mlp([12])
    head = torch.nn.Linear(12, 10)
    with torch.no_grad():
        feats = torch.relu(model[1](X.flatten(1)))
        logits = head(feats) + 5.0  # a per-row shift is irrelevant to the softmax
    residual = fit_output_layer(model, X, logits, ridge=0.0)
    assert residual < 1e-8
    centred = logits - logits.mean(1, keepdim=True)
    assert torch.allclose(outputs(model, X), centred, atol=1e-4)
    with pytest.raises(ModuleMeshError, match="teacher_logits"):
        fit_output_layer(model, X, logits[:, :3])
