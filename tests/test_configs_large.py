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
from test_data_cifar import FINE_NAMES, dump
from test_data_folders import write_image

from modulemesh.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["--set", "expert.backbone.width=2", "--set", "train.epochs=1", "--set", "train.batch_size=16",
        "--set", "device=cpu", "--set", "strategy.buffer_size=20", "--quiet"]


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
        dump(d / name, {b"filenames": [f"img{i}.png".encode() for i in range(len(fine))], b"batch_label": b"batch",
                        b"fine_labels": fine, b"coarse_labels": [c // 5 for c in fine],
                        b"data": rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8)})
    dump(d / "meta", {b"fine_label_names": FINE_NAMES, b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    return root


def write_core50_npz(root, sessions=(1, 2, 3, 4)):
    """core50_imgs.npz + paths.pkl + labels.pkl: 50 objects, one frame per session (s3 is a test session)."""
    root.mkdir(parents=True)
    samples = [(s, o) for s in sessions for o in range(1, 51)]
    x = np.random.default_rng(1).integers(0, 256, (len(samples), 8, 8, 3), dtype=np.uint8)
    np.savez(root / "core50_imgs.npz", x=x)
    (root / "paths.pkl").write_bytes(pickle.dumps([f"s{s}/o{o}/C_{s:02d}_{o:02d}_000.png" for s, o in samples], protocol=2))
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
    assert resolved["expert"]["backbone"]["type"] == "resnet18" and resolved["strategy"]["name"] == file_cfg["strategy"]["name"]
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
    m, _ = run_config(tmp_path, "core50_nc.yaml", write_core50_npz(tmp_path / "core50"), "--set", "data.options.image_size=8")
    assert m["dataset"] == "core50"
    assert [p["classes"] for p in m["per_task"]] == [list(range(5 * t, 5 * t + 5)) for t in range(10)]


def test_core50_ni_sessions_are_tasks(tmp_path):
    root = write_domain_tree(tmp_path / "core50_128x128", [f"s{s}" for s in range(1, 12)], ["o1", "o2", "o3"])
    m, _ = run_config(tmp_path, "core50_ni.yaml", root, "--set", "data.options.image_size=8")
    assert len(m["per_task"]) == 11 and all(p["classes"] == [0, 1, 2] for p in m["per_task"])  # domain-IL: all objects


def test_tinyimagenet(tmp_path):
    m, _ = run_config(tmp_path, "tinyimagenet.yaml", write_tinyimagenet(tmp_path / "tiny"), "--set", "data.options.image_size=8")
    assert m["dataset"] == "tinyimagenet"
    assert [len(p["classes"]) for p in m["per_task"]] == [20] * 10


@pytest.mark.parametrize("config,domains", [
    ("domainnet.yaml", ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]),
    ("officehome.yaml", ["Art", "Clipart", "Product", "Real_World"]),
])
def test_domain_benchmarks(tmp_path, config, domains):
    root = write_domain_tree(tmp_path / "dom", domains, ["bike", "cup"])
    m, _ = run_config(tmp_path, config, root, "--set", "data.options.image_size=8")
    assert len(m["per_task"]) == len(domains) and all(p["classes"] == [0, 1] for p in m["per_task"])


def test_large_configs_name_their_missing_root(tmp_path):
    """Without --set data.root the run stops with a usage error instead of downloading anything."""
    for config in ("split_cifar100_10x10.yaml", "core50_nc.yaml", "tinyimagenet.yaml", "domainnet.yaml"):
        assert main(["run", str(CONFIGS / config), *TINY, "--out", str(tmp_path / config)]) == 2
