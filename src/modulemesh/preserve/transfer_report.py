"""What a transfer did, layer by layer (``TransferReport``; markdown for ``upgrade``'s report)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional


@dataclass
class LayerReport:
    target: str
    kind: str
    target_shape: list[int]
    source: Optional[str]
    source_shape: Optional[list[int]]
    relation: str  # copied | narrowed | widened | resized | identity | new | unmapped
    fraction_transferred: float
    importance_mass_carried: Optional[float]
    similarity: float
    score: Optional[float]
    note: str = ""


@dataclass
class TransferReport:
    layers: list[LayerReport]
    beta: float
    tau: Optional[float]
    mode: str  # "chain" or "by-name"
    fraction_transferred: float = 0.0
    importance_mass_carried: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        head = (
            "| target layer | shape | source layer | source shape | relation | transferred | Fisher mass carried "
            "| sim | M = sim*I |\n"
        )
        head += "|---|---|---|---|---|---|---|---|---|\n"
        rows = []
        for r in self.layers:
            mass = "n/a" if r.importance_mass_carried is None else f"{r.importance_mass_carried:.1%}"
            score = "n/a" if r.score is None else f"{r.score:.3f}"
            rows.append(
                f"| {r.target} | {'x'.join(map(str, r.target_shape))} | {r.source or '-'} | "
                f"{'x'.join(map(str, r.source_shape)) if r.source_shape else '-'} | {r.relation} | "
                f"{r.fraction_transferred:.1%} | {mass} | {r.similarity:.2f} | {score} |"
            )
        tail = (
            f"\nOverall: {self.fraction_transferred:.1%} of the new model's parameters transferred, carrying "
            f"{self.importance_mass_carried:.1%} of the old model's Fisher mass (beta={self.beta}, tau={self.tau}, "
            f"mode={self.mode}).\n"
        )
        notes = [f"- {r.target}: {r.note}" for r in self.layers if r.note]
        notes += [f"- warning: {w}" for w in self.warnings if not w.startswith("layer ")]
        return head + "\n".join(rows) + "\n" + tail + ("\n" + "\n".join(notes) + "\n" if notes else "")
