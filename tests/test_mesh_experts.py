import json

import pytest
import torch

from modulemesh.errors import CheckpointError, ModuleMeshError
from modulemesh.mesh import EntropyRouter, Expert, ExpertPool, ModuleMesh, TopKRouter, UnknownExpertError
from modulemesh.mesh.integrity import seal

SHAPE = (1, 8, 8)


def make(name="e0", classes=(0, 1, 2), spec=None):
    torch.manual_seed(0)
    return Expert(name, list(classes), spec or {"type": "mlp", "hidden": [16]}, SHAPE)


@pytest.mark.parametrize("spec", [{"type": "mlp", "hidden": [16, 8]}, {"type": "cnn", "channels": [4], "hidden": 8}])
def test_expert_save_load_round_trip(tmp_path, spec):
    e = make(spec=spec)
    e.eval()
    e.freeze()
    e.save(tmp_path / "e0")
    manifest = json.loads((tmp_path / "e0.json").read_text())
    assert manifest["classes"] == [0, 1, 2] and manifest["backbone"] == spec and len(manifest["sha256"]) == 64
    assert manifest["num_parameters"] == e.num_parameters
    back = Expert.load(tmp_path / "e0.safetensors")
    back.eval()
    x = torch.rand(3, *SHAPE)
    assert torch.equal(back(x), e(x)) and back.frozen and back.classes == [0, 1, 2]


def test_tampered_or_corrupt_expert_is_refused(tmp_path):
    make().save(tmp_path / "e0")
    blob = bytearray((tmp_path / "e0.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / "e0.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="sha256"):
        Expert.load(tmp_path / "e0")
    (tmp_path / "e0.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Expert.load(tmp_path / "e0")
    with pytest.raises(CheckpointError, match="does not exist"):
        Expert.load(tmp_path / "missing")


def test_manifest_lying_about_architecture_is_refused(tmp_path):
    make().save(tmp_path / "e0")
    m = json.loads((tmp_path / "e0.json").read_text())
    m["backbone"] = {"type": "mlp", "hidden": [32]}
    (tmp_path / "e0.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="integrity seal"):
        Expert.load(tmp_path / "e0")
    # Even with a recomputed seal (a deliberate forgery) the weights must fit the architecture.
    (tmp_path / "e0.json").write_text(json.dumps(seal(m)))
    with pytest.raises(CheckpointError, match="do not fit"):
        Expert.load(tmp_path / "e0")


def test_pool_add_remove_freeze_clone_and_unknown_names():
    pool = ExpertPool()
    pool.add(make("a"))
    pool.add(make("b", (3, 4)))
    assert pool.names == ["a", "b"] and len(pool) == 2
    pool.freeze("a")
    assert pool["a"].frozen and not pool["b"].frozen
    twin = pool.clone("b", "b2")
    assert twin is not pool["b"] and twin.classes == [3, 4]
    assert all(torch.equal(p, q) for p, q in zip(twin.parameters(), pool["b"].parameters()))
    with torch.no_grad():
        next(twin.parameters()).add_(1.0)
    assert not torch.equal(next(twin.parameters()), next(pool["b"].parameters()))  # a real copy
    pool.remove("a")
    assert pool.names == ["b", "b2"]
    with pytest.raises(UnknownExpertError, match="known experts: b, b2"):
        pool.get("a")
    with pytest.raises(ModuleMeshError, match="already"):
        pool.add(make("b"))


def test_mesh_save_load_and_remove_expert(tmp_path):
    torch.manual_seed(1)
    mesh = ModuleMesh(5, SHAPE, TopKRouter(64, k=1))
    mesh.add_expert(make("a", (0, 1)))
    mesh.add_expert(make("b", (2, 3, 4)))
    mesh.eval()
    x = torch.rand(6, *SHAPE)
    mesh.save(tmp_path / "mesh")
    back = ModuleMesh.load(tmp_path / "mesh")
    back.eval()
    assert torch.allclose(back(x).log_probs, mesh(x).log_probs)
    mesh.remove_expert("a")
    assert mesh.router.num_experts == 1 and mesh(x).weights.shape == (6, 1)
    assert mesh.covered_classes() == {2, 3, 4}


def test_single_full_expert_mesh_equals_plain_cross_entropy():
    mesh = ModuleMesh(3, SHAPE, EntropyRouter())
    e = mesh.add_expert(make("all", (0, 1, 2)))
    x, y = torch.rand(5, *SHAPE), torch.tensor([0, 1, 2, 1, 0])
    nll = torch.nn.functional.nll_loss(mesh(x).log_probs, y)
    assert torch.allclose(nll, torch.nn.functional.cross_entropy(e(x), y))
