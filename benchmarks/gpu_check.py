"""GPU check: every command on the device, Trainer vs a bare loop, and the fast path's speed.

Writes a synthetic set in CIFAR-100's on-disk layout (learnable: each class is a fixed random
32x32 template plus noise), then
1. runs `run`, `compare`, `federate` (fedavg, modules, distill), `upgrade` and `m2mkd` with
   ``--device DEVICE`` in subprocesses and counts failures and tracebacks;
2. times ResNet-18 (32x32) steps through the Trainer and through the textbook loop at batch 32
   and 128 (same model, batches and optimizer, alternating, median of repeats);
3. trains the same ResNet-18 with the plain fp32 loop and with the fast path (bf16 autocast,
   channels-last, compiled experts with CUDA graphs) at batch 128: samples/s after warm-up, and
   test accuracy after the same epochs from the same seed.
Results go to benchmarks/results/gpu.md (naming the device) and OUT/gpu.json.

    python benchmarks/gpu_check.py --device cuda            # on the GPU machine (about 6 minutes on an H200)
    python benchmarks/gpu_check.py --device cpu --small     # a smoke run of the same steps (no file in results/)
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modulemesh.config import ExperimentConfig, load_config
from modulemesh.data.scenarios import as_float
from modulemesh.io import atomic_write_json
from modulemesh.mesh import ModuleMesh, OracleRouter, build_backbone
from modulemesh.runner import build_experiment
from modulemesh.strategies import build_strategy
from modulemesh.training.loop import Trainer, batch_bounds

ROOT = Path(__file__).resolve().parent.parent


def write_cifar100(root: Path, per_class_train: int, per_class_test: int, seed: int = 0) -> Path:
    """CIFAR-100's python layout (cifar-100-python/{train,test,meta}) with learnable images."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, (100, 3072)).astype(np.float32)
    for name, per in (("train", per_class_train), ("test", per_class_test)):
        labels = np.repeat(np.arange(100), per)
        noise = rng.normal(0, 60, (len(labels), 3072)).astype(np.float32)
        data = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
        blob = {
            b"data": data,
            b"fine_labels": labels.tolist(),
            b"coarse_labels": (labels // 5).tolist(),
            b"filenames": [f"{i}.png".encode() for i in range(len(labels))],
            b"batch_label": name.encode(),
        }
        (d / name).write_bytes(pickle.dumps(blob, protocol=2))
    names = {
        b"fine_label_names": [f"c{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"s{i}".encode() for i in range(20)],
    }
    (d / "meta").write_bytes(pickle.dumps(names, protocol=2))
    return root


def commands(device: str, data: Path, out: Path, small: bool) -> list[tuple[str, list[str]]]:
    cifar = [
        "--set",
        f"data.root={data}",
        "--set",
        "train.epochs=1",
        "--set",
        "scenario.n_tasks=2",
        "--set",
        "train.batch_size=128",
    ]
    if small:
        cifar += ["--set", "expert.backbone.width=8"]
    mnistish = ["configs/federate_digits.yaml", "--device", device, "--rounds", "2"]
    return [
        (
            "run (CIFAR-100 config, DER)",
            [
                "run",
                "configs/split_cifar100_10x10.yaml",
                *cifar,
                "--device",
                device,
                "--out",
                str(out / "run"),
                "--quiet",
            ],
        ),
        (
            "run (fast path)",
            [
                "run",
                "configs/split_cifar100_10x10.yaml",
                *cifar,
                "--device",
                device,
                "--set",
                "train.amp=bf16",
                "--set",
                "train.channels_last=true",
                "--out",
                str(out / "run_fast"),
                "--quiet",
            ],
        ),
        (
            "compare",
            [
                "compare",
                "configs/split_digits.yaml",
                "--strategies",
                "finetune,der,modulemesh",
                "--seeds",
                "1",
                "--device",
                device,
                "--out",
                str(out / "compare"),
            ],
        ),
        ("federate fedavg", ["federate", *mnistish, "--mode", "fedavg", "--out", str(out / "fedavg")]),
        ("federate modules", ["federate", *mnistish, "--mode", "modules", "--out", str(out / "modules")]),
        ("federate distill", ["federate", *mnistish, "--mode", "distill", "--out", str(out / "distill")]),
        (
            "upgrade",
            [
                "upgrade",
                "--from",
                str(out / "old"),
                "--train-teacher",
                "configs/upgrade_teacher_mlp.yaml",
                "--to",
                "configs/upgrade_mlp_wider_deeper.yaml",
                "--data",
                "digits",
                "--steps",
                "50",
                "--set",
                "train.eval_every=25",
                "--device",
                device,
                "--out",
                str(out / "upgrade"),
                "--quiet",
            ],
        ),
        (
            "m2mkd",
            [
                "m2mkd",
                "configs/m2mkd_mnist.yaml",
                "--set",
                "data.name=digits",
                "--device",
                device,
                *[
                    a
                    for k in ("teacher.steps", "meta.steps", "distill.steps", "assemble.finetune_steps")
                    for a in ("--set", f"{k}={20 if small else 200}")
                ],
                "--out",
                str(out / "m2mkd"),
                "--quiet",
            ],
        ),
    ]


def run_commands(device: str, data: Path, out: Path, small: bool) -> list[dict]:
    rows = []
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for label, argv in commands(device, data, out, small):
        start = time.perf_counter()
        p = subprocess.run(
            [sys.executable, "-m", "modulemesh.cli", *argv],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        err = p.stderr.strip().splitlines()
        rows.append(
            {
                "command": label,
                "exit_code": p.returncode,
                "seconds": time.perf_counter() - start,
                "traceback": "Traceback" in p.stderr,
                "last_line": err[-1][:160] if err and p.returncode else "",
            }
        )
        print(rows[-1], flush=True)
    return rows


WIDTH = {"value": 64}  # --small: 8, so a CPU smoke run takes minutes


def resnet_scenario(data: Path, batch: int, extra=()):
    cfg = load_config(
        ExperimentConfig,
        None,
        [
            "data.name=cifar100",
            f"data.root={data}",
            "strategy.name=finetune",
            "scenario.n_tasks=1",
            "scenario.val_fraction=0",
            "train.count_flops=false",
            f"train.batch_size={batch}",
            "train.lr=0.03",
            f"expert.backbone={{type: resnet18, width: {WIDTH['value']}}}",
            *extra,
        ],
    )
    scenario, _, _ = build_experiment(cfg)
    return cfg, scenario


def new_mesh(cfg, scenario, device):
    mesh = ModuleMesh(scenario.num_classes, scenario.input_shape, OracleRouter())
    strategy = build_strategy(cfg, scenario)
    strategy.setup(mesh)
    return mesh.to(device), strategy


def trainer_epoch(cfg, scenario, device) -> float:
    torch.manual_seed(0)
    mesh, strategy = new_mesh(cfg, scenario, device)
    return Trainer(mesh, strategy, cfg.train, device, seed=0).train_task(scenario[0], scenario).train_time_s


def bare_epoch(cfg, scenario, device) -> float:
    torch.manual_seed(0)
    task = scenario[0]
    model = build_backbone(cfg.expert.backbone, scenario.input_shape, scenario.num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
    x, y = task.x_train.to(device), task.y_train.to(device)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).to(device)
    start = time.perf_counter()
    for b, e in batch_bounds(len(y), cfg.train.batch_size):
        idx = order[b:e]
        loss = F.cross_entropy(model(as_float(x[idx])), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def overhead(data: Path, device, repeats: int) -> list[dict]:
    rows = []
    for batch in (32, 128):
        cfg, scenario = resnet_scenario(data, batch)
        n = len(scenario[0].y_train)
        trainer_epoch(cfg, scenario, device), bare_epoch(cfg, scenario, device)  # warm-up (cudnn autotune, allocator)
        t, b = [], []
        for _ in range(repeats):  # alternate so drift hits both alike
            t.append(trainer_epoch(cfg, scenario, device))
            b.append(bare_epoch(cfg, scenario, device))
        rows.append(
            {
                "batch": batch,
                "samples": n,
                "trainer_samples_per_s": n / statistics.median(t),
                "bare_samples_per_s": n / statistics.median(b),
                "ratio": statistics.median(t) / statistics.median(b),
            }
        )
        print(rows[-1], flush=True)
    return rows


def accuracy(mesh, task, device) -> float:
    mesh.eval()
    with torch.no_grad():
        pred = torch.cat(
            [
                mesh(as_float(task.x_test[i : i + 1024].to(device))).log_probs.argmax(1).cpu()
                for i in range(0, len(task.y_test), 1024)
            ]
        )
    return 100.0 * float((pred == task.y_test).float().mean())


def fast_path(data: Path, device, epochs: int, small: bool) -> list[dict]:
    arms = {"fp32": [], "fast path": ["train.amp=bf16", "train.channels_last=true"]}
    if device.type == "cuda":
        arms["fast path"].append("train.compile=reduce-overhead")
    rows = []
    for label, extra in arms.items():
        cfg, scenario = resnet_scenario(data, 128, [f"train.epochs={epochs}", *extra])
        torch.manual_seed(0)
        mesh, strategy = new_mesh(cfg, scenario, device)
        trainer = Trainer(mesh, strategy, cfg.train, device, seed=0)
        start = time.perf_counter()
        stats = trainer.train_task(scenario[0], scenario)
        total = time.perf_counter() - start
        # Steady state: one more epoch after warm-up (compilation, graph capture) on the trained model.
        cfg.train.epochs = 1
        trainer.cfg = cfg.train
        steady = trainer.train_task(scenario[0], scenario)
        rows.append(
            {
                "arm": label,
                "settings": " ".join(extra) or "fp32, NCHW, eager",
                "samples_per_s": steady.samples / steady.train_time_s,
                "first_epochs_s": total,
                "accuracy": accuracy(mesh, scenario[0], device),
                "epochs": epochs + 1,
                "first_epoch_loss": stats.final_loss,
            }
        )
        print(rows[-1], flush=True)
    return rows


def report(device, cmd_rows, over_rows, fast_rows) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        f"Device: **{name}** (torch {torch.__version__}). Synthetic 100-class set in CIFAR-100's on-disk layout.",
        "",
        "| command | exit code | traceback | seconds | last line |",
        "|---|---:|---|---:|---|",
    ]
    lines += [
        f"| {r['command']} | {r['exit_code']} | {'yes' if r['traceback'] else 'no'} | {r['seconds']:.0f} | "
        f"{r['last_line']} |"
        for r in cmd_rows
    ]
    lines += [
        "",
        "Trainer vs the textbook loop, ResNet-18 (32x32), one epoch, median of repeats (goal <= 1.05x):",
        "",
        "| batch | Trainer (samples/s) | bare loop (samples/s) | time ratio |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['batch']} | {r['trainer_samples_per_s']:,.0f} | {r['bare_samples_per_s']:,.0f} | {r['ratio']:.3f} |"
        for r in over_rows
    ]
    base = fast_rows[0]["samples_per_s"]
    lines += [
        "",
        "Fast path at batch 128, steady-state samples/s after warm-up (goal >= 2x fp32) and test accuracy "
        "after the same epochs from the same seed:",
        "",
        "| arm | settings | samples/s | speed-up | accuracy (%) |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['arm']} | {r['settings']} | {r['samples_per_s']:,.0f} | {r['samples_per_s'] / base:.2f}x | "
        f"{r['accuracy']:.1f} |"
        for r in fast_rows
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="/tmp/modulemesh_gpu_check")
    ap.add_argument("--small", action="store_true", help="tiny sizes: a smoke run of every step")
    ap.add_argument("--skip-commands", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    out = Path(args.out)
    if args.small:
        WIDTH["value"] = 8
    data = write_cifar100(out / "data", 5 if args.small else 100, 2 if args.small else 20)
    cmd_rows = [] if args.skip_commands else run_commands(args.device, data, out / "cmd", args.small)
    over_rows = overhead(data, device, 1 if args.small else 3)
    fast_rows = fast_path(data, device, 1 if args.small else 4, args.small)
    body = report(device, cmd_rows, over_rows, fast_rows)
    print(body)
    atomic_write_json(out / "gpu.json", {"commands": cmd_rows, "overhead": over_rows, "fast_path": fast_rows})
    if device.type == "cuda" and not args.small:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from publish import publish

        publish("gpu", "GPU check", body)


if __name__ == "__main__":
    main()
