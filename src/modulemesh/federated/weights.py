"""The one encoding of module weights that every engine exchanges: ``{module name: expert state dict}``.

A module is a mesh ``Expert`` (``mesh/expert.py``); its weights are ``expert.state_dict()``
(``{"net.0.weight": tensor, ...}``). A set of modules - what a peer hosts, what a client sends,
what the server averages - is ``ModuleStates = {name: state}``: module ``m3`` of the modules
mode, the whole model ``model`` of FedAvg. The sim engine stacks the same states along a client
axis only while it trains (``stack`` / ``unstack``); the Flower engine carries one ``ArrayRecord``
per module; the hivemind engine averages one module per averager. On disk (the resumable
``state.safetensors``) the nesting becomes ``<name>/<param>`` keys (``flatten`` / ``unflatten``).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from ..errors import CheckpointError
from .compress import decode_state, encode_state

State = dict[str, torch.Tensor]
ModuleStates = dict[str, State]
SEP = "/"


def module_names(num_modules: int) -> list[str]:
    """Names of the modules of the modules mode: ``m0 .. m{M-1}``."""
    return [f"m{j}" for j in range(num_modules)]


def stack(states: Sequence[Mapping[str, torch.Tensor]]) -> State:
    """``[state_k]`` -> ``{param: (K, ...)}`` (the sim engine's training layout)."""
    return {n: torch.stack([s[n] for s in states]) for n in states[0]}


def unstack(stacked: Mapping[str, torch.Tensor], k: int) -> State:
    """Member ``k`` of a stacked state (a view; clone before keeping it past the next update)."""
    return {n: v[k] for n, v in stacked.items()}


def clone(states: Mapping[str, Mapping[str, torch.Tensor]], device: torch.device | str | None = None) -> ModuleStates:
    return {
        m: {n: v.detach().to(device if device is not None else v.device).clone() for n, v in s.items()}
        for m, s in states.items()
    }


def flatten(states: Mapping[str, Mapping[str, torch.Tensor]], prefix: str = "") -> State:
    """``{module: {param: t}}`` -> ``{"<prefix><module>/<param>": t}`` for a safetensors file."""
    return {f"{prefix}{m}{SEP}{n}": v for m, s in states.items() for n, v in s.items()}


def unflatten(flat: Mapping[str, torch.Tensor], prefix: str = "") -> ModuleStates:
    out: ModuleStates = {}
    for key, v in flat.items():
        if not key.startswith(prefix):
            continue
        m, sep, n = key[len(prefix) :].partition(SEP)
        if not sep:
            raise CheckpointError(
                f"saved tensor {key!r} is not '<module>{SEP}<param>'; the state file is from another version"
            )
        out.setdefault(m, {})[n] = v
    return out


def encode(states: Mapping[str, Mapping[str, torch.Tensor]], codec: str) -> dict[str, bytes]:
    """One message per module (what goes on the wire; ``len`` is its byte count)."""
    return {m: encode_state(s, codec) for m, s in states.items()}


def decode(blobs: Mapping[str, bytes], device: torch.device | str = "cpu") -> ModuleStates:
    return {m: {n: v.to(device) for n, v in decode_state(b).items()} for m, b in blobs.items()}


def nbytes(blobs: Mapping[str, bytes] | Iterable[bytes]) -> int:
    return sum(len(b) for b in (blobs.values() if isinstance(blobs, Mapping) else blobs))
