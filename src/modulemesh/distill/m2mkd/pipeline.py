"""``M2MKD``: one m2mKD experiment in an output directory; each stage is a method (see the package doc)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from ...config import to_dict
from ...errors import ConfigError
from .config import STAGES
from .student_stages import StudentStages


class M2MKD(StudentStages):
    """One m2mKD experiment: ``run(stages)`` runs the stages in order; each reuses its finished output."""

    # ------------------------------------------------------------------ report

    def run_report(self) -> dict[str, Any]:
        from .report import build_summary, write_report

        self.check()
        summary = build_summary(self)
        write_report(self.out, summary)
        return summary

    def run(
        self, stages: Sequence[str] = STAGES, jobs: Optional[int] = None, modules: Optional[Sequence[int]] = None
    ) -> Optional[dict[str, Any]]:
        from ...io import atomic_write_yaml

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
