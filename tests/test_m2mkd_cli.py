"""`modulemesh m2mkd` end to end on sklearn digits: report, module files, stages, workers, bad input."""

import json
import shutil

import pytest
import torch

from modulemesh.checkpoint import load_module, module_paths, read_manifest
from modulemesh.cli import main
from modulemesh.distill.m2mkd import M2MKD, M2MKDConfig
from modulemesh.distill.models import Hybrid, cut
from modulemesh.errors import CheckpointError

CONFIG = """data: {name: digits}
teacher: {spec: "vit:dim=32,depth=2,heads=2,patch=4", steps: 150, adapt_steps: 30}
meta: {steps: 100}
student: "moe_vit:dim=24,depth=2,heads=2,experts=2,k=1"
modules: 2
distill: {steps: 40}
assemble: {finetune_steps: 20}
optim: {batch_size: 64}
eval: {ood: ["rotate:30", "noise:0.5"]}
"""


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    # module-scoped: runs before conftest's per-test thread setting; results depend on it bitwise
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("m2mkd")
    (d / "m2mkd.yaml").write_text(CONFIG)
    out = d / "out"
    assert main(["m2mkd", str(d / "m2mkd.yaml"), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    return d, out


def _argv(d, out, *extra):
    return ["m2mkd", str(d / "m2mkd.yaml"), "--out", str(out), "--device", "cpu", "--quiet", *extra]


def test_report_has_all_three_arms_at_equal_steps(done):
    d, out = done
    for name in (
        "report.md",
        "report.csv",
        "report.json",
        "m2mkd.png",
        "config.yaml",
        "meta.json",
        "teacher.json",
        "student.json",
        "student.safetensors",
        "baselines/e2e.json",
        "baselines/kd.json",
    ):
        assert (out / name).exists(), name
    for i in range(2):
        assert (out / "modules" / f"module_{i}.safetensors").exists()
        assert (out / "teacher_modules" / f"module_{i}.json").exists()
    rep = json.loads((out / "report.json").read_text())
    assert {"m2mkd", "e2e", "kd", "m2mkd_assembled"} <= set(rep["arms"]) and rep["missing_arms"] == []
    steps = {a: rep["arms"][a]["student_steps"] for a in ("m2mkd", "e2e", "kd")}
    assert steps == {"m2mkd": 2 * 40 + 20, "e2e": 100, "kd": 100}
    assert rep["models"]["teacher"]["eval"]["iid"] > 0.8  # the teacher trained here actually learned digits
    for arm in ("m2mkd", "e2e", "kd"):
        ev = rep["arms"][arm]["eval"]
        assert 0.0 <= ev["iid"] <= 1.0 and set(ev["ood"]) == {"rotate:30", "noise:0.5"}
        assert rep["arms"][arm]["train_flops"] > 0
        assert rep["arms"][arm]["parameters"] == rep["arms"]["e2e"]["parameters"]
    assert rep["arms"]["kd"]["train_flops"] > rep["arms"]["e2e"]["train_flops"]  # KD also runs the teacher every step
    assert [s["stage"] for s in rep["stages"]].count("modules") == 2
    # 40 steps x 64 cover the 1,347 digits: the teacher hybrid's logits were computed once (training.teacher_logits
    # cache) and charged.
    tl = read_manifest(out / "modules" / "module_0")["train"]["teacher_logits"]
    assert tl["samples"] == 1347 and tl["flops"] > 0 and any((out / "cache").iterdir())
    assert set(rep["comparisons"]) == {"m2mkd_minus_e2e", "m2mkd_minus_kd"}
    csv_lines = (out / "report.csv").read_text().splitlines()
    assert csv_lines[0].startswith("model,student steps,IID acc (%),OOD acc (%)") and len(csv_lines) == 1 + 6
    md = (out / "report.md").read_text()
    for arm in ("m2mKD (assembled + fine-tune)", "end-to-end (same student)", "whole-model KD (same student)"):
        assert arm in md
    assert (out / "m2mkd.png").read_bytes()[:4] == b"\x89PNG"


def test_module_files_round_trip_and_rebuild_the_hybrid(done):
    d, out = done
    cfg = M2MKDConfig.model_validate({**__import__("yaml").safe_load(CONFIG)})
    run = M2MKD(cfg, out, device="cpu")
    meta, meta_m = run.load_meta()
    state, m = load_module(out / "modules" / "module_1")
    assert m["kind"] == "m2mkd_student_module" and m["index"] == 1 and m["meta_sha256"] == meta_m["sha256"]
    assert m["stitch_in"] and not m["stitch_out"]  # 32-wide meta -> 24-wide student; the last module writes logits
    student = run.build_student()
    student.parts[1].load_state_dict(state)
    x = torch.as_tensor(run.data["x_test"][:50]).float() / 255
    with torch.no_grad():
        acc = (Hybrid(cut(meta, 2), 1, student.parts[1].eval())(x).argmax(1) == run.data["y_test"][:50]).float().mean()
    assert acc > 0.2  # well above chance (0.1): the distilled module works inside the meta model
    # The teacher module keeps the teacher's weights: adapt=stitch trains only its stitches.
    t_state, t_m = load_module(out / "teacher_modules" / "module_0")
    teacher_state, _ = load_module(out / "teacher")
    for k, v in teacher_state.items():
        if k.startswith("embed.") or k.startswith("blocks.0."):
            assert torch.equal(t_state["body." + k], v)
    assert t_m["mode"] == "stitch" and "stitch_out.proj.weight" in t_state


def test_tampered_module_is_refused(done, tmp_path, capsys):
    d, out = done
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    w, _ = module_paths(copy / "modules" / "module_0")
    blob = bytearray(w.read_bytes())
    blob[-5] ^= 0xFF
    w.write_bytes(bytes(blob))
    (copy / "student.json").unlink()
    assert main(_argv(d, copy, "--stage", "assemble")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to load" in err[0] and "module_0.safetensors" in err[0]


def test_one_module_rerun_alone_reproduces_it_and_workers_match(done, tmp_path):
    d, out = done
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    ref = [(out / "modules" / f"module_{i}.safetensors").read_bytes() for i in range(2)]
    before = read_manifest(copy / "student")["sha256"]
    # Distill module 1 alone (as on another machine), then assemble: identical weights, nothing else redone.
    for f in (copy / "modules").iterdir():
        f.unlink()
    assert main(_argv(d, copy, "--stage", "modules", "--module", "1")) == 0
    assert (copy / "modules" / "module_1.safetensors").read_bytes() == ref[1]
    assert not (copy / "modules" / "module_0.json").exists()
    # Both modules in spawned worker processes (--jobs 2): bitwise the same as the in-process run.
    (copy / "modules" / "module_1.json").unlink()
    assert main(_argv(d, copy, "--stage", "modules", "--jobs", "2")) == 0
    assert [(copy / "modules" / f"module_{i}.safetensors").read_bytes() for i in range(2)] == ref
    assert main(_argv(d, copy, "--stage", "assemble")) == 0
    assert read_manifest(copy / "student")["sha256"] == before  # reused: same modules, same settings


def test_pretrained_teacher_path_and_incubation(done, tmp_path):
    d, out = done
    # A saved teacher passed by path is used as is (not retrained); its modules are incubated into a new meta model.
    o2 = tmp_path / "o2"
    args = _argv(
        d,
        o2,
        "--teacher",
        str(out / "teacher.json"),
        "--set",
        "teacher.adapt=incubate",
        "--set",
        "meta.steps=30",
        "--set",
        "teacher.adapt_steps=10",
    )
    assert main([*args, "--stage", "meta"]) == 0 and main([*args, "--stage", "teacher"]) == 0
    assert not (o2 / "teacher.json").exists()
    m = read_manifest(o2 / "teacher_modules" / "module_1")
    assert m["mode"] == "incubate" and m["teacher_sha256"] == read_manifest(out / "teacher")["sha256"]
    # With a feature loss at the boundary the teacher hybrid runs per batch (no logit cache).
    assert (
        main(
            [
                *args,
                "--stage",
                "modules",
                "--module",
                "0",
                "--set",
                "distill.feature_weight=0.5",
                "--set",
                "distill.steps=5",
            ]
        )
        == 0
    )
    sm = read_manifest(o2 / "modules" / "module_0")
    assert sm["distill"]["feature_weight"] == 0.5 and "teacher_logits" not in sm["train"] and sm["train"]["steps"] == 5
    # Deep Incubation from scratch: teacher modules trained inside the meta model, assembled, fine-tuned.
    o3 = tmp_path / "o3"
    args = _argv(
        d,
        o3,
        "--set",
        "teacher.train=incubate",
        "--set",
        "teacher.incubate_steps=20",
        "--set",
        "teacher.steps=10",
        "--set",
        "meta.steps=30",
        "--set",
        "teacher.spec=vit:dim=32,depth=2,heads=2,patch=4",
    )
    assert main([*args, "--stage", "meta"]) == 0 and main([*args, "--stage", "teacher"]) == 0
    t = read_manifest(o3 / "teacher")
    assert t["how"] == "incubate" and t["train"]["steps"] == 10
    assert read_manifest(o3 / "teacher_modules" / "module_0")["mode"] == "incubate_scratch"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--student", "transformer:dim=4"], "unknown model type 'transformer'"),
        (["--modules", "3"], "cannot cut the teacher (vit, depth 2) into 3 modules"),
        (["--teacher", "nowhere/teacher.json"], "no teacher at nowhere/teacher.json"),
        (["--set", "distill.stepz=3"], "unknown config key 'distill.stepz'"),
        (["--set", "eval.ood=[blur:1]"], "unknown OOD transform 'blur:1'"),
    ],
)
def test_bad_input_exits_2_with_one_line(done, tmp_path, capsys, extra, message):
    d, _ = done
    assert main(_argv(d, tmp_path / "bad", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_missing_upstream_stage_is_a_clear_error(done, tmp_path, capsys):
    d, _ = done
    assert main(_argv(d, tmp_path / "empty", "--stage", "modules")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no meta model at" in err[0]
    with pytest.raises(CheckpointError, match="kind m2mkd_net"):
        cfg = M2MKDConfig.model_validate(
            {**__import__("yaml").safe_load(CONFIG), "teacher": {"path": str(done[1] / "modules" / "module_0")}}
        )
        M2MKD(cfg, tmp_path / "x").check()


def test_subsets_are_fixed_and_independent(tmp_path):
    import yaml

    base = yaml.safe_load(CONFIG)
    a = M2MKD(
        M2MKDConfig.model_validate({**base, "data": {"name": "digits", "test_subset": 100}}), tmp_path / "a", seed=0
    )
    b = M2MKD(
        M2MKDConfig.model_validate({**base, "data": {"name": "digits", "test_subset": 100, "train_subset": 300}}),
        tmp_path / "b",
        seed=5,
    )
    assert a.data["n_train"] == 1347 and b.data["n_train"] == 300 and b.data["n_test"] == 100
    assert torch.equal(
        a.data["x_test"], b.data["x_test"]
    )  # the same test images whatever the training subset or run seed
    assert len(a.ood_sets) == 2 and a.ood_sets["rotate:30"].shape == a.data["x_test"].shape


def test_one_baseline_arm_trains_alone_and_matches_the_full_run(done, tmp_path):
    # benchmarks/m2mkd_practical.py measures whole-model KD by itself through run_baselines(["kd"]).
    from modulemesh.config import load_config
    from modulemesh.errors import ConfigError

    d, out = done
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "baselines")
    run = M2MKD(load_config(M2MKDConfig, d / "m2mkd.yaml", []), copy, seed=0, device="cpu")
    assert set(run.run_baselines(["kd"])) == {"kd"}
    assert not (copy / "baselines" / "e2e.json").exists()
    kd = "baselines/kd.safetensors"
    assert (copy / kd).read_bytes() == (out / kd).read_bytes()
    with pytest.raises(ConfigError, match="unknown baseline arm"):
        run.run_baselines(["e2e", "whole"])
    assert not (copy / "baselines" / "e2e.json").exists()  # checked before anything trains
