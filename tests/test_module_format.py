"""One module format: what `upgrade` and `m2mkd` write are Expert records that Expert.load, compose,
merge and the hub take like any other expert; a tampered one is refused with one line (exit 2)."""

import json
from pathlib import Path

import pytest
import torch

from modulemesh.checkpoint import read_manifest, save_module
from modulemesh.cli import main
from modulemesh.data.datasets import load_dataset
from modulemesh.mesh import Expert, ModuleMesh
from modulemesh.mesh.backbones import build_backbone
from modulemesh.mesh.provenance import tensor_fingerprint

TEACHER = "backbone: {type: mlp, hidden: [32]}\ntrain: {steps: 150, batch_size: 64, lr: 0.1, eval_every: 150}\n"
NEW = "backbone: {type: mlp, hidden: [48, 40]}\ntrain: {steps: 20, batch_size: 64, lr: 0.05, eval_every: 20}\n"
M2MKD = """data: {name: digits}
teacher: {spec: "vit:dim=16,depth=2,heads=2,patch=4", steps: 100, adapt_steps: 10}
meta: {steps: 30}
student: "vit:dim=12,depth=2,heads=2"
modules: 2
distill: {steps: 20}
assemble: {finetune_steps: 40}
optim: {batch_size: 64, lr: 0.01}
eval: {ood: []}
"""


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def digits_train_fingerprint() -> str:
    ds = load_dataset("digits")
    return tensor_fingerprint(torch.as_tensor(ds.x_train), torch.as_tensor(ds.y_train).long())


@pytest.fixture(scope="module")
def upgraded(tmp_path_factory):
    d = tmp_path_factory.mktemp("upgrade")
    (d / "teacher.yaml").write_text(TEACHER)
    (d / "new.yaml").write_text(NEW)
    for seed in (0, 1):
        argv = ["upgrade", "--from", d / "old", "--to", d / "new.yaml", "--out", d / f"out{seed}", "--quiet"]
        argv += ["--train-teacher", d / "teacher.yaml", "--data", "digits", "--seed", seed]
        assert main([str(a) for a in argv]) == 0
    return d


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    torch.set_num_threads(1)  # module-scoped: runs before conftest's per-test thread setting
    d = tmp_path_factory.mktemp("m2mkd")
    (d / "m2mkd.yaml").write_text(M2MKD)
    assert main(["m2mkd", str(d / "m2mkd.yaml"), "--out", str(d / "out"), "--device", "cpu", "--quiet"]) == 0
    return d / "out"


def test_upgrade_output_is_an_expert_with_provenance(upgraded):
    rep = json.loads((upgraded / "out0" / "report.json").read_text())
    new = Expert.load(upgraded / "out0" / "new_model")
    old_manifest = Expert.read_manifest(upgraded / "old")  # the teacher it trained is an expert too
    assert new.classes == list(range(10)) and new.input_shape == (1, 8, 8) and new.frozen
    assert new.backbone_spec == {"type": "mlp", "hidden": [48, 40]}
    prov = new.metadata["provenance"]
    task = prov["tasks"][0]
    assert task["classes"] == list(range(10)) and task["name"] == "digits"
    assert task["data_sha256"] == digits_train_fingerprint()
    assert task["test_accuracy"] == round(rep["arms"]["transfer_kd"]["final_accuracy"], 4)
    # Its parent is the old model, named by the weights' sha256 and the manifest's seal.
    assert prov["parent"]["sha256"] == old_manifest["sha256"] == rep["old_model"]["sha256"]
    assert prov["parent"]["seal"] == old_manifest["seal"]
    assert prov["parent"]["data_sha256"] == task["data_sha256"]
    assert len(prov["config_sha256"]) == 64 and prov["library_version"]
    # Another seed: same config hash but for the seed, so the two hashes differ.
    other = Expert.read_manifest(upgraded / "out1" / "new_model")["metadata"]["provenance"]
    assert other["config_sha256"] != prov["config_sha256"] and other["config"]["seed"] == 1
    assert new.metadata["upgrade"]["arm"] == "transfer_kd" and new.metadata["data"] == "digits"


