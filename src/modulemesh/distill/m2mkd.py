"""Module-to-module knowledge distillation (m2mKD, arXiv 2402.16918) on top of Deep Incubation (arXiv 2212.04129).

A monolithic teacher becomes a modular student, module by module:

1. ``meta``: a small token network with K blocks (one per slot) is trained end to end on the task.
2. ``teacher``: the teacher (a saved token net, or one trained here from a spec) is cut into K
   modules. Each teacher module is fitted into the frozen meta model, ``meta[:i] + teacher_i +
   meta[i+1:]``: its stitches only (``adapt: stitch``), the module itself (``adapt: incubate``) or
   not at all (``adapt: none``). With ``teacher.train: incubate`` the teacher itself is built by Deep
   Incubation: modules trained from scratch inside the meta model, assembled, fine-tuned.
3. ``modules``: student module i (with LayerNorm + Linear stitches where widths differ) is trained
   inside ``meta[:i] + student_i + meta[i+1:]`` to match the teacher hybrid's logits (``kd_loss``),
   optionally plus an MSE at the module boundary. Only the student module and its stitches update.
   The K jobs are independent: ``jobs > 1`` runs them in spawned worker processes; each writes its
   module as a file (safetensors + manifest) that can be copied to another machine.
4. ``assemble``: the K student modules (stitches kept, or folded into one Linear per boundary) form
   the student, followed by a short end-to-end fine-tune.

``baselines`` trains the same network end to end (cross-entropy) and with whole-model KD from the
teacher, each for the student steps that m2mKD used: ``K * distill.steps + assemble.finetune_steps``.
``report`` evaluates every arm on the test set and on shifted copies of it (OOD), with FLOPs and
wall time per stage (see ``m2mkd_report``). Every stage reuses its output when it exists with the
same inputs (a hash in its manifest), so stages can run separately, on different machines, from
the same output directory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from ..checkpoint import load_module, module_paths, read_manifest, save_module
from ..config import Section, to_dict
from ..errors import CheckpointError, ConfigError, DataError, TrainingError
from .models import (
    Hybrid, ModularNet, Stitch, StitchedModule, TokenNet, build_modular, build_net, check_spec, count_parameters, cut,
    looks_like_spec, moe_aux_loss, parse_spec, resolve_spec, stitch_module, token_grid,
)
from ..training.evaluate import accuracy_fraction as accuracy
from ..training.fit import fit as train_for_steps
from ..training.optim import OptimizerSpec
from ..training.pool import WorkerPool, report

Progress = Optional[Callable[[str, int], Callable[[int], None]]]
Log = Optional[Callable[[str], None]]
NET_KIND = "m2mkd_net"
TEACHER_MODULE_KIND = "m2mkd_teacher_module"
STUDENT_MODULE_KIND = "m2mkd_student_module"
STUDENT_KIND = "m2mkd_student"
STAGES = ("meta", "teacher", "modules", "assemble", "baselines", "report")
ARMS = {"m2mkd": "m2mKD", "e2e": "end-to-end", "kd": "whole-model KD"}


# ----------------------------------------------------------------------------- config


def _spec_field(v: Any) -> dict[str, Any]:
    return parse_spec(v)


class DataSection(Section):
    name: str = "mnist"
    root: Optional[str] = None
    options: dict[str, Any] = Field(default_factory=dict)
    train_subset: Optional[int] = Field(None, ge=1, description="random training subset (same for every seed)")
    test_subset: Optional[int] = Field(None, ge=1)
    subset_seed: int = 0


class OptimSection(Section):
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of each phase's steps with linear warm-up")
    grad_clip: float = Field(1.0, ge=0, description="0 = no clipping")
    aux_weight: float = Field(0.01, ge=0, description="weight of the MoE load-balancing loss")


class TeacherSection(Section):
    spec: Union[str, dict[str, Any]] = Field("vit:dim=64,depth=4,heads=4", validate_default=True)
    path: Optional[str] = None
    train: Literal["end_to_end", "incubate"] = "end_to_end"
    steps: int = Field(1500, ge=0, description="end-to-end steps (or fine-tune steps after incubation)")
    incubate_steps: int = Field(400, ge=1, description="steps per module with train: incubate")
    adapt: Literal["none", "stitch", "incubate"] = "stitch"
    adapt_steps: int = Field(200, ge=0)

    @field_validator("spec")
    @classmethod
    def _spec(cls, v: Any) -> dict[str, Any]:
        return _spec_field(v)


class MetaSection(Section):
    dim: Optional[int] = Field(None, ge=1, description="default: the teacher's width")
    heads: Optional[int] = Field(None, ge=1)
    mlp_ratio: float = Field(2.0, gt=0)
    steps: int = Field(600, ge=0)


class DistillSection(Section):
    steps: int = Field(300, ge=0, description="steps per student module")
    alpha: float = Field(0.5, ge=0, le=1, description="kd_loss weight of the hard-label term")
    temperature: float = Field(4.0, gt=0)
    feature_weight: float = Field(0.0, ge=0, description="MSE at the module boundary (in meta width)")
    lr: Optional[float] = Field(None, gt=0)


class AssembleSection(Section):
    stitches: Literal["keep", "fold"] = "keep"
    finetune_steps: int = Field(300, ge=0)
    lr: Optional[float] = Field(None, gt=0, description="default: half of optim.lr")
    loss: Literal["ce", "kd"] = "ce"
    fold_samples: int = Field(512, ge=1)


class BaselineSection(Section):
    enabled: bool = True
    steps: Optional[int] = Field(None, ge=0, description="default: the student steps m2mKD used")


class EvalSection(Section):
    ood: list[str] = Field(default_factory=lambda: ["rotate:30", "noise:0.5"])
    batch_size: int = Field(1024, ge=1)


class M2MKDConfig(Section):
    """``modulemesh m2mkd CONFIG``: data, teacher, meta model, student, and how to train each stage."""

    data: DataSection = Field(default_factory=DataSection)
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    meta: MetaSection = Field(default_factory=MetaSection)
    student: Union[str, dict[str, Any]] = Field("moe_vit:dim=48,depth=4,heads=4,experts=4,k=2", validate_default=True)
    modules: int = Field(2, ge=1)
    distill: DistillSection = Field(default_factory=DistillSection)
    assemble: AssembleSection = Field(default_factory=AssembleSection)
    baselines: BaselineSection = Field(default_factory=BaselineSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    jobs: int = Field(1, ge=1)

    @field_validator("student")
    @classmethod
    def _student(cls, v: Any) -> dict[str, Any]:
        return _spec_field(v)

    @field_validator("eval")
    @classmethod
    def _ood(cls, v: EvalSection) -> EvalSection:
        for name in v.ood:
            parse_ood(name)
        return v


def apply_cli(cfg_overrides: list[str], teacher: Optional[str], student: Optional[str], modules: Optional[int], jobs: Optional[int]) -> dict[str, Any]:
    """Keyword fields for ``load_config`` from the command-line flags (``--teacher`` may be a path or a spec)."""
    fields: dict[str, Any] = {}
    if teacher is not None:
        fields["teacher"] = {"spec": teacher, "path": None} if looks_like_spec(teacher) else {"path": teacher}
    if student is not None:
        fields["student"] = student
    if modules is not None:
        fields["modules"] = modules
    if jobs is not None:
        fields["jobs"] = jobs
    return fields


# ----------------------------------------------------------------------------- OOD sets


def parse_ood(name: str) -> tuple[str, float]:
    kind, _, arg = str(name).partition(":")
    kinds = {"rotate": 30.0, "noise": 0.5, "shift": 3.0}
    if kind not in kinds:
        raise ConfigError(f"unknown OOD transform {name!r}; use rotate:DEGREES, noise:STD or shift:PIXELS")
    try:
        value = float(arg) if arg else kinds[kind]
    except ValueError:
        raise ConfigError(f"OOD transform {name!r}: {arg!r} is not a number") from None
    if value < 0:
        raise ConfigError(f"OOD transform {name!r}: the amount must be >= 0")
    return kind, value


def ood_transform(x: torch.Tensor, name: str, seed: int = 0) -> torch.Tensor:
    """A shifted copy of uint8 images (N, C, H, W): ``rotate:D`` (+D / -D alternately), ``noise:S``
    (Gaussian noise of std S on [0, 1] pixels) or ``shift:P`` (translated by P pixels, alternating
    directions: +P right and down for even rows of the batch). Deterministic for a given seed; the result is uint8 again."""
    kind, amount = parse_ood(name)
    if x.dim() != 4:
        raise DataError(f"OOD transform {name!r} needs image data (N, C, H, W); got shape {tuple(x.shape)}")
    xf = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    n = x.shape[0]
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    if kind == "noise":
        g = torch.Generator().manual_seed(seed)
        out = xf + amount * torch.randn(xf.shape, generator=g)
    else:
        theta = torch.zeros(n, 2, 3)
        if kind == "rotate":
            a = torch.deg2rad(torch.tensor(amount)) * sign
            theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
        else:
            theta[:, 0, 0] = theta[:, 1, 1] = 1.0
            theta[:, 0, 2] = -sign * 2.0 * amount / x.shape[-1]  # the grid says where to sample from: -shift
            theta[:, 1, 2] = -sign * 2.0 * amount / x.shape[-2]
        grid = F.affine_grid(theta, list(xf.shape), align_corners=False)
        out = F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out.clamp(0, 1) * 255.0).round().to(torch.uint8)


# ----------------------------------------------------------------------------- training pieces


def as_float(x: torch.Tensor) -> torch.Tensor:
    from ..data.scenarios import as_float as _as_float

    return _as_float(x)


def inference_flops(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs per sample of one forward pass (torch.utils.flop_counter), measured on the batch ``x``."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(as_float(x))
    model.train(was)
    return fc.get_total_flops() / max(1, x.shape[0])


def fit(
    params: Sequence[nn.Parameter],
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    optim: OptimSection,
    lr: float,
    seed: int,
    modules: Sequence[nn.Module] = (),
    on_step: Optional[Callable[[int], None]] = None,
) -> dict[str, Any]:
    """``training.fit`` with m2mKD's recipe: AdamW, linear warm-up + cosine decay, clipping, for ``steps`` minibatches of (x, y).

    ``loss_fn(xb, yb, idx)`` returns the loss (``idx``: the batch's rows of x, for cached teacher
    logits). The first batch is also run once under ``FlopCounterMode`` to measure FLOPs per step
    (forward + backward), its gradients discarded. Returns steps, seconds, flops_per_step,
    train_flops and the mean loss of the last tenth.
    """
    spec = OptimizerSpec("adamw", lr, weight_decay=optim.weight_decay, schedule="warmup_cosine", warmup=optim.warmup,
                         grad_clip=optim.grad_clip)
    result = train_for_steps(params, loss_fn, (x, y), steps=steps, optimizer=spec, batch_size=optim.batch_size, seed=seed,
                             modules=modules, count_flops=True, on_step=(lambda step, loss: on_step(step)) if on_step else None,
                             lr_hint="optim.lr")
    stats = result.as_dict()
    del stats["stopped_early"]
    return stats


def ce_loss_fn(model: nn.Module, aux_weight: float) -> Callable[..., torch.Tensor]:
    def loss(xb: torch.Tensor, yb: torch.Tensor, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = F.cross_entropy(model(xb), yb)
        aux = moe_aux_loss(model)
        return out + aux_weight * aux if (aux is not None and aux_weight > 0) else out

    return loss


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _noop_progress(label: str, total: int) -> Callable[[int], None]:
    return lambda step: None


# ----------------------------------------------------------------------------- the pipeline


class M2MKD:
    """One m2mKD experiment in an output directory; each stage is a method (see the module doc).

    ``progress(label, total)`` returns a per-step callback (rich bars in the CLI); ``log(text)``
    prints a status line. Both default to silence.
    """

    def __init__(self, cfg: M2MKDConfig, out: str | os.PathLike, seed: int = 0, device: str | torch.device = "cpu",
                 progress: Progress = None, log: Log = None, cache_dir: str | os.PathLike | None = None):
        self.cfg, self.out, self.seed = cfg, Path(out), int(seed)
        self.cache_dir = Path(cache_dir) if cache_dir else self.out / "cache"
        self.device = torch.device(device)
        self.progress = progress or _noop_progress
        self.log = log or (lambda text: None)
        self._data: Optional[dict[str, Any]] = None
        self.K = cfg.modules

    # ------------------------------------------------------------------ paths

    @property
    def meta_path(self) -> Path:
        return self.out / "meta"

    @property
    def teacher_path(self) -> Path:
        return Path(self.cfg.teacher.path) if self.cfg.teacher.path else self.out / "teacher"

    def teacher_module_path(self, i: int) -> Path:
        return self.out / "teacher_modules" / f"module_{i}"

    def student_module_path(self, i: int) -> Path:
        return self.out / "modules" / f"module_{i}"

    @property
    def student_path(self) -> Path:
        return self.out / "student"

    def baseline_path(self, arm: str) -> Path:
        return self.out / "baselines" / arm

    # ------------------------------------------------------------------ data and specs

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            self._data = self._load_data()
        return self._data

    def _load_data(self) -> dict[str, Any]:
        from ..data.datasets import load_dataset

        d = self.cfg.data
        ds = load_dataset(d.name, d.root, **d.options)
        x_tr, y_tr = torch.as_tensor(ds.x_train), torch.as_tensor(ds.y_train).long()
        x_te, y_te = torch.as_tensor(ds.x_test), torch.as_tensor(ds.y_test).long()
        # Each subset has its own generator, so the test subset does not depend on train_subset.
        if d.train_subset is not None and d.train_subset < x_tr.shape[0]:
            idx = torch.randperm(x_tr.shape[0], generator=torch.Generator().manual_seed(d.subset_seed))[: d.train_subset].sort().values
            x_tr, y_tr = x_tr[idx], y_tr[idx]
        if d.test_subset is not None and d.test_subset < x_te.shape[0]:
            idx = torch.randperm(x_te.shape[0], generator=torch.Generator().manual_seed(d.subset_seed))[: d.test_subset].sort().values
            x_te, y_te = x_te[idx], y_te[idx]
        if x_tr.dim() != 4:
            raise DataError(f"m2mkd needs image data (N, C, H, W); dataset {ds.name!r} has samples of shape {tuple(x_tr.shape[1:])}")
        dev = self.device
        return {"name": ds.name, "input_shape": tuple(int(s) for s in x_tr.shape[1:]), "num_classes": ds.num_classes,
                "class_names": list(ds.class_names), "x_train": x_tr.to(dev), "y_train": y_tr.to(dev),
                "x_test": x_te, "y_test": y_te, "n_train": int(x_tr.shape[0]), "n_test": int(x_te.shape[0])}

    @property
    def ood_sets(self) -> dict[str, torch.Tensor]:
        """Shifted copies of the test set, one per ``eval.ood`` entry (built on first use)."""
        d = self.data
        if "ood" not in d:
            d["ood"] = {name: ood_transform(d["x_test"], name, seed=self.cfg.data.subset_seed + 17) for name in self.cfg.eval.ood}
        return d["ood"]

    def data_key(self) -> dict[str, Any]:
        return to_dict(self.cfg.data)

    def teacher_manifest(self) -> Optional[dict[str, Any]]:
        """The manifest of a given teacher file (``teacher.path``) or of one trained here (None if not yet)."""
        path = self.teacher_path
        if self.cfg.teacher.path:
            if not module_paths(path)[1].exists():
                raise CheckpointError(f"no teacher at {module_paths(path)[1]}; pass a token net saved by modulemesh m2mkd "
                                      "(e.g. OUT/teacher.json) or a spec like --teacher vit:dim=64,depth=4 to train one")
            m = read_manifest(path)
            if m.get("kind") != NET_KIND or "spec" not in m:
                raise CheckpointError(f"{module_paths(path)[1]} holds a {m.get('kind')!r} module; the m2mkd teacher must be a token "
                                      "network saved by modulemesh m2mkd (kind m2mkd_net), e.g. OUT/teacher from an earlier run")
            return m
        if module_paths(path)[1].exists():
            return read_manifest(path)
        return None

    def require_teacher_manifest(self) -> dict[str, Any]:
        m = self.teacher_manifest()
        if m is None:
            raise CheckpointError(f"no teacher at {module_paths(self.teacher_path)[1]} yet; run --stage teacher first")
        return m

    def teacher_spec(self) -> dict[str, Any]:
        m = self.teacher_manifest() if self.cfg.teacher.path else None
        spec = check_spec(m["spec"]) if m else self.cfg.teacher.spec
        return resolve_spec(spec, self.data["input_shape"])

    def meta_spec(self) -> dict[str, Any]:
        t = self.teacher_spec()
        dim = self.cfg.meta.dim or t["dim"]
        heads = self.cfg.meta.heads or (t["heads"] if dim % t["heads"] == 0 else 1)
        if dim % heads:
            raise ConfigError(f"meta.dim {dim} is not divisible by meta.heads {heads}")
        return resolve_spec({"type": "vit", "dim": dim, "depth": self.K, "heads": heads, "mlp_ratio": self.cfg.meta.mlp_ratio,
                             "patch": t["patch"]}, self.data["input_shape"])

    def student_spec(self) -> dict[str, Any]:
        s = dict(self.cfg.student)
        if s.get("patch") is None:
            s["patch"] = self.teacher_spec()["patch"]
        return resolve_spec(s, self.data["input_shape"])

    def check(self) -> None:
        """Validate specs, K and data compatibility before any training."""
        from .models import block_ranges

        shape = self.data["input_shape"]
        t, s, m = self.teacher_spec(), self.student_spec(), self.meta_spec()
        block_ranges(t["depth"], self.K, f"the teacher ({t['type']}, depth {t['depth']})")
        block_ranges(s["depth"], self.K, f"the student ({s['type']}, depth {s['depth']})")
        if token_grid(t, shape) != token_grid(s, shape) or token_grid(t, shape) != token_grid(m, shape):
            raise ConfigError(f"teacher, student and meta model must cut images into the same token grid (teacher patch {t['patch']}, "
                              f"student patch {s['patch']}); set the same patch in both specs")
        tm = self.teacher_manifest() if self.cfg.teacher.path else None
        if tm is not None:
            if tuple(tm.get("input_shape", ())) != shape or int(tm.get("num_classes", -1)) != self.data["num_classes"]:
                raise DataError(f"the teacher {self.teacher_path} was trained on inputs {tuple(tm.get('input_shape', ()))} with "
                                f"{tm.get('num_classes')} classes, but {self.data['name']} has {shape} and {self.data['num_classes']}; "
                                "use the data it was trained on")
        if self.cfg.teacher.train == "incubate" and not self.cfg.teacher.path and m["dim"] != t["dim"]:
            raise ConfigError(f"teacher.train: incubate needs meta.dim == the teacher's dim ({t['dim']}), got {m['dim']} (Deep Incubation "
                              "keeps the width)")
        if self.cfg.teacher.adapt == "none" and m["dim"] != t["dim"] and (self.cfg.teacher.path or self.cfg.teacher.train == "end_to_end"):
            raise ConfigError(f"teacher.adapt: none plugs teacher modules into the meta model as they are, which needs equal widths "
                              f"(teacher {t['dim']}, meta {m['dim']}); use adapt: stitch")

    # ------------------------------------------------------------------ saving / loading nets

    def _save_net(self, path: Path, net: TokenNet, role: str, **extra: Any) -> dict[str, Any]:
        d = self.data
        save_module(path, net.state_dict(), {"kind": NET_KIND, "role": role, "spec": net.spec, "input_shape": list(d["input_shape"]),
                                             "num_classes": d["num_classes"], "class_names": d["class_names"], "data": d["name"],
                                             "seed": self.seed, **extra})
        return read_manifest(path)

    def _load_net(self, path: Path, what: str) -> tuple[TokenNet, dict[str, Any]]:
        if not module_paths(path)[1].exists():
            raise CheckpointError(f"no {what} at {module_paths(path)[1]}; run the stage that makes it first (--stage {what.split()[0]})")
        state, m = load_module(path)
        if m.get("kind") != NET_KIND:
            raise CheckpointError(f"{module_paths(path)[1]} is a {m.get('kind')!r} module, not a token network ({what})")
        net = build_net(m["spec"], m["input_shape"], int(m["num_classes"]))
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"weights of {module_paths(path)[0]} do not fit the spec in its manifest: {str(e).splitlines()[0]}") from None
        for p in net.parameters():
            p.requires_grad_(False)
        return net.to(self.device).eval(), m

    def _existing(self, path: Path, key: str) -> Optional[dict[str, Any]]:
        """The manifest at ``path`` when it was made from the same inputs (``key``) and its weights exist."""
        w, mp = module_paths(path)
        if not (mp.exists() and w.exists()):
            return None
        try:
            m = read_manifest(path)
        except CheckpointError:
            return None
        return m if m.get("key") == key else None

    def _eval_all(self, model: nn.Module) -> dict[str, Any]:
        d, bs = self.data, self.cfg.eval.batch_size
        res = {"iid": accuracy(model, d["x_test"], d["y_test"], bs, self.device)}
        res["ood"] = {name: accuracy(model, x, d["y_test"], bs, self.device) for name, x in self.ood_sets.items()}
        res["ood_mean"] = sum(res["ood"].values()) / len(res["ood"]) if res["ood"] else None
        res["key"] = self.eval_key()
        return res

    def eval_key(self) -> str:
        return _hash("eval/2", self.data_key(), to_dict(self.cfg.eval))

    def cached_logits(self, teacher: nn.Module, steps: int) -> tuple[Optional[torch.Tensor], dict[str, Any]]:
        """A teacher's logits on the whole training set via ``losses.teacher_logits`` (cached on disk under
        ``cache_dir``, keyed by the teacher's weights and the data) when ``steps`` batches cover at least
        one epoch; otherwise (None, {}) and the caller runs the teacher per batch. The FLOPs and seconds
        of the pass are returned so they can be charged to the phase that uses them."""
        from ..training.teacher_logits import teacher_logits

        d = self.data
        if steps == 0 or steps * min(self.cfg.optim.batch_size, d["n_train"]) < d["n_train"]:
            return None, {}
        start = time.perf_counter()
        logits = teacher_logits(teacher, d["x_train"], cache_dir=self.cache_dir, batch_size=self.cfg.eval.batch_size, device=self.device)
        per_sample = inference_flops(teacher, d["x_train"][:64])
        return logits.to(self.device), {"flops": per_sample * d["n_train"], "seconds": round(time.perf_counter() - start, 3),
                                        "samples": d["n_train"]}

    def _train_ce(self, model: nn.Module, steps: int, label: str, lr: Optional[float] = None, seed_offset: int = 0) -> dict[str, Any]:
        d = self.data
        return fit(list(model.parameters()), ce_loss_fn(model, self.cfg.optim.aux_weight), d["x_train"], d["y_train"], steps=steps,
                   optim=self.cfg.optim, lr=lr or self.cfg.optim.lr, seed=self.seed * 1000 + seed_offset, modules=[model],
                   on_step=self.progress(label, steps))

    # ------------------------------------------------------------------ stage 1: meta

    def meta_key(self) -> str:
        return _hash("meta", self.meta_spec(), self.cfg.meta.steps, to_dict(self.cfg.optim), self.data_key(), self.seed)

    def run_meta(self) -> dict[str, Any]:
        self.check()
        key = self.meta_key()
        m = self._existing(self.meta_path, key)
        if m:
            self.log(f"meta model: reusing {module_paths(self.meta_path)[1]}")
            return m
        from ..utils import seed_everything

        seed_everything(self.seed)
        net = build_net(self.meta_spec(), self.data["input_shape"], self.data["num_classes"]).to(self.device)
        stats = self._train_ce(net, self.cfg.meta.steps, f"meta model ({self.K} blocks)", seed_offset=1)
        ev = self._eval_all(net)
        self.log(f"meta model: test accuracy {ev['iid']:.2%}")
        return self._save_net(self.meta_path, net, "meta", key=key, stage="meta", train=stats, eval=ev,
                              parameters=count_parameters(net), inference_flops=inference_flops(net, self.data["x_test"][:64].to(self.device)))

    def load_meta(self) -> tuple[TokenNet, dict[str, Any]]:
        net, m = self._load_net(self.meta_path, "meta model")
        if m.get("key") != self.meta_key():
            raise CheckpointError(f"the meta model at {module_paths(self.meta_path)[1]} was made with other settings (spec, data, seed or "
                                  "optimizer) than this run; rerun --stage meta (or pass --overwrite)")
        return net, m

    # ------------------------------------------------------------------ stage 2: teacher

    def teacher_key(self) -> str:
        t = self.cfg.teacher
        meta = self.meta_key() if t.train == "incubate" else None
        return _hash("teacher", self.teacher_spec(), t.train, t.steps, t.incubate_steps if t.train == "incubate" else None,
                     to_dict(self.cfg.optim), self.data_key(), self.seed, meta, self.K if t.train == "incubate" else None)

    def load_teacher(self) -> tuple[TokenNet, dict[str, Any]]:
        if self.cfg.teacher.path:
            self.teacher_manifest()  # clear error when it is missing or of the wrong kind
            return self._load_net(self.teacher_path, "teacher")
        net, m = self._load_net(self.teacher_path, "teacher")
        if m.get("key") != self.teacher_key():
            raise CheckpointError(f"the teacher at {module_paths(self.teacher_path)[1]} was trained with other settings; rerun --stage teacher")
        return net, m

    def teacher_module_key(self, i: int) -> str:
        t = self.cfg.teacher
        tm = self.teacher_manifest()
        mode = "incubate_scratch" if (not t.path and t.train == "incubate") else t.adapt
        teacher_id = tm["sha256"] if (tm and mode != "incubate_scratch") else None
        return _hash("teacher_module", i, self.K, mode, t.adapt_steps if mode != "incubate_scratch" else t.incubate_steps,
                     self.teacher_spec(), teacher_id, self.meta_key(), to_dict(self.cfg.optim), self.data_key(), self.seed)

    def train_teacher(self) -> dict[str, Any]:
        """Train the teacher end to end from ``teacher.spec`` (reused when done); needs no meta model."""
        self.check()
        if self.cfg.teacher.path or self.cfg.teacher.train != "end_to_end":
            raise ConfigError("train_teacher trains a teacher end to end from teacher.spec; with teacher.path or teacher.train: incubate "
                              "use run_teacher")
        return self._train_teacher_e2e()

    def run_teacher(self, jobs: Optional[int] = None, indices: Optional[Sequence[int]] = None) -> dict[str, Any]:
        """Train the teacher if needed and fit its K modules into the meta model."""
        self.check()
        t = self.cfg.teacher
        self.load_meta()
        if t.path:
            self.load_teacher()
            self.log(f"teacher: {module_paths(self.teacher_path)[1]}")
        elif t.train == "end_to_end":
            self._train_teacher_e2e()
        jobs = jobs or self.cfg.jobs
        run_jobs(self, "teacher", indices if indices is not None else range(self.K), jobs)
        if not t.path and t.train == "incubate":
            self._assemble_incubated_teacher()
        return self.load_teacher()[1]

    def _train_teacher_e2e(self) -> dict[str, Any]:
        key = self.teacher_key()
        m = self._existing(self.teacher_path, key)
        if m:
            self.log(f"teacher: reusing {module_paths(self.teacher_path)[1]}")
            return m
        from ..utils import seed_everything

        seed_everything(self.seed + 1)
        net = build_net(self.teacher_spec(), self.data["input_shape"], self.data["num_classes"]).to(self.device)
        stats = self._train_ce(net, self.cfg.teacher.steps, "teacher (end to end)", seed_offset=2)
        ev = self._eval_all(net)
        self.log(f"teacher: test accuracy {ev['iid']:.2%}")
        return self._save_net(self.teacher_path, net, "teacher", key=key, stage="teacher", train=stats, eval=ev, how="end_to_end",
                              parameters=count_parameters(net), inference_flops=inference_flops(net, self.data["x_test"][:64].to(self.device)))

    def _assemble_incubated_teacher(self) -> dict[str, Any]:
        key = self.teacher_key()
        m = self._existing(self.teacher_path, key)
        if m:
            self.log(f"teacher: reusing {module_paths(self.teacher_path)[1]}")
            return m
        net = build_net(self.teacher_spec(), self.data["input_shape"], self.data["num_classes"])
        segs = cut(net, self.K)
        for i, seg in enumerate(segs):
            state, man = load_module(self.teacher_module_path(i))
            body = {k[len("body."):]: v for k, v in state.items() if k.startswith("body.")}
            seg.load_state_dict(body)
        net.to(self.device)
        before = accuracy(net, self.data["x_test"], self.data["y_test"], self.cfg.eval.batch_size)
        stats = self._train_ce(net, self.cfg.teacher.steps, "teacher (fine-tune after incubation)", seed_offset=3)
        ev = self._eval_all(net)
        self.log(f"teacher (Deep Incubation): assembled {before:.2%}, after fine-tune {ev['iid']:.2%}")
        return self._save_net(self.teacher_path, net, "teacher", key=key, stage="teacher", train=stats, eval=ev, how="incubate",
                              assembled_accuracy=before, parameters=count_parameters(net),
                              inference_flops=inference_flops(net, self.data["x_test"][:64].to(self.device)))

    def make_teacher_module(self, i: int, on_step: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
        """Fit teacher module i into the frozen meta model and save it (with its stitches) as its own file."""
        from ..utils import seed_everything

        t = self.cfg.teacher
        key = self.teacher_module_key(i)
        path = self.teacher_module_path(i)
        m = self._existing(path, key)
        if m:
            return m
        meta, meta_m = self.load_meta()
        meta_segs = cut(meta, self.K)
        tspec = self.teacher_spec()
        seed_everything(self.seed * 1000 + 200 + i)
        if not t.path and t.train == "incubate":
            mode, steps = "incubate_scratch", t.incubate_steps
            body = cut(build_net(tspec, self.data["input_shape"], self.data["num_classes"]), self.K)[i]
            module = stitch_module(body, i, self.K, tspec["dim"], meta.dim)
            teacher_sha = None
        else:
            mode, steps = t.adapt, (t.adapt_steps if t.adapt != "none" else 0)
            teacher, tm = self.load_teacher()
            body = copy.deepcopy(cut(teacher, self.K)[i])
            module = stitch_module(body, i, self.K, tspec["dim"], meta.dim, always=(mode == "stitch"))
            teacher_sha = tm["sha256"]
        module.to(self.device)
        for p in module.parameters():
            p.requires_grad_(True)
        if mode == "stitch":
            for p in module.body.parameters():
                p.requires_grad_(False)
        hybrid = Hybrid(meta_segs, i, module)
        trainable = [p for p in module.parameters() if p.requires_grad]
        if mode == "stitch" and not trainable:
            steps = 0  # K = 1: the module reads images and writes logits, there is nothing to stitch
        d = self.data
        stats = fit(trainable, ce_loss_fn(hybrid, self.cfg.optim.aux_weight), d["x_train"], d["y_train"], steps=steps, optim=self.cfg.optim,
                    lr=self.cfg.optim.lr, seed=self.seed * 1000 + 300 + i, modules=[module], on_step=on_step)
        hybrid.eval()
        acc = accuracy(hybrid, d["x_test"], d["y_test"], self.cfg.eval.batch_size)
        save_module(path, module.state_dict(), {
            "kind": TEACHER_MODULE_KIND, "index": i, "num_modules": self.K, "mode": mode, "spec": tspec, "meta_sha256": meta_m["sha256"],
            "teacher_sha256": teacher_sha, "width": tspec["dim"], "meta_width": meta.dim, "stitch_in": module.stitch_in is not None,
            "stitch_out": module.stitch_out is not None, "input_shape": list(d["input_shape"]), "num_classes": d["num_classes"],
            "key": key, "train": stats, "hybrid_accuracy": acc, "seed": self.seed})
        return read_manifest(path)

    def load_teacher_module(self, i: int, meta_sha: str) -> tuple[StitchedModule, dict[str, Any]]:
        path = self.teacher_module_path(i)
        if not module_paths(path)[1].exists():
            raise CheckpointError(f"no teacher module {i} at {module_paths(path)[1]}; run --stage teacher first")
        state, m = load_module(path)
        if m.get("kind") != TEACHER_MODULE_KIND or m.get("index") != i or m.get("num_modules") != self.K:
            raise CheckpointError(f"{module_paths(path)[1]} is not teacher module {i} of {self.K}")
        if m.get("meta_sha256") != meta_sha:
            raise CheckpointError(f"teacher module {i} ({module_paths(path)[1]}) was fitted to another meta model; rerun --stage teacher")
        body = cut(build_net(m["spec"], m["input_shape"], int(m["num_classes"])), self.K)[i]
        d_t, d_m = int(m["width"]), int(m["meta_width"])
        module = StitchedModule(body, Stitch(d_m, d_t) if m["stitch_in"] else None, Stitch(d_t, d_m) if m["stitch_out"] else None)
        try:
            module.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"weights of {module_paths(path)[0]} do not fit its manifest: {str(e).splitlines()[0]}") from None
        for p in module.parameters():
            p.requires_grad_(False)
        return module.to(self.device).eval(), m

    # ------------------------------------------------------------------ stage 3: student modules

    def student_module_key(self, i: int, teacher_module_sha: str, meta_sha: str) -> str:
        return _hash("student_module", i, self.K, self.student_spec(), meta_sha, teacher_module_sha, to_dict(self.cfg.distill),
                     to_dict(self.cfg.optim), self.data_key(), self.seed)

    def distill_module(self, i: int, on_step: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
        """m2mKD of student module i: train it (and its stitches) inside the meta model to match the teacher hybrid."""
        from ..utils import seed_everything
        from ..training.losses import kd_loss

        meta, meta_m = self.load_meta()
        t_module, t_m = self.load_teacher_module(i, meta_m["sha256"])
        key = self.student_module_key(i, t_m["sha256"], meta_m["sha256"])
        path = self.student_module_path(i)
        m = self._existing(path, key)
        if m:
            return m
        sspec = self.student_spec()
        seed_everything(self.seed)
        # The whole student is built from the run's seed and module i taken from it, so every module
        # starts exactly where the same module of the baselines starts.
        student = build_modular(sspec, self.data["input_shape"], self.data["num_classes"], self.K, meta.dim, "keep")
        module = student.parts[i].to(self.device)
        meta_segs = cut(meta, self.K)
        s_hybrid, t_hybrid = Hybrid(meta_segs, i, module), Hybrid(meta_segs, i, t_module).eval()
        dc, aux_w = self.cfg.distill, self.cfg.optim.aux_weight
        feature = dc.feature_weight > 0 and i < self.K - 1

        # Without a feature loss the teacher hybrid's logits are computed once for the training set
        # (cached by losses.teacher_logits) when the module sees at least an epoch, else per batch.
        cached, extra = self.cached_logits(t_hybrid, dc.steps) if not feature else (None, {})

        def loss_fn(xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            t_mid = None
            if cached is not None:
                t_logits = cached[idx.to(cached.device)]
            else:
                with torch.no_grad():
                    t_logits, t_mid = t_hybrid(xb, boundary=True)
            s_logits, s_mid = s_hybrid(xb, boundary=True)
            loss = kd_loss(s_logits, t_logits, yb, alpha=dc.alpha, T=dc.temperature)
            if feature:
                loss = loss + dc.feature_weight * F.mse_loss(s_mid, t_mid)
            aux = moe_aux_loss(module)
            return loss + aux_w * aux if (aux is not None and aux_w > 0) else loss

        d = self.data
        stats = fit(list(module.parameters()), loss_fn, d["x_train"], d["y_train"], steps=dc.steps, optim=self.cfg.optim,
                    lr=dc.lr or self.cfg.optim.lr, seed=self.seed * 1000 + 400 + i, modules=[module], on_step=on_step)
        stats = add_logit_cost(stats, extra)
        s_hybrid.eval()
        acc = accuracy(s_hybrid, d["x_test"], d["y_test"], self.cfg.eval.batch_size)
        save_module(path, module.state_dict(), {
            "kind": STUDENT_MODULE_KIND, "index": i, "num_modules": self.K, "spec": sspec, "width": sspec["dim"], "meta_width": meta.dim,
            "stitch_in": module.stitch_in is not None, "stitch_out": module.stitch_out is not None, "meta_sha256": meta_m["sha256"],
            "teacher_module_sha256": t_m["sha256"], "input_shape": list(d["input_shape"]), "num_classes": d["num_classes"],
            "data": d["name"], "key": key, "train": stats, "hybrid_accuracy": acc, "teacher_hybrid_accuracy": t_m.get("hybrid_accuracy"),
            "parameters": count_parameters(module), "seed": self.seed, "distill": to_dict(dc)})
        return read_manifest(path)

    def run_modules(self, jobs: Optional[int] = None, indices: Optional[Sequence[int]] = None) -> list[dict[str, Any]]:
        self.check()
        meta, meta_m = self.load_meta()
        idx = list(range(self.K)) if indices is None else list(indices)
        for i in idx:
            if not 0 <= i < self.K:
                raise ConfigError(f"--module {i} is out of range; this run has modules 0..{self.K - 1}")
            self.load_teacher_module(i, meta_m["sha256"])
        return run_jobs(self, "student", idx, jobs or self.cfg.jobs)

    # ------------------------------------------------------------------ stage 4: assembly

    def load_student_module(self, i: int, meta_sha: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        path = self.student_module_path(i)
        if not module_paths(path)[1].exists():
            raise CheckpointError(f"student module {i} is missing ({module_paths(path)[1]}); run --stage modules (--module {i}) or copy "
                                  "the file from the machine that distilled it")
        state, m = load_module(path)  # sha256 checked: a tampered file is refused here
        if m.get("kind") != STUDENT_MODULE_KIND or m.get("index") != i or m.get("num_modules") != self.K:
            raise CheckpointError(f"{module_paths(path)[1]} is not student module {i} of {self.K}")
        if m.get("meta_sha256") != meta_sha:
            raise CheckpointError(f"student module {i} ({module_paths(path)[1]}) was distilled against another meta model; "
                                  "distill it again with this run's meta model")
        if check_spec(m["spec"]) != self.student_spec():
            raise CheckpointError(f"student module {i} ({module_paths(path)[1]}) has spec {m['spec']}, this run's student is {self.student_spec()}")
        return state, m

    def assemble_key(self, module_shas: Sequence[str]) -> str:
        return _hash("assemble", list(module_shas), to_dict(self.cfg.assemble), to_dict(self.cfg.optim), self.data_key(), self.seed,
                     self.require_teacher_manifest()["sha256"] if self.cfg.assemble.loss == "kd" else None)

    def build_student(self) -> ModularNet:
        """A fresh student network in the assembled layout (the architecture of every arm)."""
        return build_modular(self.student_spec(), self.data["input_shape"], self.data["num_classes"], self.K, self.meta_spec()["dim"],
                             self.cfg.assemble.stitches)

    def run_assemble(self) -> dict[str, Any]:
        self.check()
        meta, meta_m = self.load_meta()
        loaded = [self.load_student_module(i, meta_m["sha256"]) for i in range(self.K)]
        key = self.assemble_key([m["sha256"] for _, m in loaded])
        m = self._existing(self.student_path, key)
        if m:
            self.log(f"m2mKD student: reusing {module_paths(self.student_path)[1]}")
            return m
        kept = build_modular(self.student_spec(), self.data["input_shape"], self.data["num_classes"], self.K, meta.dim, "keep")
        for i, (state, _) in enumerate(loaded):
            kept.parts[i].load_state_dict(state)
        kept.to(self.device)
        fold_report = None
        student = kept
        if self.cfg.assemble.stitches == "fold":
            student, fold_report = fold_stitches(kept, self.data["x_train"], self.cfg.assemble.fold_samples)
        ev0 = self._eval_all(student)
        self.log(f"m2mKD student assembled: {ev0['iid']:.2%} before fine-tune")
        ac = self.cfg.assemble
        lr = ac.lr or self.cfg.optim.lr * 0.5
        extra: dict[str, Any] = {}
        if ac.loss == "kd":
            teacher, _ = self.load_teacher()
            cached, extra = self.cached_logits(teacher, ac.finetune_steps)
            loss = kd_loss_fn(student, teacher, self.cfg, cached)
        else:
            loss = ce_loss_fn(student, self.cfg.optim.aux_weight)
        d = self.data
        stats = fit(list(student.parameters()), loss, d["x_train"], d["y_train"], steps=ac.finetune_steps, optim=self.cfg.optim, lr=lr,
                    seed=self.seed * 1000 + 5, modules=[student], on_step=self.progress("fine-tune assembled student", ac.finetune_steps))
        stats = add_logit_cost(stats, extra)
        ev = self._eval_all(student)
        self.log(f"m2mKD student: {ev['iid']:.2%} after {ac.finetune_steps} fine-tune steps")
        return self._save_student(self.student_path, student, "m2mkd", key, train=stats, eval=ev, assembled_eval=ev0, fold=fold_report,
                                  modules=[{"index": i, "sha256": mm["sha256"], "hybrid_accuracy": mm.get("hybrid_accuracy"),
                                            "train": mm.get("train")} for i, (_, mm) in enumerate(loaded)])

    def _save_student(self, path: Path, model: ModularNet, arm: str, key: str, **extra: Any) -> dict[str, Any]:
        d = self.data
        save_module(path, model.state_dict(), {
            "kind": STUDENT_KIND, "arm": arm, "spec": self.student_spec(), "num_modules": self.K, "meta_width": self.meta_spec()["dim"],
            "stitches": self.cfg.assemble.stitches, "input_shape": list(d["input_shape"]), "num_classes": d["num_classes"],
            "class_names": d["class_names"], "data": d["name"], "seed": self.seed, "key": key, "parameters": count_parameters(model),
            "inference_flops": inference_flops(model, d["x_test"][:64].to(self.device)), **extra})
        return read_manifest(path)

    # ------------------------------------------------------------------ baselines

    def student_budget(self) -> int:
        b = self.cfg.baselines.steps
        return b if b is not None else self.K * self.cfg.distill.steps + self.cfg.assemble.finetune_steps

    def baseline_key(self, arm: str) -> str:
        teacher = self.require_teacher_manifest()["sha256"] if arm == "kd" else None
        dc = self.cfg.distill
        return _hash("baseline", arm, self.student_spec(), self.K, self.meta_spec()["dim"], self.cfg.assemble.stitches, self.student_budget(),
                     to_dict(self.cfg.optim), self.data_key(), self.seed, teacher, (dc.alpha, dc.temperature) if arm == "kd" else None)

    def run_baselines(self) -> dict[str, dict[str, Any]]:
        from ..utils import seed_everything

        self.check()
        out = {}
        steps = self.student_budget()
        for arm in ("e2e", "kd"):
            key = self.baseline_key(arm)
            m = self._existing(self.baseline_path(arm), key)
            if m:
                self.log(f"{ARMS[arm]}: reusing {module_paths(self.baseline_path(arm))[1]}")
                out[arm] = m
                continue
            seed_everything(self.seed)
            student = self.build_student().to(self.device)
            d = self.data
            extra: dict[str, Any] = {}
            if arm == "kd":
                teacher, _ = self.load_teacher()
                cached, extra = self.cached_logits(teacher, steps)
                loss = kd_loss_fn(student, teacher, self.cfg, cached)
            else:
                loss = ce_loss_fn(student, self.cfg.optim.aux_weight)
            stats = fit(list(student.parameters()), loss, d["x_train"], d["y_train"], steps=steps, optim=self.cfg.optim, lr=self.cfg.optim.lr,
                        seed=self.seed * 1000 + 6, modules=[student], on_step=self.progress(f"baseline: {ARMS[arm]}", steps))
            stats = add_logit_cost(stats, extra)
            ev = self._eval_all(student)
            self.log(f"{ARMS[arm]}: {ev['iid']:.2%} after {steps} steps")
            out[arm] = self._save_student(self.baseline_path(arm), student, arm, key, train=stats, eval=ev)
        return out

    # ------------------------------------------------------------------ report

    def run_report(self) -> dict[str, Any]:
        from .m2mkd_report import build_summary, write_report

        self.check()
        summary = build_summary(self)
        write_report(self.out, summary)
        return summary

    def run(self, stages: Sequence[str] = STAGES, jobs: Optional[int] = None, modules: Optional[Sequence[int]] = None) -> Optional[dict[str, Any]]:
        from ..io import atomic_write_yaml

        self.check()
        atomic_write_yaml(self.out / "config.yaml", {**to_dict(self.cfg), "seed": self.seed})
        summary = None
        for stage in stages:
            if stage == "meta":
                self.run_meta()
            elif stage == "teacher":
                self.run_teacher(jobs)
            elif stage == "modules":
                self.run_modules(jobs, modules)
            elif stage == "assemble":
                self.run_assemble()
            elif stage == "baselines":
                if self.cfg.baselines.enabled:
                    self.run_baselines()
            elif stage == "report":
                summary = self.run_report()
            else:
                raise ConfigError(f"unknown stage {stage!r}; use one of {', '.join(STAGES)} or all")
        return summary


def kd_loss_fn(student: nn.Module, teacher: nn.Module, cfg: M2MKDConfig, cached: Optional[torch.Tensor] = None) -> Callable[..., torch.Tensor]:
    """Whole-model KD (Hinton): ``kd_loss(student(x), teacher(x), y)`` with the distill alpha/temperature, plus the MoE aux loss.

    ``cached``: the teacher's logits for every training row (then ``idx`` picks the batch's rows).
    """
    from ..training.losses import kd_loss

    teacher.eval()
    dc, aux_w = cfg.distill, cfg.optim.aux_weight

    def loss(xb: torch.Tensor, yb: torch.Tensor, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        if cached is not None and idx is not None:
            t = cached[idx.to(cached.device)]
        else:
            with torch.no_grad():
                t = teacher(xb)
        out = kd_loss(student(xb), t, yb, alpha=dc.alpha, T=dc.temperature)
        aux = moe_aux_loss(student)
        return out + aux_w * aux if (aux is not None and aux_w > 0) else out

    return loss


def add_logit_cost(stats: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Charge the one-off teacher-logit pass (FLOPs and seconds) to a training phase's stats."""
    if not extra:
        return stats
    out = dict(stats)
    out["teacher_logits"] = extra
    out["train_flops"] = stats["train_flops"] + extra["flops"]
    out["seconds"] = round(stats["seconds"] + extra["seconds"], 3)
    return out


