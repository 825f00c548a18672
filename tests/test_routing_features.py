"""Feature-space density routing: a frozen extractor from a saved mesh, expert or weights file."""

import json

import torch

from modulemesh.cli import main
from modulemesh.mesh import ModuleMesh, build_router
from modulemesh.mesh.backbones import build_backbone
from modulemesh.mesh.features import FeatureDensityRouter, trunk

DIGITS = ["--quiet", "--set", "data.name=digits", "--set", "train.batch_size=16", "--set", "train.epochs=2"]
CNN = "expert.backbone={type: cnn, channels: [8, 16], hidden: 32}"


def test_class_il_in_a_saved_mesh_feature_space_saves_and_loads(tmp_path):
    # A feature extractor: one CNN trained jointly on all digits (one task).
    assert (
        main(
            [
                "run",
                *DIGITS,
                "--set",
                "strategy.name=joint",
                "--set",
                "scenario.n_tasks=1",
                "--set",
                CNN,
                "--out",
                str(tmp_path / "pre"),
            ]
        )
        == 0
    )
    out = tmp_path / "feat"
    assert (
        main(
            [
                "run",
                *DIGITS,
                "--set",
                "strategy.name=modulemesh",
                "--set",
                "router.type=density",
                "--set",
                f"router.features={tmp_path / 'pre' / 'mesh'}",
                "--set",
                "router.components=4",
                "--set",
                "expert.backbone={type: mlp, hidden: [32]}",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["task_id_accuracy"] > 85  # the pretrained features separate the tasks
    mesh = ModuleMesh.load(out / "mesh")
    assert isinstance(mesh.router, FeatureDensityRouter)
    assert mesh.router.densities[0][0]["mean"].shape == (32,)  # densities live in the 32-d feature space
    assert not any(p.requires_grad for p in mesh.router.features.parameters())
    pre = ModuleMesh.load(tmp_path / "pre" / "mesh")
    x = torch.rand(5, 1, 8, 8) * 16
    assert torch.allclose(mesh.router.embed(x), trunk(pre.experts[0].net)(x), atol=1e-5)


def test_user_weights_file_and_bad_sources(tmp_path, capsys):
    torch.manual_seed(0)
    net = build_backbone({"type": "cnn", "channels": [8, 16], "hidden": 32}, (1, 8, 8), 10)
    torch.save(net.state_dict(), tmp_path / "backbone.pt")
    r = build_router(
        "density",
        (1, 8, 8),
        features=str(tmp_path / "backbone.pt"),
        features_backbone={"type": "cnn", "channels": [8, 16], "hidden": 32},
    )
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(r.embed(x), trunk(net)(x), atol=1e-6)
    rc = main(
        [
            "run",
            *DIGITS,
            "--set",
            "router.type=density",
            "--set",
            f"router.features={tmp_path / 'nope.pt'}",
            "--out",
            str(tmp_path / "bad"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "router.features" in err and "Traceback" not in err
    rc = main(
        [
            "run",
            *DIGITS,
            "--set",
            "router.type=density",
            "--set",
            f"router.features={tmp_path / 'backbone.pt'}",
            "--out",
            str(tmp_path / "bad2"),
        ]
    )
    assert rc == 2 and "router.features_backbone" in capsys.readouterr().err
