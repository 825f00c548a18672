"""Fine-tuning: one monolithic expert over all classes, trained on each task in turn.

The lower bound of continual learning: nothing protects earlier tasks.
"""

from .base import Strategy


class Finetune(Strategy):
    name = "finetune"

    def setup(self, mesh) -> None:
        mesh.add_expert(self.new_expert("model", list(range(self.scenario.num_classes))))
        if hasattr(mesh.router, "assign"):
            for task in self.scenario:
                mesh.router.assign(task.id, 0)