@torch.no_grad()
def fold_stitches(kept: ModularNet, x_train: torch.Tensor, samples: int = 512) -> tuple[ModularNet, dict[str, Any]]:
    """Replace each stitch pair (stitch_out of module i, stitch_in of module i+1) by one least-squares Linear.

    The pair is LayerNorm-Linear-LayerNorm-Linear, so the fold is exact only where that map is
    affine on the data; the R^2 of each fit on ``samples`` training inputs is reported.
    """
    parts = list(kept.parts)
    k = len(parts)
    if all(p.stitch_in is None and p.stitch_out is None for p in parts):
        return kept, {"boundaries": [], "note": "no stitches to fold (equal widths)"}
    device = next(kept.parameters()).device
    h = as_float(x_train[:samples].to(device))
    links, r2 = [], []
    for i in range(k - 1):
        a = parts[i].body(h)  # h is what module i's body reads (after its stitch_in)
        target = parts[i + 1].stitch_in(parts[i].stitch_out(a))
        src = a.reshape(-1, a.shape[-1])
        tgt = target.reshape(-1, target.shape[-1])
        design = torch.cat([src, torch.ones(src.shape[0], 1, device=device)], 1)
        sol = torch.linalg.lstsq(design.cpu().double(), tgt.cpu().double()).solution.float().to(device)
        lin = nn.Linear(src.shape[1], tgt.shape[1]).to(device)
        lin.weight.copy_(sol[:-1].T)
        lin.bias.copy_(sol[-1])
        resid = (design @ sol - tgt).pow(2).sum()
        total = (tgt - tgt.mean(0)).pow(2).sum().clamp_min(1e-12)
        r2.append(float(1 - resid / total))
        links.append(lin)
        h = target
    folded = ModularNet([StitchedModule(p.body) for p in parts], links).to(device)
    return folded, {"boundaries": [{"between": [i, i + 1], "r2": v} for i, v in enumerate(r2)]}


