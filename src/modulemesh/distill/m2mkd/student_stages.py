"""Stages 3 to 5 of m2mKD: student modules distilled one by one, their assembly, the baselines (see the package doc)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ...checkpoint import load_module, module_paths, read_manifest, save_module
from ...config import to_dict
from ...errors import CheckpointError, ConfigError
from ...training.evaluate import accuracy_fraction as accuracy
from ...training.losses import kd_loss
from ..models import (
    Hybrid,
    ModularNet,
    build_modular,
    check_spec,
    count_parameters,
    cut,
    moe_aux_loss,
)
from .config import ARMS, STUDENT_MODULE_KIND
from .jobs import run_jobs
from .recipe import (
    add_logit_cost,
    boundary_loss,
    calibrate_stitches,
    ce_loss_fn,
    config_hash,
    fit,
    fold_stitches,
    kd_loss_fn,
    meta_tokens,
)
from .teacher_stages import TeacherStages


class StudentStages(TeacherStages):
    """``modules``, ``assemble`` and ``baselines`` stages."""

    # ------------------------------------------------------------------ stage 3: student modules

    def student_module_key(
        self, i: int, teacher_module_sha: str, meta_sha: str, prefix_shas: Optional[Sequence[str]] = None
    ) -> str:
        return config_hash(
            "student_module",
            i,
            list(prefix_shas) if prefix_shas else None,
            self.K,
            self.student_spec(),
            meta_sha,
            teacher_module_sha,
            to_dict(self.cfg.distill),
            to_dict(self.cfg.optim),
            self.data_key(),
            self.seed,
        )

    def distill_module(self, i: int, on_step: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
        """m2mKD of student module i: train it (and its stitches) inside the meta model to match the teacher hybrid."""
        from ...utils import seed_everything

        meta, meta_m = self.load_meta()
        t_module, t_m = self.load_teacher_module(i, meta_m["sha256"])
        meta_segs = cut(meta, self.K)
        before, prefix_shas = list(meta_segs[:i]), None
        if self.cfg.distill.prefix == "student" and i > 0:
            # Module i reads what the distilled modules 0..i-1 hand over, as it will once assembled.
            prefix = [self.student_module_net(j, meta_m["sha256"]) for j in range(i)]
            before, prefix_shas = [net for net, _ in prefix], [mm["sha256"] for _, mm in prefix]
        key = self.student_module_key(i, t_m["sha256"], meta_m["sha256"], prefix_shas)
        path = self.student_module_path(i)
        m = self.existing(path, key)
        if m:
            return m
        sspec = self.student_spec()
        seed_everything(self.seed)
        # The whole student is built from the run's seed and module i taken from it, so every module
        # starts exactly where the same module of the baselines starts.
        student = build_modular(sspec, self.data["input_shape"], self.data["num_classes"], self.K, meta.dim, "keep")
        module = student.parts[i].to(self.device)
        s_hybrid = Hybrid([*before, *meta_segs[i:]], i, module)
        t_hybrid = Hybrid(meta_segs, i, t_module).eval()
        dc, aux_w = self.cfg.distill, self.cfg.optim.aux_weight
        feature = dc.feature_weight > 0 and i < self.K - 1
        # Module i+1 is distilled on the meta model's tokens at boundary i+1; module i is pulled
        # towards those same tokens so that, once assembled, it hands module i+1 what it learned on.
        boundary = dc.boundary_weight > 0 and i < self.K - 1
        meta_upto = meta_segs[: i + 1]

        # Without a feature loss the teacher hybrid's logits are computed once for the training set
        # (cached by training.teacher_logits) when the module sees at least an epoch, else per batch.
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
            if boundary:
                loss = loss + dc.boundary_weight * boundary_loss(s_mid, meta_tokens(meta_upto, xb))
            aux = moe_aux_loss(module)
            return loss + aux_w * aux if (aux is not None and aux_w > 0) else loss

        d = self.data
        stats = fit(
            list(module.parameters()),
            loss_fn,
            d["x_train"],
            d["y_train"],
            steps=dc.steps,
            optim=self.cfg.optim,
            lr=dc.lr or self.cfg.optim.lr,
            seed=self.seed * 1000 + 400 + i,
            modules=[module],
            on_step=on_step,
        )
        stats = add_logit_cost(stats, extra)
        s_hybrid.eval()
        acc = accuracy(s_hybrid, d["x_test"], d["y_test"], self.cfg.eval.batch_size)
        save_module(
            path,
            module.state_dict(),
            {
                "kind": STUDENT_MODULE_KIND,
                "index": i,
                "num_modules": self.K,
                "spec": sspec,
                "width": sspec["dim"],
                "meta_width": meta.dim,
                "stitch_in": module.stitch_in is not None,
                "stitch_out": module.stitch_out is not None,
                "meta_sha256": meta_m["sha256"],
                "teacher_module_sha256": t_m["sha256"],
                "prefix_sha256": prefix_shas,
                "input_shape": list(d["input_shape"]),
                "num_classes": d["num_classes"],
                "data": d["name"],
                "key": key,
                "train": stats,
                "hybrid_accuracy": acc,
                "teacher_hybrid_accuracy": t_m.get("hybrid_accuracy"),
                "parameters": count_parameters(module),
                "seed": self.seed,
                "distill": to_dict(dc),
            },
        )
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

    # ------------------------------------------------------------------ target set

    def target_rows(self) -> Optional[torch.Tensor]:
        """Rows of the training set the end-to-end phase uses (None: all of them, ``target.fraction: 1``)."""
        t, n = self.cfg.target, self.data["n_train"]
        if t.fraction >= 1:
            return None
        size = max(1, round(t.fraction * n))
        g = torch.Generator().manual_seed(t.seed)
        return torch.randperm(n, generator=g)[:size].sort().values

    def target_data(
        self, cached: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(x, y) of the target set, and the cached teacher logits of its rows (when given for the whole set)."""
        d, rows = self.data, self.target_rows()
        if rows is None:
            return d["x_train"], d["y_train"], cached
        r = rows.to(d["x_train"].device)
        return d["x_train"][r], d["y_train"][r], (cached[rows.to(cached.device)] if cached is not None else None)

    def target_key(self) -> dict[str, Any]:
        return {**to_dict(self.cfg.target), "n": None if self.target_rows() is None else len(self.target_rows())}

    # ------------------------------------------------------------------ stage 4: assembly

    def load_student_module(self, i: int, meta_sha: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        path = self.student_module_path(i)
        if not module_paths(path)[1].exists():
            raise CheckpointError(
                f"student module {i} is missing ({module_paths(path)[1]}); run --stage modules "
                f"(--module {i}) or copy "
                "the file from the machine that distilled it"
            )
        state, m = load_module(path)  # sha256 checked: a tampered file is refused here
        if m.get("kind") != STUDENT_MODULE_KIND or m.get("index") != i or m.get("num_modules") != self.K:
            raise CheckpointError(f"{module_paths(path)[1]} is not student module {i} of {self.K}")
        if m.get("meta_sha256") != meta_sha:
            raise CheckpointError(
                f"student module {i} ({module_paths(path)[1]}) was distilled against another meta "
                "model; "
                "distill it again with this run's meta model"
            )
        if check_spec(m["spec"]) != self.student_spec():
            raise CheckpointError(
                f"student module {i} ({module_paths(path)[1]}) has spec {m['spec']}, this run's "
                f"student is {self.student_spec()}"
            )
        return state, m

    def student_module_net(self, i: int, meta_sha: str) -> tuple[torch.nn.Module, dict[str, Any]]:
        """Distilled student module i (with its stitches), frozen, in eval mode."""
        state, m = self.load_student_module(i, meta_sha)
        net = build_modular(
            self.student_spec(), self.data["input_shape"], self.data["num_classes"], self.K, self.meta_spec()["dim"]
        ).parts[i]
        net.load_state_dict(state)
        for p in net.parameters():
            p.requires_grad_(False)
        return net.to(self.device).eval(), m

    def assemble_key(self, module_shas: Sequence[str]) -> str:
        return config_hash(
            "assemble",
            list(module_shas),
            to_dict(self.cfg.assemble),
            to_dict(self.cfg.optim),
            self.data_key(),
            self.seed,
            self.require_teacher_manifest()["sha256"] if self.cfg.assemble.loss == "kd" else None,
            self.target_key(),
        )

    def build_student(self) -> ModularNet:
        """A fresh student network in the assembled layout (the architecture of every arm)."""
        return build_modular(
            self.student_spec(),
            self.data["input_shape"],
            self.data["num_classes"],
            self.K,
            self.meta_spec()["dim"],
            self.cfg.assemble.stitches,
        )

    def run_assemble(self) -> dict[str, Any]:
        self.check()
        meta, meta_m = self.load_meta()
        loaded = [self.load_student_module(i, meta_m["sha256"]) for i in range(self.K)]
        key = self.assemble_key([m["sha256"] for _, m in loaded])
        m = self.existing(self.student_path, key)
        if m:
            self.log(f"m2mKD student: reusing {module_paths(self.student_path)[1]}")
            return m
        kept = build_modular(
            self.student_spec(), self.data["input_shape"], self.data["num_classes"], self.K, meta.dim, "keep"
        )
        for i, (state, _) in enumerate(loaded):
            kept.parts[i].load_state_dict(state)
        kept.to(self.device).eval()
        ac = self.cfg.assemble
        calibration = None
        if ac.calibrate and self.cfg.distill.prefix == "meta":  # prefix student: module i+1 learnt on module i
            calibration = calibrate_stitches(kept, cut(meta, self.K), self.data["x_train"], ac.fold_samples)
        fold_report = None
        student = kept
        if self.cfg.assemble.stitches == "fold":
            student, fold_report = fold_stitches(kept, self.data["x_train"], self.cfg.assemble.fold_samples)
        ev0 = self.eval_all(student)
        self.log(f"m2mKD student assembled: {ev0['iid']:.2%} before fine-tune")
        lr = ac.lr or self.cfg.optim.lr * 0.5
        extra: dict[str, Any] = {}
        cached = None
        if ac.loss == "kd":
            teacher, _ = self.load_teacher()
            cached, extra = self.cached_logits(teacher, ac.finetune_steps)
        x_t, y_t, cached = self.target_data(cached)
        if ac.loss == "kd":
            loss = kd_loss_fn(student, teacher, self.cfg, cached)
        else:
            loss = ce_loss_fn(student, self.cfg.optim.aux_weight)
        stats = fit(
            list(student.parameters()),
            loss,
            x_t,
            y_t,
            steps=ac.finetune_steps,
            optim=self.cfg.optim,
            lr=lr,
            seed=self.seed * 1000 + 5,
            modules=[student],
            on_step=self.progress("fine-tune assembled student", ac.finetune_steps),
        )
        stats = add_logit_cost(stats, extra)
        ev = self.eval_all(student)
        self.log(f"m2mKD student: {ev['iid']:.2%} after {ac.finetune_steps} fine-tune steps")
        return self.save_student(
            self.student_path,
            student,
            "m2mkd",
            key,
            train=stats,
            eval=ev,
            assembled_eval=ev0,
            fold=fold_report,
            calibration=calibration,
            modules=[
                {
                    "index": i,
                    "sha256": mm["sha256"],
                    "hybrid_accuracy": mm.get("hybrid_accuracy"),
                    "train": mm.get("train"),
                }
                for i, (_, mm) in enumerate(loaded)
            ],
        )

    # ------------------------------------------------------------------ baselines

    def student_budget(self) -> int:
        b = self.cfg.baselines.steps
        return b if b is not None else self.K * self.cfg.distill.steps + self.cfg.assemble.finetune_steps

    def baseline_key(self, arm: str) -> str:
        teacher = self.require_teacher_manifest()["sha256"] if arm == "kd" else None
        dc = self.cfg.distill
        return config_hash(
            "baseline",
            arm,
            self.student_spec(),
            self.K,
            self.meta_spec()["dim"],
            self.cfg.assemble.stitches,
            self.student_budget(),
            to_dict(self.cfg.optim),
            self.data_key(),
            self.seed,
            teacher,
            (dc.alpha, dc.temperature) if arm == "kd" else None,
            self.target_key(),
        )

    def run_baselines(self, arms: Optional[Sequence[str]] = None) -> dict[str, dict[str, Any]]:
        """Train (or reuse) the baselines: ``arms`` (default: end-to-end, and whole-model KD unless
        ``baselines.kd`` is off); one arm alone lets a caller measure that job by itself."""
        from ...utils import seed_everything

        self.check()
        out = {}
        steps = self.student_budget()
        if arms is None:
            arms = ("e2e", "kd") if self.cfg.baselines.kd else ("e2e",)
        for arm in arms:  # all checked before any is trained
            if arm not in ("e2e", "kd"):
                raise ConfigError(f"unknown baseline arm {arm!r}; use e2e or kd")
        for arm in arms:
            key = self.baseline_key(arm)
            m = self.existing(self.baseline_path(arm), key)
            if m:
                self.log(f"{ARMS[arm]}: reusing {module_paths(self.baseline_path(arm))[1]}")
                out[arm] = m
                continue
            seed_everything(self.seed)
            student = self.build_student().to(self.device)
            extra: dict[str, Any] = {}
            cached = None
            if arm == "kd":
                teacher, _ = self.load_teacher()
                cached, extra = self.cached_logits(teacher, steps)
            x_t, y_t, cached = self.target_data(cached)
            if arm == "kd":
                loss = kd_loss_fn(student, teacher, self.cfg, cached)
            else:
                loss = ce_loss_fn(student, self.cfg.optim.aux_weight)
            stats = fit(
                list(student.parameters()),
                loss,
                x_t,
                y_t,
                steps=steps,
                optim=self.cfg.optim,
                lr=self.cfg.optim.lr,
                seed=self.seed * 1000 + 6,
                modules=[student],
                on_step=self.progress(f"baseline: {ARMS[arm]}", steps),
            )
            stats = add_logit_cost(stats, extra)
            ev = self.eval_all(student)
            self.log(f"{ARMS[arm]}: {ev['iid']:.2%} after {steps} steps")
            out[arm] = self.save_student(self.baseline_path(arm), student, arm, key, train=stats, eval=ev)
        return out