def test_upgrade_output_composes_merges_and_round_trips_a_hub(upgraded, tmp_path, capsys):
    out0, out1 = upgraded / "out0", upgraded / "out1"
    accs = [json.loads((o / "report.json").read_text())["arms"]["transfer_kd"]["final_accuracy"] for o in (out0, out1)]
    assert accs[0] > 0.8 and accs[1] > 0.8
    # compose: a one-expert mesh, evaluated on digits, scores what the upgrade report says.
    code, _ = cli(capsys, "compose", out0 / "new_model.json", "--out", tmp_path / "mesh", "--data", "digits")
    assert code == 0
    composed = json.loads((tmp_path / "mesh" / "compose.json").read_text())
    assert composed["accuracy"] == pytest.approx(100 * accs[0])
    assert ModuleMesh.load(tmp_path / "mesh").experts[0].name == "new_model"
    # merge: two upgrades of one old model (seeds 0, 1) are copies of one architecture and class set.
    sources = [out0 / "new_model.json", out1 / "new_model.json"]
    assert cli(capsys, "merge", *sources, "--out", tmp_path / "merged", "--data", "digits")[0] == 0
    merged = json.loads((tmp_path / "merged" / "merge.json").read_text())
    assert [merged["accuracy"][str(s)] for s in sources] == pytest.approx([100 * a for a in accs])
    assert Expert.load(tmp_path / "merged" / "new_model_merged").classes == list(range(10))
    # hub: publish and pull give back the same bytes, and the pulled expert computes the same logits.
    hub = tmp_path / "hub"
    assert cli(capsys, "hub", "publish", out0 / "new_model.json", hub, "--name", "digits-mlp")[0] == 0
    assert cli(capsys, "hub", "pull", "digits-mlp@1", hub, "--out", tmp_path / "pulled")[0] == 0
    for suffix in (".json", ".safetensors"):
        assert (tmp_path / "pulled" / f"new_model{suffix}").read_bytes() == (out0 / f"new_model{suffix}").read_bytes()
    x = torch.rand(16, 1, 8, 8)
    assert torch.equal(Expert.load(tmp_path / "pulled" / "new_model")(x), Expert.load(out0 / "new_model")(x))
    assert cli(capsys, "hub", "verify", tmp_path / "pulled" / "new_model.json")[0] == 0


