"""The user-facing outputs of an m2mKD run: the assembled student (``OUT/student``) and the
baselines (``OUT/baselines/{e2e,kd}``) as sealed ``Expert`` records (backbone ``modular``), so
``compose``, ``merge`` and ``hub publish`` take them; the run's bookkeeping sits in
``metadata["m2mkd"]``. A mixin of ``RunStore``, which provides the data, specs and config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ...checkpoint import module_paths, read_manifest
from ...config import to_dict
from ...errors import CheckpointError
from ...mesh.expert import Expert
from ...mesh.provenance import parent_record, standalone_provenance
from ..models import count_parameters
from .config import STUDENT_KIND
from .recipe import inference_flops

# Expert names of the user-facing students, by arm.
STUDENT_NAMES = {"m2mkd": "m2mkd_student", "e2e": "e2e_student", "kd": "kd_student"}


class StudentRecords:
    """Writing and reading the student arms' expert records."""

    def student_backbone(self) -> dict[str, Any]:
        """The ``modular`` backbone spec that rebuilds every student arm (see ``mesh.backbones``)."""
        return {
            "type": "modular",
            "net": self.student_spec(),
            "modules": self.K,
            "outer_width": self.meta_spec()["dim"],
            "layout": self.cfg.assemble.stitches,
        }

    def save_student(self, path: Path, model: nn.Module, arm: str, key: str, **extra: Any) -> dict[str, Any]:
        """Write a student arm as a sealed, frozen Expert record; returns its flat view (``student_view``)."""
        d = self.data
        teacher = self.teacher_manifest() if arm in ("m2mkd", "kd") else None
        info = {
            "arm": arm,
            "spec": self.student_spec(),
            "num_modules": self.K,
            "meta_width": self.meta_spec()["dim"],
            "stitches": self.cfg.assemble.stitches,
            "seed": self.seed,
            "key": key,
            "parameters": count_parameters(model),
            "inference_flops": inference_flops(model, d["x_test"][:64].to(self.device)),
            **extra,
        }
        expert = Expert(
            STUDENT_NAMES.get(arm, arm),
            range(d["num_classes"]),
            self.student_backbone(),
            d["input_shape"],
            metadata={
                "data": d["name"],
                "class_names": d["class_names"],
                "m2mkd": info,
                "provenance": standalone_provenance(
                    data_name=d["name"],
                    classes=range(d["num_classes"]),
                    x_train=d["x_train"],
                    y_train=d["y_train"],
                    config={"m2mkd": to_dict(self.cfg), "seed": self.seed, "arm": arm},
                    accuracy=(extra.get("eval") or {}).get("iid", float("nan")),
                    parent=parent_record(teacher, "teacher") if teacher else None,
                ),
            },
        )
        expert.net.load_state_dict(model.state_dict())
        expert.freeze().save(path)
        return self.student_view(path)

    def student_view(self, path: Path) -> dict[str, Any]:
        """A student's run record (``metadata["m2mkd"]``) plus the weights' sha256, seal checked."""
        mp = module_paths(path)[1]
        if read_manifest(path).get("kind") == STUDENT_KIND:
            raise CheckpointError(
                f"{mp} was written by an older version (not an expert record); rerun --stage assemble and "
                "--stage baselines to rewrite it"
            )
        m = Expert.read_manifest(path)
        info = m["metadata"].get("m2mkd")
        if not isinstance(info, dict):
            raise CheckpointError(f"{mp} is an expert but not an m2mKD student (no metadata.m2mkd)")
        return {**info, "kind": "expert", "name": m["name"], "sha256": m["sha256"], "seal": m["seal"]}

    def load_student_net(self, path: Path) -> nn.Module:
        """The network of a student arm's Expert record (seal and weights' sha256 checked)."""
        return Expert.load(path, device=self.device).net.eval()
