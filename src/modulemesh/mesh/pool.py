"""ExpertPool: the named, ordered set of experts in a mesh."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ..errors import ModuleMeshError
from .expert import Expert


class UnknownExpertError(ModuleMeshError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class ExpertPool(nn.Module):
    """Add, remove, freeze and clone experts by name; order is insertion order (= router index)."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleDict()

    def __len__(self) -> int:
        return len(self.experts)

    def __iter__(self) -> Iterator[Expert]:
        return iter(self.experts.values())  # type: ignore[arg-type]

    def __contains__(self, name: object) -> bool:
        return name in self.experts

    @property
    def names(self) -> list[str]:
        return list(self.experts.keys())

    def __getitem__(self, key: str | int) -> Expert:
        if isinstance(key, int):
            return list(self)[key]
        return self.get(key)

    def get(self, name: str) -> Expert:
        if name not in self.experts:
            known = ", ".join(self.names) or "none (the pool is empty)"
            raise UnknownExpertError(f"unknown expert {name!r}; known experts: {known}")
        return self.experts[name]  # type: ignore[return-value]

    def index(self, name: str) -> int:
        self.get(name)
        return self.names.index(name)

    def add(self, expert: Expert) -> Expert:
        if expert.name in self.experts:
            raise ModuleMeshError(
                f"an expert named {expert.name!r} is already in the pool; remove it first or pick another name"
            )
        if "." in expert.name or not expert.name:
            raise ModuleMeshError(f"expert name {expert.name!r} must be non-empty and contain no '.'")
        self.experts[expert.name] = expert
        return expert

    def remove(self, name: str) -> Expert:
        expert = self.get(name)
        del self.experts[name]
        return expert

    def freeze(self, name: str) -> Expert:
        return self.get(name).freeze()

    def unfreeze(self, name: str) -> Expert:
        return self.get(name).unfreeze()

    def clone(self, name: str, new_name: str) -> Expert:
        return self.add(self.get(name).clone(new_name))

    @property
    def num_parameters(self) -> int:
        return sum(e.num_parameters for e in self)
