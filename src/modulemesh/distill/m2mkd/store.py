"""The state an m2mKD run shares across its stages: output paths, data, specs, checks, saving and loading nets,
reusing finished outputs, evaluation and the teacher-logit cache.

The run's outputs for users, the assembled student (``OUT/student``) and the baselines
(``OUT/baselines/{e2e,kd}``), are ``Expert`` records (backbone ``modular``, see
``mesh.backbones``), so ``compose``, ``merge`` and ``hub publish`` take them; the run's own
bookkeeping (arm, key, evaluation, training costs) sits in ``metadata["m2mkd"]``. Meta model,
teacher and the per-module files are the stages' working files.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ...checkpoint import load_module, module_paths, read_manifest, save_module
from ...config import to_dict
from ...errors import CheckpointError, ConfigError, DataError
from ...training.evaluate import accuracy_fraction as accuracy
from ..models import TokenNet, build_net, check_spec, resolve_spec, token_grid
from .config import NET_KIND, STUDENT_KIND, Log, M2MKDConfig, Progress
from .ood import ood_transform
from .recipe import ce_loss_fn, config_hash, fit, inference_flops
from .student_records import StudentRecords


def no_progress(label: str, total: int) -> Callable[[int], None]:
    return lambda step: None


class RunStore(StudentRecords):
    """Paths, data and shared helpers of one m2mKD run in an output directory (the stages build on it).

    ``progress(label, total)`` returns a per-step callback (rich bars in the CLI); ``log(text)``
    prints a status line. Both default to silence.
    """

    def __init__(
        self,
        cfg: M2MKDConfig,
        out: str | os.PathLike,
        seed: int = 0,
        device: str | torch.device = "cpu",
        progress: Progress = None,
        log: Log = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        self.cfg, self.out, self.seed = cfg, Path(out), int(seed)
        self.cache_dir = Path(cache_dir) if cache_dir else self.out / "cache"
        self.device = torch.device(device)
        self.progress = progress or no_progress
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
        from ...data.datasets import load_dataset

        d = self.cfg.data
        ds = load_dataset(d.name, d.root, **d.options)
        x_tr, y_tr = torch.as_tensor(ds.x_train), torch.as_tensor(ds.y_train).long()
        x_te, y_te = torch.as_tensor(ds.x_test), torch.as_tensor(ds.y_test).long()
        # Each subset has its own generator, so the test subset does not depend on train_subset.
        if d.train_subset is not None and d.train_subset < x_tr.shape[0]:
            idx = (
                torch.randperm(x_tr.shape[0], generator=torch.Generator().manual_seed(d.subset_seed))[: d.train_subset]
                .sort()
                .values
            )
            x_tr, y_tr = x_tr[idx], y_tr[idx]
        if d.test_subset is not None and d.test_subset < x_te.shape[0]:
            idx = (
                torch.randperm(x_te.shape[0], generator=torch.Generator().manual_seed(d.subset_seed))[: d.test_subset]
                .sort()
                .values
            )
            x_te, y_te = x_te[idx], y_te[idx]
        if x_tr.dim() != 4:
            raise DataError(
                f"m2mkd needs image data (N, C, H, W); dataset {ds.name!r} has samples of shape {tuple(x_tr.shape[1:])}"
            )
        dev = self.device
        return {
            "name": ds.name,
            "input_shape": tuple(int(s) for s in x_tr.shape[1:]),
            "num_classes": ds.num_classes,
            "class_names": list(ds.class_names),
            "x_train": x_tr.to(dev),
            "y_train": y_tr.to(dev),
            "x_test": x_te,
            "y_test": y_te,
            "n_train": int(x_tr.shape[0]),
            "n_test": int(x_te.shape[0]),
        }

    @property
    def ood_sets(self) -> dict[str, torch.Tensor]:
        """Shifted copies of the test set, one per ``eval.ood`` entry (built on first use)."""
        d = self.data
        if "ood" not in d:
            d["ood"] = {
                name: ood_transform(d["x_test"], name, seed=self.cfg.data.subset_seed + 17)
                for name in self.cfg.eval.ood
            }
        return d["ood"]

    def data_key(self) -> dict[str, Any]:
        return to_dict(self.cfg.data)

    def teacher_manifest(self) -> Optional[dict[str, Any]]:
        """The manifest of a given teacher file (``teacher.path``) or of one trained here (None if not yet)."""
        path = self.teacher_path
        if self.cfg.teacher.path:
            if not module_paths(path)[1].exists():
                raise CheckpointError(
                    f"no teacher at {module_paths(path)[1]}; pass a token net saved by modulemesh "
                    "m2mkd (e.g. OUT/teacher.json) or a spec like --teacher vit:dim=64,depth=4 "
                    "to train one"
                )
            m = read_manifest(path)
            if m.get("kind") != NET_KIND or "spec" not in m:
                raise CheckpointError(
                    f"{module_paths(path)[1]} holds a {m.get('kind')!r} module; the m2mkd teacher "
                    "must be a token "
                    "network saved by modulemesh m2mkd (kind m2mkd_net), e.g. OUT/teacher from an "
                    "earlier run"
                )
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
        return resolve_spec(
            {
                "type": "vit",
                "dim": dim,
                "depth": self.K,
                "heads": heads,
                "mlp_ratio": self.cfg.meta.mlp_ratio,
                "patch": t["patch"],
            },
            self.data["input_shape"],
        )

    def student_spec(self) -> dict[str, Any]:
        s = dict(self.cfg.student)
        if s.get("patch") is None:
            s["patch"] = self.teacher_spec()["patch"]
        return resolve_spec(s, self.data["input_shape"])

    def check(self) -> None:
        """Validate specs, K and data compatibility before any training."""
        from ..models import block_ranges

        shape = self.data["input_shape"]
        t, s, m = self.teacher_spec(), self.student_spec(), self.meta_spec()
        block_ranges(t["depth"], self.K, f"the teacher ({t['type']}, depth {t['depth']})")
        block_ranges(s["depth"], self.K, f"the student ({s['type']}, depth {s['depth']})")
        if token_grid(t, shape) != token_grid(s, shape) or token_grid(t, shape) != token_grid(m, shape):
            raise ConfigError(
                f"teacher, student and meta model must cut images into the same token grid (teacher "
                f"patch {t['patch']}, "
                f"student patch {s['patch']}); set the same patch in both specs"
            )
        tm = self.teacher_manifest() if self.cfg.teacher.path else None
        if tm is not None:
            if tuple(tm.get("input_shape", ())) != shape or int(tm.get("num_classes", -1)) != self.data["num_classes"]:
                raise DataError(
                    f"the teacher {self.teacher_path} was trained on inputs "
                    f"{tuple(tm.get('input_shape', ()))} with "
                    f"{tm.get('num_classes')} classes, but {self.data['name']} has {shape} and "
                    f"{self.data['num_classes']}; "
                    "use the data it was trained on"
                )
        if self.cfg.teacher.train == "incubate" and not self.cfg.teacher.path and m["dim"] != t["dim"]:
            raise ConfigError(
                f"teacher.train: incubate needs meta.dim == the teacher's dim ({t['dim']}), got "
                f"{m['dim']} (Deep Incubation "
                "keeps the width)"
            )
        pretrained = self.cfg.teacher.path or self.cfg.teacher.train == "end_to_end"
        if self.cfg.teacher.adapt == "none" and m["dim"] != t["dim"] and pretrained:
            raise ConfigError(
                f"teacher.adapt: none plugs teacher modules into the meta model as they are, which "
                "needs equal widths "
                f"(teacher {t['dim']}, meta {m['dim']}); use adapt: stitch"
            )

    # ------------------------------------------------------------------ saving / loading nets

    def save_net(self, path: Path, net: TokenNet, role: str, **extra: Any) -> dict[str, Any]:
        d = self.data
        save_module(
            path,
            net.state_dict(),
            {
                "kind": NET_KIND,
                "role": role,
                "spec": net.spec,
                "input_shape": list(d["input_shape"]),
                "num_classes": d["num_classes"],
                "class_names": d["class_names"],
                "data": d["name"],
                "seed": self.seed,
                **extra,
            },
        )
        return read_manifest(path)

    def load_net(self, path: Path, what: str) -> tuple[TokenNet, dict[str, Any]]:
        if not module_paths(path)[1].exists():
            raise CheckpointError(
                f"no {what} at {module_paths(path)[1]}; run the stage that makes it first (--stage {what.split()[0]})"
            )
        state, m = load_module(path)
        if m.get("kind") != NET_KIND:
            raise CheckpointError(
                f"{module_paths(path)[1]} is a {m.get('kind')!r} module, not a token network ({what})"
            )
        net = build_net(m["spec"], m["input_shape"], int(m["num_classes"]))
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(
                f"weights of {module_paths(path)[0]} do not fit the spec in its manifest: {str(e).splitlines()[0]}"
            ) from None
        for p in net.parameters():
            p.requires_grad_(False)
        return net.to(self.device).eval(), m

    def existing(self, path: Path, key: str) -> Optional[dict[str, Any]]:
        """The manifest at ``path`` when it was made from the same inputs (``key``) and its weights exist.

        Expert records (the students) answer with their flat view; a student file of an older
        version counts as missing, so the stage writes it again as an expert."""
        w, mp = module_paths(path)
        if not (mp.exists() and w.exists()):
            return None
        try:
            m = read_manifest(path)
            if m.get("kind") == STUDENT_KIND:
                return None
            if m.get("kind") == "expert":
                m = self.student_view(path)
        except CheckpointError:
            return None
        return m if m.get("key") == key else None

    def eval_all(self, model: nn.Module) -> dict[str, Any]:
        d, bs = self.data, self.cfg.eval.batch_size
        res = {"iid": accuracy(model, d["x_test"], d["y_test"], bs, self.device)}
        res["ood"] = {name: accuracy(model, x, d["y_test"], bs, self.device) for name, x in self.ood_sets.items()}
        res["ood_mean"] = sum(res["ood"].values()) / len(res["ood"]) if res["ood"] else None
        res["key"] = self.eval_key()
        return res

    def eval_key(self) -> str:
        return config_hash("eval/2", self.data_key(), to_dict(self.cfg.eval))

    def cached_logits(self, teacher: nn.Module, steps: int) -> tuple[Optional[torch.Tensor], dict[str, Any]]:
        """A teacher's logits on the whole training set via ``training.teacher_logits`` (cached on disk under
        ``cache_dir``, keyed by the teacher's weights and the data) when ``steps`` batches cover at least
        one epoch; otherwise (None, {}) and the caller runs the teacher per batch. The FLOPs and seconds
        of the pass are returned so they can be charged to the phase that uses them."""
        from ...training.teacher_logits import teacher_logits

        d = self.data
        if steps == 0 or steps * min(self.cfg.optim.batch_size, d["n_train"]) < d["n_train"]:
            return None, {}
        start = time.perf_counter()
        logits = teacher_logits(
            teacher, d["x_train"], cache_dir=self.cache_dir, batch_size=self.cfg.eval.batch_size, device=self.device
        )
        per_sample = inference_flops(teacher, d["x_train"][:64])
        return logits.to(self.device), {
            "flops": per_sample * d["n_train"],
            "seconds": round(time.perf_counter() - start, 3),
            "samples": d["n_train"],
        }

    def train_ce(
        self, model: nn.Module, steps: int, label: str, lr: Optional[float] = None, seed_offset: int = 0
    ) -> dict[str, Any]:
        d = self.data
        return fit(
            list(model.parameters()),
            ce_loss_fn(model, self.cfg.optim.aux_weight),
            d["x_train"],
            d["y_train"],
            steps=steps,
            optim=self.cfg.optim,
            lr=lr or self.cfg.optim.lr,
            seed=self.seed * 1000 + seed_offset,
            modules=[model],
            on_step=self.progress(label, steps),
        )
