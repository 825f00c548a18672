"""Issue 15.3: a saved mesh is one sealed whole; every edit by hand is refused with one line naming the file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modulemesh.errors import CheckpointError
from modulemesh.mesh import DensityRouter, EntropyRouter, Expert, ModuleMesh


def density_mesh(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    mesh = ModuleMesh(4, (6,), DensityRouter(components=2))
    for i, classes in enumerate(([0, 1], [2, 3])):
        mesh.add_expert(Expert(f"e{i}", classes, {"type": "mlp", "hidden": [8]}, (6,))).freeze()
        x = torch.randn(40, 6) + 3 * i
        mesh.router.fit_expert(i, x, torch.tensor(classes).repeat(20))
    mesh.save(tmp_path / "mesh")
    return tmp_path / "mesh"


def edit_json(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc, indent=2))


CASES = {
    "classes": ("experts/e0.json", lambda d: d.__setitem__("classes", [0, 3])),
    "frozen": ("experts/e0.json", lambda d: d.__setitem__("frozen", 0)),
    "num_classes": ("mesh.json", lambda d: d.__setitem__("num_classes", 19)),
    "router temperature (router.json)": ("router.json", lambda d: d.__setitem__("temperature", 0.01)),
    "router temperature (mesh.json)": ("mesh.json", lambda d: d["router"].__setitem__("temperature", 0.01)),
    "renamed key": ("mesh.json", lambda d: d.__setitem__("expert_names", d.pop("experts"))),
    "expert order": ("mesh.json", lambda d: d.__setitem__("experts", d["experts"][::-1])),
}


def test_round_trip_keeps_routing_and_predictions(tmp_path):
    d = density_mesh(tmp_path)
    mesh = ModuleMesh.load(d)
    again = ModuleMesh.load(d)
    x = torch.randn(16, 6) + 3
    assert torch.equal(mesh(x).log_probs, again(x).log_probs)
    assert all(e.frozen for e in mesh.experts)
    meta = ModuleMesh.read_manifest(d)
    assert set(meta["files"]) == {"router.json", "experts/e0.json", "experts/e1.json"} and len(meta["seal"]) == 64


@pytest.mark.parametrize("case", CASES)
def test_hand_edits_are_refused_naming_the_file(tmp_path, case):
    d = density_mesh(tmp_path)
    rel, change = CASES[case]
    edit_json(d / rel, change)
    with pytest.raises(CheckpointError) as err:
        ModuleMesh.load(d)
    msg = str(err.value)
    assert "\n" not in msg and rel.split("/")[-1] in msg


def test_binary_garbage_and_flipped_weights_are_refused(tmp_path):
    d = density_mesh(tmp_path)
    raw = (d / "mesh.json").read_bytes()
    (d / "mesh.json").write_bytes(raw[:10] + b"\xff" + raw[11:])
    with pytest.raises(CheckpointError, match="mesh.json is not UTF-8"):
        ModuleMesh.load(d)
    (d / "mesh.json").write_bytes(raw)
    w = bytearray((d / "experts" / "e1.safetensors").read_bytes())
    w[-1] ^= 0xFF
    (d / "experts" / "e1.safetensors").write_bytes(bytes(w))
    with pytest.raises(CheckpointError, match="e1.safetensors"):
        ModuleMesh.load(d)


def test_an_unlisted_missing_expert_file_is_named(tmp_path):
    d = density_mesh(tmp_path)
    (d / "experts" / "e1.json").unlink()
    with pytest.raises(CheckpointError, match="e1.json .*missing"):
        ModuleMesh.load(d)


def test_each_expert_record_carries_its_own_router_state(tmp_path):
    d = density_mesh(tmp_path)
    mesh = ModuleMesh.load(d)
    e1 = Expert.load(d / "experts" / "e1")
    info, state = e1.router_state
    assert info == {"type": "density", "fitted": True}
    assert torch.equal(state["class0.mean"], mesh.router.densities[1][0]["mean"])
    entropy = ModuleMesh(4, (6,), EntropyRouter())
    entropy.add_expert(Expert("e", [0, 1], {"type": "mlp", "hidden": [8]}, (6,)))
    entropy.save(tmp_path / "m2")
    assert Expert.load(tmp_path / "m2" / "experts" / "e").router_state == ({"type": "entropy", "fitted": False}, {})


def test_resume_from_a_tampered_checkpoint_exits_2_with_one_line(tmp_path):
    cli = [
        sys.executable,
        "-m",
        "modulemesh.cli",
        "run",
        "configs/split_digits.yaml",
        "--quiet",
        "--out",
        str(tmp_path / "r"),
        "--set",
        "strategy.name=modulemesh",
        "--set",
        "router.type=density",
        "--set",
        "scenario.n_tasks=2",
        "--set",
        "train.epochs=1",
    ]
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run(cli, cwd=root, capture_output=True).returncode == 0
    ckpt = tmp_path / "r" / "checkpoint"
    progress = json.loads((ckpt / "progress.json").read_text())
    progress["completed_tasks"], progress["accuracy_matrix"], progress["per_task"] = (
        1,
        progress["accuracy_matrix"][:1],
        progress["per_task"][:1],
    )
    (ckpt / "progress.json").write_text(json.dumps(progress))
    edit_json(ckpt / progress["dir"] / "mesh" / "experts" / "expert0.json", lambda d: d.__setitem__("classes", [0, 7]))
    done = subprocess.run(cli, cwd=root, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "expert0.json" in lines[0] and "Traceback" not in done.stderr
