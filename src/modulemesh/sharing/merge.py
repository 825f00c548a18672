"""``merge``: one expert from copies of the same module that peers trained on (seed 002's merging).

The inputs must share architecture, input shape and classes. Methods:

- ``mean``: the plain average of the weights (FedAvg of the copies);
- ``fisher``: Fisher-weighted average (Matena & Raffel 2022), each copy's diagonal Fisher computed
  on the given data (``preserve.fisher.fisher_diagonal``, ``preserve.merge.fisher_merge``);
- ``ties``: TIES-merging (Yadav et al. 2023) of the task vectors tau_i = theta_i - theta_base: keep
  each tau_i's largest ``density`` fraction of entries by magnitude, elect each entry's sign by
  the sign of the sum, average the kept entries that agree with it, add to the base: the copies'
  common parent (required: task vectors of copies without one common start are meaningless).

The merged expert's router state: density routers' class components of every copy side by side
(the mixture of the copies' input densities, weighted by their example counts); others: the first's.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch

from ..errors import ModuleMeshError
from ..mesh import Expert
from ..preserve.fisher import fisher_diagonal
from ..preserve.merge import average_states, fisher_merge

Method = Literal["mean", "fisher", "ties"]


def check_mergeable(experts: Sequence[tuple[str, Expert]]) -> None:
    if len(experts) < 2:
        raise ModuleMeshError("merge needs at least two experts")
    src0, e0 = experts[0]
    for src, e in experts[1:]:
        for what, a, b in (
            ("architecture", e0.backbone_spec, e.backbone_spec),
            ("input shape", e0.input_shape, e.input_shape),
            ("classes", e0.classes, e.classes),
        ):
            if a != b:
                raise ModuleMeshError(
                    f"cannot merge {src} into {src0}: different {what} ({b} vs {a}); merge copies of one module "
                    "(compose experts of different classes with `modulemesh compose`)"
                )


def ties_merge(
    states: Sequence[dict[str, torch.Tensor]], base: dict[str, torch.Tensor], density: float = 0.2
) -> dict[str, torch.Tensor]:
    if not 0 < density <= 1:
        raise ModuleMeshError(f"TIES density must be in (0, 1], got {density}")
    out = {}
    for k, ref in base.items():
        if not torch.is_floating_point(ref):
            out[k] = ref.clone()
            continue
        taus = torch.stack([s[k].double() - ref.double() for s in states])
        flat = taus.abs().flatten(1)
        keep = max(1, int(round(density * flat.shape[1])))
        cut = flat.kthvalue(flat.shape[1] - keep + 1, dim=1).values if keep < flat.shape[1] else flat.min(1).values
        trimmed = taus * (taus.abs() >= cut.view(-1, *[1] * (taus.dim() - 1)))
        sign = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        merged = (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)
        out[k] = (ref.double() + merged).to(ref.dtype)
    return out


def _local_labels(expert: Expert, y: torch.Tensor) -> torch.Tensor:
    lookup = torch.full((max(expert.classes) + 1,), -1, dtype=torch.long)
    lookup[torch.tensor(expert.classes)] = torch.arange(len(expert.classes))
    return lookup[y]


def merge_experts(
    experts: Sequence[tuple[str, Expert]],
    method: Method = "mean",
    name: Optional[str] = None,
    data: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    base: Optional[Expert] = None,
    density: float = 0.2,
    fisher_samples: int = 1000,
) -> Expert:
    check_mergeable(experts)
    models = [e for _, e in experts]
    states = [{k: v.detach() for k, v in e.state_dict().items()} for e in models]
    if method == "mean":
        merged = average_states(states)
    elif method == "fisher":
        if data is None:
            raise ModuleMeshError("--method fisher needs data to compute each copy's Fisher (--data NAME)")
        x, y = data
        fishers = []
        for e in models:
            twin = e.clone(e.name).unfreeze()
            fishers.append(fisher_diagonal(twin, (x, _local_labels(e, y)), max_samples=fisher_samples))
        merged = fisher_merge(states, fishers)
    elif method == "ties":
        if base is None:
            raise ModuleMeshError(
                "--method ties needs the copies' common parent (--base EXPERT); without one use mean or fisher"
            )
        check_mergeable([("base", base), *experts])
        merged = ties_merge(states, {k: v.detach() for k, v in base.state_dict().items()}, density)
    else:
        raise ModuleMeshError(f"unknown merge method {method!r}; choose mean, fisher or ties")
    first = models[0]
    out = Expert(
        name or f"{first.name}_merged",
        first.classes,
        first.backbone_spec,
        first.input_shape,
        max(e.version for e in models) + 1,
        {"merged_from": [src for src, _ in experts], "merge_method": method},
    )
    out.load_state_dict(merged)
    out.router_state = _merged_router_state(models)
    return out.freeze()


def _merged_router_state(models: Sequence[Expert]):
    infos = [m.router_state[0] for m in models]
    if not all(i.get("type") == "density" and m.router_state[1] for i, m in zip(infos, models)):
        return models[0].router_state
    state: dict[str, torch.Tensor] = {}
    counts, labels, offset = [], [], 0
    for m in models:
        s = m.router_state[1]
        counts.append(s["counts"])
        labels.append(s.get("labels"))  # each component's global class (absent in older records)
        for key, t in s.items():
            if key not in ("counts", "labels"):
                c, rest = key.split(".", 1)
                state[f"class{int(c[5:]) + offset}.{rest}"] = t
        offset += len(s["counts"])
    state["counts"] = torch.cat(counts)
    if all(lab is not None for lab in labels):
        state["labels"] = torch.cat(labels)
    return {**infos[0], "fitted": True}, state