def _copy_record(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for suffix in (".json", ".safetensors"):
        (dst / f"{src.name}{suffix}").write_bytes(src.with_name(src.name + suffix).read_bytes())
    return dst / src.name


def test_tampered_upgrade_output_is_refused_with_one_line(upgraded, tmp_path, capsys):
    weights = _copy_record(upgraded / "out0" / "new_model", tmp_path / "w")
    blob = bytearray(weights.with_suffix(".safetensors").read_bytes())
    blob[-3] ^= 0xFF
    weights.with_suffix(".safetensors").write_bytes(bytes(blob))
    edited = _copy_record(upgraded / "out0" / "new_model", tmp_path / "m")
    doc = json.loads(edited.with_suffix(".json").read_text())
    doc["classes"] = list(range(9)) + [11]  # relabel one class without re-sealing
    edited.with_suffix(".json").write_text(json.dumps(doc))
    for record, needle in ((weights, "sha256"), (edited, "seal")):
        for argv in (
            ["compose", f"{record}.json", "--out", tmp_path / "c"],
            ["hub", "publish", f"{record}.json", tmp_path / "hub"],
            ["hub", "verify", f"{record}.json"],
            ["upgrade", "--from", record, "--to", upgraded / "new.yaml", "--out", tmp_path / "u", "--quiet"],
        ):
            code, err = cli(capsys, *argv)
            assert code == 2 and len(err.splitlines()) == 1 and needle in err and "refusing" in err, (argv, err)
    assert not (tmp_path / "c").exists() and not (tmp_path / "hub").exists() and not (tmp_path / "u").exists()


def test_model_file_of_an_older_version_is_still_upgraded(upgraded, tmp_path, capsys):
    # Before the one format, upgrade wrote kind "model" (safetensors + manifest with the weights' sha256).
    old = Expert.load(upgraded / "old")
    save_module(
        tmp_path / "legacy",
        old.net.state_dict(),
        {
            "kind": "model",
            "backbone": old.backbone_spec,
            "input_shape": list(old.input_shape),
            "num_outputs": 10,
            "classes": list(range(10)),
            "data": "digits",
        },
    )
    argv = ["upgrade", "--from", tmp_path / "legacy", "--to", upgraded / "new.yaml", "--out", tmp_path / "u"]
    assert cli(capsys, *argv, "--quiet", "--no-distill")[0] == 0
    new = Expert.load(tmp_path / "u" / "new_model")
    assert new.metadata["provenance"]["parent"]["name"] == "legacy"
    assert new.metadata["provenance"]["parent"]["sha256"] == read_manifest(tmp_path / "legacy")["sha256"]


def test_m2mkd_students_are_experts_that_compose_merge_and_round_trip_a_hub(distilled, tmp_path, capsys):
    rep = json.loads((distilled / "report.json").read_text())
    teacher_sha = json.loads((distilled / "teacher.json").read_text())["sha256"]
    paths = {
        "m2mkd": distilled / "student",
        "e2e": distilled / "baselines" / "e2e",
        "kd": distilled / "baselines" / "kd",
    }
    for arm, path in paths.items():
        e = Expert.load(path)
        assert e.classes == list(range(10)) and e.input_shape == (1, 8, 8) and e.frozen
        assert e.backbone_spec["type"] == "modular" and e.backbone_spec["modules"] == 2
        assert e.metadata["m2mkd"]["arm"] == arm
        prov = e.metadata["provenance"]
        assert prov["tasks"][0]["data_sha256"] == digits_train_fingerprint()
        assert prov["tasks"][0]["test_accuracy"] == round(rep["arms"][arm]["eval"]["iid"], 4)
        # Distilled arms name the teacher they learned from; end-to-end training has no parent.
        assert (prov["parent"] or {}).get("sha256") == (None if arm == "e2e" else teacher_sha)
    # The rebuilt student is the network the report evaluated: compose + evaluate gives its accuracy.
    code, _ = cli(capsys, "compose", distilled / "student.json", "--out", tmp_path / "mesh", "--data", "digits")
    assert code == 0
    acc = json.loads((tmp_path / "mesh" / "compose.json").read_text())["accuracy"]
    assert acc == pytest.approx(100 * rep["arms"]["m2mkd"]["eval"]["iid"])
    assert acc > 30  # far above chance (10%) after a few dozen steps: the weights are the trained ones
    # Same architecture and classes: the two baselines merge (an average of unrelated nets, so only run it).
    baselines = [paths["e2e"].with_suffix(".json"), paths["kd"].with_suffix(".json")]
    assert cli(capsys, "merge", *baselines, "--out", tmp_path / "merged")[0] == 0
    # A student and an upgraded model both cover digits 0-9: compose names the clash in one line.
    code, err = cli(capsys, "compose", distilled / "student.json", *baselines[:1], "--out", tmp_path / "x")
    assert code == 2 and "class clash" in err and len(err.splitlines()) == 1
    hub = f"memory://format-{id(tmp_path)}"
    assert cli(capsys, "hub", "publish", tmp_path / "mesh", hub, "--name", "m2mkd-digits")[0] == 0
    assert cli(capsys, "hub", "pull", "m2mkd-digits", hub, "--out", tmp_path / "pulled")[0] == 0
    mine = {p.relative_to(tmp_path / "mesh") for p in (tmp_path / "mesh").rglob("*") if p.is_file()}
    got = {p.relative_to(tmp_path / "pulled") for p in (tmp_path / "pulled").rglob("*") if p.is_file()}
    assert got - {Path("hub-package.json")} == mine - {Path("compose.json")}  # the mesh, not the report beside it
    for rel in got - {Path("hub-package.json")}:
        assert (tmp_path / "pulled" / rel).read_bytes() == (tmp_path / "mesh" / rel).read_bytes(), rel
    x = torch.rand(16, 1, 8, 8)
    assert torch.equal(
        ModuleMesh.load(tmp_path / "pulled")(x).log_probs, ModuleMesh.load(tmp_path / "mesh")(x).log_probs
    )


def test_token_and_modular_backbones_rebuild_and_refuse_bad_specs():
    from modulemesh.errors import ConfigError

    net = build_backbone({"type": "vit", "dim": 8, "depth": 2, "heads": 2}, (1, 8, 8), 3)
    assert net(torch.rand(4, 64)).shape == (4, 3)  # flat rows are viewed as the declared image
    spec = {"type": "modular", "net": {"type": "moe_vit", "dim": 8, "depth": 2, "heads": 2}, "modules": 2}
    modular = build_backbone({**spec, "outer_width": 12, "layout": "keep"}, (1, 8, 8), 5)
    assert modular(torch.rand(4, 1, 8, 8)).shape == (4, 5) and modular.parts[1].stitch_in is not None
    for bad, needle in (
        ({**spec, "outer_width": 0}, "positive integers"),
        ({**spec, "outer_width": 8, "depth": 3}, "modular"),
        ({"type": "vit", "dim": 7, "heads": 2}, "not divisible"),
        ({**spec, "outer_width": 8, "layout": "glue"}, "keep or fold"),
    ):
        with pytest.raises(ConfigError, match=needle):
            build_backbone(bad, (1, 8, 8), 3)
