"""Upgrade a deprecated model into a new architecture and measure how much knowledge is saved.

``run_upgrade`` is the library side of ``modulemesh upgrade``: it computes the old model's Fisher,
builds the new model, transfers (``mapping.transfer``), and trains four arms for the same step
budget on the same minibatches (the seed's ablation "effect of Fisher-based parameter preservation"):

    (a) random      random init, cross-entropy
    (b) kd          random init, Hinton KD from the old model
    (c) transfer    Fisher transfer, cross-entropy
    (d) transfer_kd Fisher transfer + KD

All arms start from the same random init (so theta_random in the transfer is that init). It writes
the new model (arm d, or c without KD) as an ``Expert`` record (``OUT/new_model.json`` +
``.safetensors``: sealed, with provenance naming the old model as its parent), a report (markdown,
CSV, JSON) and a plot of accuracy vs steps. Finished arms are stored in ``OUT/arms/`` and reused
when the same upgrade is run again into the same directory. ``train_teacher`` trains and saves a
model (an Expert record too) to start from.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
from pydantic import Field

from ..config import OptimizerSection, Section, to_dict
from ..errors import ConfigError, DataError
from ..io import atomic_write_json, atomic_write_yaml, cached_json
from .upgrade_report import ARM_ORDER, results_rows, write_report

Progress = Optional[Callable[[str, int], Callable[[int], None]]]
ARMS = {
    "random": "(a) random init",
    "kd": "(b) random init + KD",
    "transfer": "(c) Fisher transfer",
    "transfer_kd": "(d) Fisher transfer + KD",
}
assert tuple(ARMS) == ARM_ORDER  # the report colours arms by this order


class TrainSection(OptimizerSection):
    steps: int = Field(300, ge=0)
    batch_size: int = Field(128, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    eval_every: int = Field(25, ge=1)
    eval_samples: Optional[int] = Field(None, ge=1)


class DistillSection(Section):
    enabled: bool = True
    alpha: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(4.0, gt=0)


class TransferSection(Section):
    beta: float = Field(1.0, ge=0, le=1)
    tau: Optional[float] = Field(None, ge=0)
    top_q: Optional[float] = Field(None, gt=0, le=1)
    fisher_kind: Literal["empirical", "true"] = "empirical"
    fisher_samples: int = Field(2000, ge=1)
    fisher_batch_size: int = Field(64, ge=1)
    # Not in the seeds: when the new model's output layer cannot be mapped (a shallower model), fit
    # it by least squares to the old model's logits on fit_samples training examples.
    fit_unmapped_output: bool = False
    fit_samples: int = Field(5000, ge=1)


class UpgradeConfig(Section):
    """``--to NEW.yaml``: the new model's backbone and how to transfer, distill and train it."""

    backbone: dict[str, Any]
    train: TrainSection = Field(default_factory=TrainSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    transfer: TransferSection = Field(default_factory=TransferSection)
    target_fraction: float = Field(0.95, gt=0, le=1)


class TeacherConfig(Section):
    """``--train-teacher SPEC.yaml``: the model to train (on --data) when --from does not exist yet."""

    backbone: dict[str, Any]
    train: TrainSection = Field(default_factory=lambda: TrainSection(steps=2000, eval_every=250))


def dataset_tensors(ds: Any, eval_samples: Optional[int] = None) -> dict[str, torch.Tensor]:
    x_tr, y_tr = torch.as_tensor(ds.x_train), torch.as_tensor(ds.y_train).long()
    x_te, y_te = torch.as_tensor(ds.x_test), torch.as_tensor(ds.y_test).long()
    if eval_samples is not None:
        x_te, y_te = x_te[:eval_samples], y_te[:eval_samples]
    return {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}


def _noop(label: str, total: int) -> Callable[[int], None]:
    return lambda step: None


def save_trained(
    path, model, backbone, ds: Any, data: dict[str, torch.Tensor], *, config, accuracy, parent=None, **extra
):
    """``save_model`` for a model trained on ``ds``: its classes, names and provenance (data fingerprint, config,
    accuracy, parent)."""
    from ..mesh.provenance import standalone_provenance
    from .train import save_model

    provenance = standalone_provenance(
        data_name=ds.name,
        classes=range(ds.num_classes),
        x_train=data["x_train"],
        y_train=data["y_train"],
        config=config,
        accuracy=accuracy,
        parent=parent,
    )
    return save_model(
        path,
        model,
        backbone,
        ds.input_shape,
        range(ds.num_classes),
        ds.class_names,
        data=ds.name,
        provenance=provenance,
        **extra,
    )


def train_teacher(
    cfg: TeacherConfig,
    ds: Any,
    path: str | Path,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Progress = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train ``cfg.backbone`` on dataset ``ds`` with cross-entropy and save it at ``path``."""
    from ..mesh.backbones import build_backbone
    from ..utils import seed_everything
    from .train import load_model, train_steps

    seed_everything(seed)
    data = dataset_tensors(ds, cfg.train.eval_samples)
    model = build_backbone(cfg.backbone, ds.input_shape, ds.num_classes).to(device)
    t = cfg.train
    start = time.perf_counter()
    curve = train_steps(
        model,
        data["x_train"],
        data["y_train"],
        steps=t.steps,
        batch_size=t.batch_size,
        lr=t.lr,
        momentum=t.momentum,
        optimizer=t.optimizer,
        weight_decay=t.weight_decay,
        seed=seed,
        eval_data=(data["x_test"], data["y_test"]),
        eval_every=t.eval_every,
        on_step=(progress or _noop)("train teacher", t.steps),
    )
    save_trained(
        path,
        model,
        cfg.backbone,
        ds,
        data,
        config={"teacher": to_dict(cfg), "seed": seed},
        accuracy=curve[-1]["accuracy"],
        role="teacher",
        test_accuracy=curve[-1]["accuracy"],
        trained_steps=t.steps,
        seed=seed,
        train=to_dict(t),
        wall_time_s=round(time.perf_counter() - start, 2),
    )
    return load_model(path, device)


def is_expert_record(path: Path) -> bool:
    """True for a finished, intact Expert record (an older version's model file is redone, not reused)."""
    from ..errors import CheckpointError
    from ..mesh.expert import Expert

    try:
        Expert.read_manifest(path)
    except CheckpointError:
        return False
    return True


def check_compatible(manifest: dict[str, Any], ds: Any, source: str) -> None:
    shape = tuple(int(s) for s in manifest["input_shape"])
    if shape != tuple(ds.input_shape):
        raise DataError(
            f"{source} was trained on inputs of shape {shape} but dataset {ds.name!r} has "
            f"{tuple(ds.input_shape)}; use the data it was trained on"
        )
    if int(manifest["num_outputs"]) != ds.num_classes:
        raise DataError(
            f"{source} predicts {manifest['num_outputs']} classes but dataset {ds.name!r} has "
            f"{ds.num_classes}; use the data it was trained on"
        )


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_upgrade(
    teacher: torch.nn.Module,
    teacher_manifest: dict[str, Any],
    cfg: UpgradeConfig,
    ds: Any,
    out_dir: str | Path,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Progress = None,
    arms: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Transfer ``teacher`` into ``cfg.backbone``, train the arms, write model + report; returns the results."""
    from ..mesh.backbones import build_backbone
    from ..mesh.provenance import parent_record
    from ..training.evaluate import accuracy_fraction
    from ..training.teacher_logits import teacher_logits
    from ..utils import seed_everything
    from .fisher import fisher_diagonal, summarize
    from .mapping import fit_output_layer, transfer
    from .train import steps_to_reach, train_steps

    out = Path(out_dir)
    progress = progress or _noop
    check_compatible(teacher_manifest, ds, "the old model")
    device = torch.device(device)
    teacher = teacher.to(device).eval()
    data = dataset_tensors(ds, cfg.train.eval_samples)
    eval_data = (data["x_test"], data["y_test"])
    teacher_acc = accuracy_fraction(teacher, *eval_data)
    target_acc = cfg.target_fraction * teacher_acc
    distill = cfg.distill.enabled
    if arms is None:
        arms = tuple(a for a in ARMS if distill or a in ("random", "transfer"))
    unknown = [a for a in arms if a not in ARMS]
    if unknown or (not distill and any(a.endswith("kd") for a in arms)):
        raise ConfigError(f"arms {list(arms)}: choose from {list(ARMS)}; the KD arms need distill.enabled: true")
    final_arm = "transfer_kd" if "transfer_kd" in arms else ("transfer" if "transfer" in arms else None)

    def fresh_student() -> torch.nn.Module:
        seed_everything(seed)
        return build_backbone(cfg.backbone, ds.input_shape, ds.num_classes).to(device)

    def transferred_student() -> tuple[torch.nn.Module, Any]:
        student = fresh_student()
        report = transfer(teacher, student, fisher, beta=tf.beta, tau=tf.tau, top_q=tf.top_q, seed=seed)
        head = report.layers[-1]
        if tf.fit_unmapped_output and head.relation in ("unmapped", "new") and report.mode == "chain":
            idx = sub_fit[: tf.fit_samples]
            fit_logits = teacher_logits(teacher, data["x_train"][idx], device=device)
            residual = fit_output_layer(student, data["x_train"][idx], fit_logits)
            head.relation = "fitted"
            head.note = (
                f"not mappable ({head.note}); fitted by least squares to the old model's logits on "
                f"{idx.numel()} "
                f"training examples (relative residual {residual:.3f})"
            )
            head.fraction_transferred, head.importance_mass_carried, head.score = 1.0, None, None
            n_head = head.target_shape[0] * (head.target_shape[1] + 1)  # weight + bias
            report.fraction_transferred += n_head / sum(p.numel() for p in student.parameters())
            report.warnings = [w for w in report.warnings if not w.startswith(f"layer {head.target}:")]
        return student, report

    fresh_student()  # a bad backbone spec fails here, before any expensive work
    # Fisher of the old model (and the optional output fit) on a fixed random subset of the training data.
    g = torch.Generator().manual_seed(seed)
    sub_fit = torch.randperm(data["x_train"].shape[0], generator=g)
    sub = sub_fit[: cfg.transfer.fisher_samples]
    tf = cfg.transfer
    t0 = time.perf_counter()
    fisher = fisher_diagonal(
        teacher,
        (data["x_train"][sub], data["y_train"][sub]),
        kind=tf.fisher_kind,
        batch_size=tf.fisher_batch_size,
        generator=torch.Generator().manual_seed(seed + 1),
        device=device,
    )
    fisher_s = time.perf_counter() - t0
    logits = (
        teacher_logits(teacher, data["x_train"], cache_dir=out / "cache", device=device)
        if any(a.endswith("kd") for a in arms)
        else None
    )

    _, transfer_report = transferred_student()
    key = _key(teacher_manifest.get("sha256"), to_dict(cfg), seed, ds.name, len(data["x_train"]), len(data["x_test"]))
    results: dict[str, Any] = {}
    tr = cfg.train
    for arm in arms:
        arm_file = out / "arms" / f"{arm}.json"
        if arm_file.exists():
            saved = cached_json(arm_file)  # harden: a damaged or foreign file counts as not cached
            if saved.get("key") == key and (arm != final_arm or is_expert_record(out / "new_model")):
                results[arm] = saved
                continue
        student = transferred_student()[0] if arm.startswith("transfer") else fresh_student()
        t0 = time.perf_counter()
        curve = train_steps(
            student,
            data["x_train"],
            data["y_train"],
            steps=tr.steps,
            batch_size=tr.batch_size,
            lr=tr.lr,
            momentum=tr.momentum,
            optimizer=tr.optimizer,
            weight_decay=tr.weight_decay,
            teacher_logits=logits if arm.endswith("kd") else None,
            alpha=cfg.distill.alpha,
            temperature=cfg.distill.temperature,
            seed=seed,
            eval_data=eval_data,
            eval_every=tr.eval_every,
            on_step=progress(ARMS[arm], tr.steps),
        )
        res = {
            "key": key,
            "arm": arm,
            "label": ARMS[arm],
            "curve": curve,
            "init_accuracy": curve[0]["accuracy"],
            "final_accuracy": curve[-1]["accuracy"],
            "best_accuracy": max(p["accuracy"] for p in curve),
            "steps_to_target": steps_to_reach(curve, target_acc),
            "wall_time_s": round(time.perf_counter() - t0, 2),
        }
        if arm == final_arm:
            save_trained(
                out / "new_model",
                student,
                cfg.backbone,
                ds,
                data,
                config={"upgrade": to_dict(cfg), "seed": seed, "arm": arm},
                accuracy=res["final_accuracy"],
                parent=parent_record(teacher_manifest, "old_model"),
                upgraded_from={"sha256": teacher_manifest.get("sha256"), "backbone": teacher_manifest.get("backbone")},
                arm=arm,
                test_accuracy=res["final_accuracy"],
                trained_steps=tr.steps,
                seed=seed,
                transfer={
                    "fraction_transferred": transfer_report.fraction_transferred,
                    "importance_mass_carried": transfer_report.importance_mass_carried,
                    "beta": tf.beta,
                    "tau": tf.tau,
                    "top_q": tf.top_q,
                },
            )
        atomic_write_json(arm_file, res)
        results[arm] = res

    summary = {
        "data": ds.name,
        "seed": seed,
        "device": str(device),
        "eval_examples": int(eval_data[0].shape[0]),
        "old_model": {
            "backbone": teacher_manifest.get("backbone"),
            "sha256": teacher_manifest.get("sha256"),
            "accuracy": teacher_acc,
            "num_parameters": sum(p.numel() for p in teacher.parameters()),
        },
        "new_model": {
            "backbone": cfg.backbone,
            "num_parameters": sum(p.numel() for p in fresh_student().parameters()),
            "path": str(out / "new_model.json") if final_arm in results else None,
        },
        "target_fraction": cfg.target_fraction,
        "target_accuracy": target_acc,
        "config": to_dict(cfg),
        "fisher": {
            "kind": tf.fisher_kind,
            "samples": int(sub.numel()),
            "seconds": round(fisher_s, 2),
            "tensors": summarize(fisher),
        },
        "transfer": transfer_report.to_dict(),
        "arms": results,
    }
    ref = results.get("kd", {}).get("steps_to_target")
    for arm, r in results.items():
        r["steps_ratio_vs_kd"] = (r["steps_to_target"] / ref) if (ref and r["steps_to_target"] is not None) else None
    write_report(out, summary, transfer_report.to_markdown())
    atomic_write_yaml(out / "config.yaml", to_dict(cfg))
    return summary


__all__ = ["UpgradeConfig", "TeacherConfig", "run_upgrade", "train_teacher", "write_report", "results_rows", "ARMS"]
