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
   plus (``distill.boundary_weight``) an MSE pulling its output towards the meta model's tokens at
   that boundary, which module i+1 reads while it is distilled; optionally an MSE to the teacher
   hybrid's boundary tokens (``feature_weight``). Only the student module and its stitches update.
   The K jobs are independent: ``jobs > 1`` runs them in spawned worker processes; each writes its
   module as a file (safetensors + manifest) that can be copied to another machine.
4. ``assemble``: the K student modules (stitches kept, or folded into one Linear per boundary) form
   the student; each output stitch is recalibrated (ridge regression) to hand the next module the
   meta model's tokens (``assemble.calibrate``); then a short end-to-end fine-tune, on the target
   subset ``target.fraction`` of the training set (the paper's small-target regime; default all).

``baselines`` trains the same network end to end (cross-entropy) and with whole-model KD from the
teacher, each for the student steps that m2mKD used: ``K * distill.steps + assemble.finetune_steps``.
``report`` evaluates every arm on the test set and on shifted copies of it (OOD), with FLOPs and
wall time per stage (see ``report``). Every stage reuses its output when it exists with the
same inputs (a hash in its manifest), so stages can run separately, on different machines, from
the same output directory.

Files: ``config`` (settings, stage names), ``ood`` (shifted test sets), ``recipe`` (optimizer recipe,
losses, FLOPs, stitch folding), ``store`` (paths, data, reuse, evaluation), ``teacher_stages`` and
``student_stages`` (the stages), ``pipeline`` (``M2MKD``), ``jobs`` (module jobs in worker
processes), ``report`` (tables and plot).
"""

from .config import ARMS, STAGES, M2MKDConfig, OptimSection, apply_cli
from .jobs import run_jobs
from .ood import ood_transform, parse_ood
from .pipeline import M2MKD
from .recipe import ce_loss_fn, fit, fold_stitches, inference_flops, kd_loss_fn

__all__ = [
    "M2MKDConfig",
    "M2MKD",
    "STAGES",
    "ARMS",
    "fit",
    "inference_flops",
    "ood_transform",
    "parse_ood",
    "fold_stitches",
    "run_jobs",
    "apply_cli",
    "kd_loss_fn",
    "ce_loss_fn",
    "OptimSection",
]
