"""m2mKD's configuration (``modulemesh m2mkd CONFIG``) and the names of its stages, arms and file kinds."""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Union

from pydantic import Field, field_validator

from ...config import Section
from ..models import looks_like_spec, parse_spec
from .ood import parse_ood

Progress = Optional[Callable[[str, int], Callable[[int], None]]]
Log = Optional[Callable[[str], None]]
NET_KIND = "m2mkd_net"
TEACHER_MODULE_KIND = "m2mkd_teacher_module"
STUDENT_MODULE_KIND = "m2mkd_student_module"
STUDENT_KIND = "m2mkd_student"
STAGES = ("meta", "teacher", "modules", "assemble", "baselines", "report")
ARMS = {"m2mkd": "m2mKD", "e2e": "end-to-end", "kd": "whole-model KD"}


def spec_field(v: Any) -> dict[str, Any]:
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
        return spec_field(v)


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
    boundary_weight: float = Field(
        1.0,
        ge=0,
        description="relative MSE between module i's output and the meta model's tokens at that boundary "
        "(what module i+1 reads while it is distilled); 0 = off, and the assembled modules then speak "
        "different token spaces",
    )
    lr: Optional[float] = Field(None, gt=0)
    prefix: Literal["meta", "student"] = Field(
        "meta",
        description="what module i reads while distilled: the meta model's first i blocks (independent jobs, "
        "run in parallel) or the distilled student modules 0..i-1 (one after another; the assembled "
        "student is then exactly the last module's hybrid)",
    )


class AssembleSection(Section):
    stitches: Literal["keep", "fold"] = "keep"
    calibrate: bool = Field(
        True,
        description="before fine-tuning, refit each module's output stitch (least squares on fold_samples "
        "training inputs) so the next module reads tokens like the meta model's it was distilled on",
    )
    finetune_steps: int = Field(300, ge=0)
    lr: Optional[float] = Field(None, gt=0, description="default: half of optim.lr")
    loss: Literal["ce", "kd"] = "ce"
    fold_samples: int = Field(512, ge=1)


class BaselineSection(Section):
    enabled: bool = True
    kd: bool = Field(True, description="also train the whole-model KD baseline (end-to-end is always trained)")
    steps: Optional[int] = Field(None, ge=0, description="default: the student steps m2mKD used")


class TargetSection(Section):
    """The paper's regime: meta model, teacher and modules learn on the (large) source training set,
    the end-to-end phase (assembled fine-tune and the baselines) on a small target subset of it."""

    fraction: float = Field(
        1.0, gt=0, le=1, description="share of the training set the end-to-end phase and the baselines train on"
    )
    seed: int = Field(0, ge=0, description="draws the target subset (the same for every run seed)")


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
    target: TargetSection = Field(default_factory=TargetSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    jobs: int = Field(1, ge=1)

    @field_validator("student")
    @classmethod
    def _student(cls, v: Any) -> dict[str, Any]:
        return spec_field(v)

    @field_validator("eval")
    @classmethod
    def _ood(cls, v: EvalSection) -> EvalSection:
        for name in v.ood:
            parse_ood(name)
        return v


def apply_cli(
    cfg_overrides: list[str],
    teacher: Optional[str],
    student: Optional[str],
    modules: Optional[int],
    jobs: Optional[int],
) -> dict[str, Any]:
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
