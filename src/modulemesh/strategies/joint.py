"""Joint training: at task t, train on the union of tasks 0..t (the upper bound; not continual)."""

import torch

from .finetune import Finetune


class Joint(Finetune):
    name = "joint"

    def train_data(self, ctx):
        seen = self.scenario.tasks[: ctx.task.id + 1]
        return (
            torch.cat([t.x_train for t in seen]),
            torch.cat([t.y_train for t in seen]),
            torch.cat([torch.full_like(t.y_train, t.id) for t in seen]),
        )