# ----------------------------------------------------------------------------- worker processes


def job_worker(payload: dict[str, Any]) -> dict[str, Any]:
    """Entry point of one module job in a worker process (``training.pool``: one torch thread)."""
    index = payload["index"]
    cfg = M2MKDConfig.model_validate(payload["config"])
    run = M2MKD(cfg, payload["out"], seed=payload["seed"], device=payload["device"], cache_dir=payload["cache_dir"])

    def on_step(step: int) -> None:
        if step % 10 == 0:
            report(index, step)

    start = time.perf_counter()
    m = run.make_teacher_module(index, on_step) if payload["kind"] == "teacher" else run.distill_module(index, on_step)
    return {"index": index, "manifest": m, "seconds": time.perf_counter() - start}


def run_jobs(run: M2MKD, kind: str, indices: Sequence[int], jobs: int = 1) -> list[dict[str, Any]]:
    """Run module jobs (``teacher``: fit teacher modules; ``student``: m2mKD) serially or in ``jobs`` spawned processes."""
    indices = list(indices)
    if kind == "teacher":
        steps_of = (lambda i: run.cfg.teacher.incubate_steps if (not run.cfg.teacher.path and run.cfg.teacher.train == "incubate")
                    else (run.cfg.teacher.adapt_steps if run.cfg.teacher.adapt != "none" else 0))
        work, label = run.make_teacher_module, "teacher module {} in meta"
        key_of = run.teacher_module_key
        path_of = run.teacher_module_path
    else:
        steps_of = lambda i: run.cfg.distill.steps  # noqa: E731
        work, label = run.distill_module, "m2mKD student module {}"
        meta_m = read_manifest(run.meta_path)
        key_of = lambda i: run.student_module_key(i, read_manifest(run.teacher_module_path(i))["sha256"], meta_m["sha256"])  # noqa: E731
        path_of = run.student_module_path
    todo = [i for i in indices if run._existing(path_of(i), key_of(i)) is None]
    for i in indices:
        if i not in todo:
            run.log(f"{label.format(i)}: reusing {module_paths(path_of(i))[1]}")
    results = {i: {"index": i, "manifest": read_manifest(path_of(i)), "reused": True} for i in indices if i not in todo}
    if jobs <= 1 or len(todo) <= 1:
        for i in todo:
            start = time.perf_counter()
            m = work(i, run.progress(label.format(i), steps_of(i)))
            results[i] = {"index": i, "manifest": m, "seconds": time.perf_counter() - start}
    else:
        results.update(_run_parallel(run, kind, todo, jobs, label, steps_of))
    for i in indices:
        m = results[i]["manifest"]
        if "hybrid_accuracy" in m and not results[i].get("reused"):
            run.log(f"{label.format(i)}: hybrid accuracy {m['hybrid_accuracy']:.2%}")
    return [results[i] for i in indices]


def _run_parallel(run: M2MKD, kind: str, todo: list[int], jobs: int, label: str, steps_of: Callable[[int], int]) -> dict[int, dict[str, Any]]:
    bars = {i: run.progress(label.format(i), steps_of(i)) for i in todo}
    results: dict[int, dict[str, Any]] = {}
    base = {"kind": kind, "config": to_dict(run.cfg), "out": str(run.out), "seed": run.seed, "device": str(run.device),
            "cache_dir": str(run.cache_dir)}
    with WorkerPool(min(jobs, len(todo)), progress=True) as pool:
        futures = {pool.submit(job_worker, {**base, "index": i}): i for i in todo}
        for f in pool.as_completed(futures, on_message=lambda i, step: bars[i](step)):
            i = futures[f]
            results[i] = f.result()  # re-raises a worker's ModuleMeshError with its message
            bars[i](steps_of(i))
    return results


__all__ = ["M2MKDConfig", "M2MKD", "STAGES", "ARMS", "fit", "inference_flops", "ood_transform", "parse_ood", "fold_stitches",
           "run_jobs", "apply_cli", "kd_loss_fn", "ce_loss_fn"]
