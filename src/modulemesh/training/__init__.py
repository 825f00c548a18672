"""The shared training toolkit.

* ``loop``: ``Trainer``, the continual hook loop (strategies are hooks on it);
* ``fit``: the one step-budget loop (upgrades, m2mKD, federated local updates; ``fit_stacked`` for many clients under vmap);
* ``evaluate``: top-1 accuracy in percent (``accuracy``, ``evaluate_task`` for one task of a scenario);
* ``losses``: KD / KL losses; ``teacher_logits``: a teacher's cached logits on a data set;
* ``optim``: the optimizer factory and schedules; ``pool``: worker processes that die with their parent;
* ``buffer``: the reservoir replay buffer.
"""
