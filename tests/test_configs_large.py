"""The large-benchmark configs run end to end on tiny fake data in each dataset's real on-disk format.

Each config in configs/ for the seeds' large benchmarks (Split-CIFAR-100, CORe50 NC/NI, Tiny
ImageNet, DomainNet, Office-Home) is run with ``modulemesh run`` exactly as a user would, with
``--set data.root=...`` pointing at files this test writes and only sizes shrunk (images, ResNet
width, epochs, batch). The scenario shape (tasks, classes, kind) comes from the config itself.
"""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml

from modulemesh.cli import main
from modulemesh.config import ExperimentConfig, load_config
from modulemesh.errors import ConfigError
from modulemesh.runner import build_experiment
from test_data_cifar import FINE_NAMES, dump
from test_data_folders import write_image

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = [
    "--set",
    "expert.backbone.width=2",
    "--set",
    "train.epochs=1",
    "--set",
    "train.batch_size=16",
    "--set",
    "device=cpu",
    "--set",
    "strategy.buffer_size=20",
    "--quiet",
]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MODULEMESH_CACHE", str(tmp_path / "cache"))


def write_cifar100(root, per_class_train=3, per_class_test=1):
    """cifar-100-python/{train,test,meta}: every one of the 100 fine classes in both splits."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, k in (("train", per_class_train), ("test", per_class_test)):
        fine = [c for c in range(100) for _ in range(k)]
        dump(
            d / name,
            {
                b"filenames": [f"img{i}.png".encode() for i in range(len(fine))],
                b"batch_label": b"batch",
                b"fine_labels": fine,
                b"coarse_labels": [c // 5 for c in fine],
                b"data": rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8),
            },
        )
    dump(d / "meta", {b"fine_label_names": FINE_NAMES, b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    return root


def write_core50_npz(root, sessions=(1, 2, 3, 4)):
    """core50_imgs.npz + paths.pkl + labels.pkl: 50 objects, one frame per session (s3 is a test session)."""
    root.mkdir(parents=True)
    samples = [(s, o) for s in sessions for o in range(1, 51)]
    x = np.random.default_rng(1).integers(0, 256, (len(samples), 8, 8, 3), dtype=np.uint8)
    np.savez(root / "core50_imgs.npz", x=x)
    (root / "paths.pkl").write_bytes(
        pickle.dumps([f"s{s}/o{o}/C_{s:02d}_{o:02d}_000.png" for s, o in samples], protocol=2)
    )
    (root / "labels.pkl").write_bytes(pickle.dumps([o - 1 for _, o in samples], protocol=2))
    return root


def write_domain_tree(root, domains, classes, per_class=5):
    """<domain>/<class>/<i>.png: the layout of DomainNet, Office-Home and core50_128x128."""
    value = 0
    for dom in domains:
        for cls in classes:
            for i in range(per_class):
                write_image(root / dom / cls / f"{i}.png", value % 256, size=(8, 8))
                value += 3
    return root


def write_tinyimagenet(root, n_classes=200):
    """tiny-imagenet-200/: wnids.txt, words.txt, train/<wnid>/images/*.JPEG, val/images + val_annotations.txt."""
    d = root / "tiny-imagenet-200"
    wnids = [f"n{k:08d}" for k in range(n_classes)]
    d.mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (d / "words.txt").write_text("".join(f"{w}\tthing {k}\n" for k, w in enumerate(wnids)))
    lines = []
    for k, w in enumerate(wnids):
        for j in range(2):
            write_image(d / "train" / w / "images" / f"{w}_{j}.JPEG", (7 * k + j) % 256, size=(8, 8))
        write_image(d / "val" / "images" / f"val_{k}.JPEG", (7 * k) % 256, size=(8, 8))
        lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t7\t7")
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def run_config(tmp_path, config, root, *extra):
    out = tmp_path / "out"
    code = main(["run", str(CONFIGS / config), "--set", f"data.root={root}", *TINY, *extra, "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    file_cfg = yaml.safe_load((CONFIGS / config).read_text())
    # Everything but the shrunk sizes is the config's own: dataset, scenario, model type, strategy.
    assert resolved["data"]["name"] == file_cfg["data"]["name"]
    assert {k: resolved["scenario"][k] for k in file_cfg["scenario"]} == file_cfg["scenario"]
    assert (
        resolved["expert"]["backbone"]["type"] == "resnet18"
        and resolved["strategy"]["name"] == file_cfg["strategy"]["name"]
    )
    n = file_cfg["scenario"]["n_tasks"]
    assert metrics["num_tasks"] == n and len(metrics["accuracy_matrix"]) == n
    assert all(len(r) == n and all(0.0 <= a <= 100.0 for a in r) for r in metrics["accuracy_matrix"])
    assert metrics["scenario"] == file_cfg["scenario"]["kind"]
    assert all(p > 0 for p in metrics["params_trained_per_task"])  # every task trained the network
    return metrics, file_cfg


@pytest.mark.parametrize("config,tasks", [("split_cifar100_10x10.yaml", 10), ("split_cifar100_5x20.yaml", 5)])
def test_split_cifar100(tmp_path, config, tasks):
    m, cfg = run_config(tmp_path, config, write_cifar100(tmp_path / "data"), "--set", "train.eval_batch_size=64")
    assert cfg["scenario"]["n_tasks"] == tasks and m["dataset"] == "cifar100"
    # class-IL: task t holds fine classes 10t..10t+9 (10x10) or 20t.. (5x20), in the file's order
    per = 100 // tasks
    assert [p["classes"] for p in m["per_task"]] == [list(range(per * t, per * (t + 1))) for t in range(tasks)]


def test_core50_nc(tmp_path):
    m, _ = run_config(
        tmp_path, "core50_nc.yaml", write_core50_npz(tmp_path / "core50"), "--set", "data.options.image_size=8"
    )
    assert m["dataset"] == "core50"
    assert [p["classes"] for p in m["per_task"]] == [list(range(5 * t, 5 * t + 5)) for t in range(10)]


def write_core50_by_session(root, release, objects=3, frames=4):
    """A CORe50 release (11 sessions) whose every frame is a constant image of value 20 * session."""
    samples = [(s, o, i) for s in range(1, 12) for o in range(1, objects + 1) for i in range(frames)]
    if release == "folders":  # core50_128x128/s<session>/o<object>/C_<ss>_<oo>_<iii>.png
        for s, o, i in samples:
            write_image(
                root / "core50_128x128" / f"s{s}" / f"o{o}" / f"C_{s:02d}_{o:02d}_{i:03d}.png", 20 * s, size=(8, 8)
            )
    else:
        root.mkdir(parents=True)
        np.savez(root / "core50_imgs.npz", x=np.stack([np.full((8, 8, 3), 20 * s, np.uint8) for s, _, _ in samples]))
        (root / "paths.pkl").write_bytes(
            pickle.dumps([f"s{s}/o{o}/C_{s:02d}_{o:02d}_{i:03d}.png" for s, o, i in samples], protocol=2)
        )
    return root


def sessions_of(x):
    return sorted({int(v) // 20 for v in x.reshape(len(x), -1).float().mean(1).round()})


@pytest.mark.parametrize("release", ["folders", "npz"])
def test_core50_ni_standard_protocol(tmp_path, release):
    """NI (Lomonaco & Maltoni 2017): sessions 1, 2, 4, 5, 6, 8, 9, 11 are the 8 tasks, in that order; all
    frames of sessions 3, 7, 10 are one test set shared by every task."""
    root = write_core50_by_session(tmp_path / "core50", release)
    m, _ = run_config(tmp_path, "core50_ni.yaml", root, "--set", "data.options.image_size=8")
    assert m["dataset"] == "core50" and m["num_tasks"] == 8
    assert all(p["classes"] == [0, 1, 2] for p in m["per_task"])  # domain-IL: every task has all objects
    # each row of the accuracy matrix is one accuracy (on the shared test set) in every column
    R = m["accuracy_matrix"]
    assert all(len(set(row)) == 1 for row in R) and m["average_accuracy"] == pytest.approx(R[-1][0])

    cfg = load_config(ExperimentConfig, CONFIGS / "core50_ni.yaml", [f"data.root={root}", "data.options.image_size=8"])
    scenario = build_experiment(cfg)[0]
    train_sessions = [1, 2, 4, 5, 6, 8, 9, 11]
    assert [t.name for t in scenario] == [f"domain{s}" for s in train_sessions]
    for t, s in zip(scenario, train_sessions):  # task t trains (and validates) on its session only, all of it
        assert sessions_of(t.x_train) == sessions_of(t.x_val) == [s]
        assert t.num_train + len(t.y_val) == 3 * 4
    first = scenario[0]
    assert all(t.x_test is first.x_test and t.y_test is first.y_test for t in scenario)  # one shared test set
    assert sessions_of(first.x_test) == [3, 7, 10] and len(first.y_test) == 3 * 3 * 4  # every frame of s3, s7, s10


def test_core50_ni_test_groups_must_be_held_out(tmp_path):
    root = write_core50_by_session(tmp_path / "core50", "npz")
    with pytest.raises(ConfigError, match=r"group\(s\) \[4\] also have training rows"):
        build_experiment(
            load_config(
                ExperimentConfig,
                CONFIGS / "core50_ni.yaml",
                [f"data.root={root}", "data.options.image_size=8", "scenario.test_groups=[3,4,7,10]"],
            )
        )
    with pytest.raises(ConfigError, match=r"set scenario.n_tasks=8"):
        build_experiment(
            load_config(
                ExperimentConfig,
                CONFIGS / "core50_ni.yaml",
                [f"data.root={root}", "data.options.image_size=8", "scenario.n_tasks=11"],
            )
        )


def test_tinyimagenet(tmp_path):
    m, _ = run_config(
        tmp_path, "tinyimagenet.yaml", write_tinyimagenet(tmp_path / "tiny"), "--set", "data.options.image_size=8"
    )
    assert m["dataset"] == "tinyimagenet"
    assert [len(p["classes"]) for p in m["per_task"]] == [20] * 10


@pytest.mark.parametrize(
    "config,domains",
    [
        ("domainnet.yaml", ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]),
        ("officehome.yaml", ["Art", "Clipart", "Product", "Real_World"]),
    ],
)
def test_domain_benchmarks(tmp_path, config, domains):
    root = write_domain_tree(tmp_path / "dom", domains, ["bike", "cup"])
    m, _ = run_config(tmp_path, config, root, "--set", "data.options.image_size=8")
    assert len(m["per_task"]) == len(domains) and all(p["classes"] == [0, 1] for p in m["per_task"])


def test_large_configs_name_their_missing_root(tmp_path):
    """Without --set data.root the run stops with a usage error instead of downloading anything."""
    for config in ("split_cifar100_10x10.yaml", "core50_nc.yaml", "tinyimagenet.yaml", "domainnet.yaml"):
        assert main(["run", str(CONFIGS / config), *TINY, "--out", str(tmp_path / config)]) == 2
