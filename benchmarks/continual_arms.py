"""The continual benchmark's arms: a strategy plus its overrides, grouped into sections.

``continual.py`` lists the sections and trains them; this file says what each arm is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from continual_report import TUNING_MD

# ModuleMesh: one small MLP expert (784-20-20-2, 16,162 parameters) per task, the density router
# (10 PPCA components per expert); the train settings of the library's default experiment.
MM_DENSITY = [
    "expert.backbone={type: mlp, hidden: [20, 20]}",
    "router.type=density",
    "router.components=10",
    "train.batch_size=32",
    "train.lr=0.1",
]
# Ablation: the same experts, a learned top-1 gate trained on the replay buffer.
MM_GATE = [
    "expert.backbone={type: mlp, hidden: [20, 20]}",
    "router.type=topk",
    "router.k=1",
    "train.batch_size=32",
    "train.lr=0.1",
]
# Task-IL (the task id is given, so the oracle router picks the task's expert): one small CNN per
# task, conv 3x3 16-32-32 (BN, ReLU, max-pool 2 each) -> FC 64 -> 2, 32,834 parameters per expert,
# 164,170 for the five (1.83x the 89,610 of the 784-100-100-10 MLP; the issue allows 2x). Trained
# with the config's shared settings (batch 10, SGD lr 0.03, 1 epoch per task; not tuned).
MM_CNN_ORACLE = ["expert.backbone={type: cnn, channels: [16, 32, 32], hidden: 64}", "router.type=oracle"]
# joint: see JOINT_NOTE. Batch 32 / lr 0.1 keeps Mammoth's lr/batch ratio (0.03/10).
JOINT_FIX = ["train.batch_size=32", "train.lr=0.1"]


@dataclass
class Arm:
    label: str
    strategy: str
    overrides: list[str] = field(default_factory=list)
    note: str = ""
    seeds: int = 0  # 0: the section's seeds


@dataclass
class Section:
    key: str
    title: str
    config: str
    overrides: list[str]
    arms: list[Arm]
    seeds: int
    buffer: int | None
    caption: str = ""
    tuned: bool = False  # baselines' lr/batch from the config's per_strategy blocks (chosen by compare --tune)


# Mammoth's best_args for seq-mnist where they differ from the configs' shared settings
# (lr 0.03, DER alpha 1.0, DER++ alpha 1.0 / beta 0.5): the settings behind the published numbers.
MAMMOTH = {
    200: {
        "er": ["train.lr=0.01"],
        "si": ["train.lr=0.1"],
        "icarl": ["train.lr=0.1"],
        "der": ["alpha=0.2"],
        "derpp": ["alpha=0.2", "beta=1.0"],
    },
}


def baseline_arms(with_mm_gate: bool = True, mammoth: int | None = None) -> list[Arm]:
    best = MAMMOTH.get(mammoth, {})

    def arm(name):
        sets = best.get(name, [])
        return Arm(
            name,
            name,
            [o if o.startswith("train.") else f"strategy.{o}" for o in sets],
            note=("Mammoth: " + ", ".join(sets)) if sets else "",
        )

    arms = [
        Arm("finetune", "finetune", note="lower bound"),
        Arm("joint", "joint", JOINT_FIX, note="upper bound, batch 32 / lr 0.1 (see note)"),
        arm("ewc"),
        arm("si"),
        arm("lwf"),
        arm("icarl"),
        arm("er"),
        arm("der"),
        arm("derpp"),
        Arm("modulemesh (density)", "modulemesh", MM_DENSITY, note="headline config"),
    ]
    if with_mm_gate:
        arms.append(Arm("modulemesh (top-1 gate + replay)", "modulemesh", MM_GATE, note="ablation"))
    return arms


def config_arms(note: str) -> list[Arm]:
    """Every strategy exactly as ``modulemesh compare CONFIG`` runs it: no overrides, each baseline's lr and batch
    size from the config's per_strategy blocks (``note`` says where they come from)."""
    arms = [
        Arm("finetune", "finetune", note="lower bound; " + note),
        Arm("joint", "joint", note="upper bound; " + note),
    ]
    arms += [Arm(s, s, note=note) for s in ("ewc", "si", "lwf", "icarl", "er", "der", "derpp")]
    arms.append(Arm("modulemesh (density)", "modulemesh", note="the config's per_strategy.modulemesh block"))
    arms.append(
        Arm(
            "modulemesh (top-1 gate + replay)",
            "modulemesh",
            MM_GATE + ["strategy.buffer_size=500"],
            note="ablation: the block's settings with a top-1 gate, buffer 500, lr 0.1 / batch 32",
        )
    )
    return arms


def tuned_arms() -> list[Arm]:
    return config_arms(f"lr / batch chosen on validation ({TUNING_MD})")
