"""Stages 1 and 2 of m2mKD: the meta model, and the teacher cut into modules fitted into it (see the package doc)."""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Sequence

from ...checkpoint import load_module, module_paths, read_manifest, save_module
from ...config import to_dict
from ...errors import CheckpointError, ConfigError
from ...training.evaluate import accuracy_fraction as accuracy
from ..models import (
    Hybrid,
    Stitch,
    StitchedModule,
    TokenNet,
    build_net,
    count_parameters,
    cut,
    stitch_module,
)
from .config import TEACHER_MODULE_KIND
from .jobs import run_jobs
from .recipe import ce_loss_fn, config_hash, fit, inference_flops
from .store import RunStore


class TeacherStages(RunStore):
    """``meta`` and ``teacher`` stages."""

    # ------------------------------------------------------------------ stage 1: meta

    def meta_key(self) -> str:
        return config_hash(
            "meta", self.meta_spec(), self.cfg.meta.steps, to_dict(self.cfg.optim), self.data_key(), self.seed
        )

    def run_meta(self) -> dict[str, Any]:
        self.check()
        key = self.meta_key()
        m = self.existing(self.meta_path, key)
        if m:
            self.log(f"meta model: reusing {module_paths(self.meta_path)[1]}")
            return m
        from ...utils import seed_everything

        seed_everything(self.seed)
        net = build_net(self.meta_spec(), self.data["input_shape"], self.data["num_classes"]).to(self.device)
        stats = self.train_ce(net, self.cfg.meta.steps, f"meta model ({self.K} blocks)", seed_offset=1)
        ev = self.eval_all(net)
        self.log(f"meta model: test accuracy {ev['iid']:.2%}")
        return self.save_net(
            self.meta_path,
            net,
            "meta",
            key=key,
            stage="meta",
            train=stats,
            eval=ev,
            parameters=count_parameters(net),
            inference_flops=inference_flops(net, self.data["x_test"][:64].to(self.device)),
        )

    def load_meta(self) -> tuple[TokenNet, dict[str, Any]]:
        net, m = self.load_net(self.meta_path, "meta model")
        if m.get("key") != self.meta_key():
            raise CheckpointError(
                f"the meta model at {module_paths(self.meta_path)[1]} was made with other settings "
                "(spec, data, seed or "
                "optimizer) than this run; rerun --stage meta (or pass --overwrite)"
            )
        return net, m

    # ------------------------------------------------------------------ stage 2: teacher

    def teacher_key(self) -> str:
        t = self.cfg.teacher
        meta = self.meta_key() if t.train == "incubate" else None
        return config_hash(
            "teacher",
            self.teacher_spec(),
            t.train,
            t.steps,
            t.incubate_steps if t.train == "incubate" else None,
            to_dict(self.cfg.optim),
            self.data_key(),
            self.seed,
            meta,
            self.K if t.train == "incubate" else None,
        )

    def load_teacher(self) -> tuple[TokenNet, dict[str, Any]]:
        if self.cfg.teacher.path:
            self.teacher_manifest()  # clear error when it is missing or of the wrong kind
            return self.load_net(self.teacher_path, "teacher")
        net, m = self.load_net(self.teacher_path, "teacher")
        if m.get("key") != self.teacher_key():
            raise CheckpointError(
                f"the teacher at {module_paths(self.teacher_path)[1]} was trained with other "
                "settings; rerun --stage teacher"
            )
        return net, m

    def teacher_module_key(self, i: int) -> str:
        t = self.cfg.teacher
        tm = self.teacher_manifest()
        mode = "incubate_scratch" if (not t.path and t.train == "incubate") else t.adapt
        teacher_id = tm["sha256"] if (tm and mode != "incubate_scratch") else None
        return config_hash(
            "teacher_module",
            i,
            self.K,
            mode,
            t.adapt_steps if mode != "incubate_scratch" else t.incubate_steps,
            self.teacher_spec(),
            teacher_id,
            self.meta_key(),
            to_dict(self.cfg.optim),
            self.data_key(),
            self.seed,
        )

    def train_teacher(self) -> dict[str, Any]:
        """Train the teacher end to end from ``teacher.spec`` (reused when done); needs no meta model."""
        self.check()
        if self.cfg.teacher.path or self.cfg.teacher.train != "end_to_end":
            raise ConfigError(
                "train_teacher trains a teacher end to end from teacher.spec; with teacher.path or "
                "teacher.train: incubate "
                "use run_teacher"
            )
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
        m = self.existing(self.teacher_path, key)
        if m:
            self.log(f"teacher: reusing {module_paths(self.teacher_path)[1]}")
            return m
        from ...utils import seed_everything

        seed_everything(self.seed + 1)
        net = build_net(self.teacher_spec(), self.data["input_shape"], self.data["num_classes"]).to(self.device)
        stats = self.train_ce(net, self.cfg.teacher.steps, "teacher (end to end)", seed_offset=2)
        ev = self.eval_all(net)
        self.log(f"teacher: test accuracy {ev['iid']:.2%}")
        return self.save_net(
            self.teacher_path,
            net,
            "teacher",
            key=key,
            stage="teacher",
            train=stats,
            eval=ev,
            how="end_to_end",
            parameters=count_parameters(net),
            inference_flops=inference_flops(net, self.data["x_test"][:64].to(self.device)),
        )

    def _assemble_incubated_teacher(self) -> dict[str, Any]:
        key = self.teacher_key()
        m = self.existing(self.teacher_path, key)
        if m:
            self.log(f"teacher: reusing {module_paths(self.teacher_path)[1]}")
            return m
        net = build_net(self.teacher_spec(), self.data["input_shape"], self.data["num_classes"])
        segs = cut(net, self.K)
        for i, seg in enumerate(segs):
            state, man = load_module(self.teacher_module_path(i))
            body = {k[len("body.") :]: v for k, v in state.items() if k.startswith("body.")}
            seg.load_state_dict(body)
        net.to(self.device)
        before = accuracy(net, self.data["x_test"], self.data["y_test"], self.cfg.eval.batch_size)
        stats = self.train_ce(net, self.cfg.teacher.steps, "teacher (fine-tune after incubation)", seed_offset=3)
        ev = self.eval_all(net)
        self.log(f"teacher (Deep Incubation): assembled {before:.2%}, after fine-tune {ev['iid']:.2%}")
        return self.save_net(
            self.teacher_path,
            net,
            "teacher",
            key=key,
            stage="teacher",
            train=stats,
            eval=ev,
            how="incubate",
            assembled_accuracy=before,
            parameters=count_parameters(net),
            inference_flops=inference_flops(net, self.data["x_test"][:64].to(self.device)),
        )

    def make_teacher_module(self, i: int, on_step: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
        """Fit teacher module i into the frozen meta model and save it (with its stitches) as its own file."""
        from ...utils import seed_everything

        t = self.cfg.teacher
        key = self.teacher_module_key(i)
        path = self.teacher_module_path(i)
        m = self.existing(path, key)
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
        stats = fit(
            trainable,
            ce_loss_fn(hybrid, self.cfg.optim.aux_weight),
            d["x_train"],
            d["y_train"],
            steps=steps,
            optim=self.cfg.optim,
            lr=self.cfg.optim.lr,
            seed=self.seed * 1000 + 300 + i,
            modules=[module],
            on_step=on_step,
        )
        hybrid.eval()
        acc = accuracy(hybrid, d["x_test"], d["y_test"], self.cfg.eval.batch_size)
        save_module(
            path,
            module.state_dict(),
            {
                "kind": TEACHER_MODULE_KIND,
                "index": i,
                "num_modules": self.K,
                "mode": mode,
                "spec": tspec,
                "meta_sha256": meta_m["sha256"],
                "teacher_sha256": teacher_sha,
                "width": tspec["dim"],
                "meta_width": meta.dim,
                "stitch_in": module.stitch_in is not None,
                "stitch_out": module.stitch_out is not None,
                "input_shape": list(d["input_shape"]),
                "num_classes": d["num_classes"],
                "key": key,
                "train": stats,
                "hybrid_accuracy": acc,
                "seed": self.seed,
            },
        )
        return read_manifest(path)

    def load_teacher_module(self, i: int, meta_sha: str) -> tuple[StitchedModule, dict[str, Any]]:
        path = self.teacher_module_path(i)
        if not module_paths(path)[1].exists():
            raise CheckpointError(f"no teacher module {i} at {module_paths(path)[1]}; run --stage teacher first")
        state, m = load_module(path)
        if m.get("kind") != TEACHER_MODULE_KIND or m.get("index") != i or m.get("num_modules") != self.K:
            raise CheckpointError(f"{module_paths(path)[1]} is not teacher module {i} of {self.K}")
        if m.get("meta_sha256") != meta_sha:
            raise CheckpointError(
                f"teacher module {i} ({module_paths(path)[1]}) was fitted to another meta model; rerun --stage teacher"
            )
        body = cut(build_net(m["spec"], m["input_shape"], int(m["num_classes"])), self.K)[i]
        d_t, d_m = int(m["width"]), int(m["meta_width"])
        module = StitchedModule(
            body, Stitch(d_m, d_t) if m["stitch_in"] else None, Stitch(d_t, d_m) if m["stitch_out"] else None
        )
        try:
            module.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(
                f"weights of {module_paths(path)[0]} do not fit its manifest: {str(e).splitlines()[0]}"
            ) from None
        for p in module.parameters():
            p.requires_grad_(False)
        return module.to(self.device).eval(), m
