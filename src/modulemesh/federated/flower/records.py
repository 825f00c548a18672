"""What Flower messages carry, and the run's config and data on every node."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from ...errors import ModuleMeshError

try:
    from flwr.app import Array, ArrayRecord, RecordDict
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ModuleMeshError(
        f"the Flower engine needs the optional extra: pip install 'modulemesh[flower]' ({e}); or use --engine sim"
    ) from None

from .. import weights as wmod

MODULE = "module:"  # RecordDict key prefix of a module's ArrayRecord
DATA_CACHE: dict[str, Any] = {}


def experiment(exp_dict: dict):
    from ..config import FederateExperiment

    return FederateExperiment.model_validate(exp_dict)


def run_data(exp_dict: dict):
    """The run's seeded split, built once per process (each Flower worker rebuilds the same one)."""
    key = json.dumps(exp_dict, sort_keys=True)
    if key not in DATA_CACHE:
        from ..sim.data import fed_data_from_experiment

        DATA_CACHE.clear()
        DATA_CACHE[key] = fed_data_from_experiment(experiment(exp_dict), "cpu")
    return DATA_CACHE[key]


def provide_data(exp_dict: dict, data) -> None:
    """Hand an already loaded split to the in-process simulation (no second load)."""
    DATA_CACHE.clear()
    DATA_CACHE[json.dumps(exp_dict, sort_keys=True)] = data


def blob_record(blob: bytes) -> ArrayRecord:
    return ArrayRecord({"blob": Array(np.frombuffer(blob, dtype=np.uint8).copy())})


def record_blob(rec: ArrayRecord) -> bytes:
    return rec["blob"].numpy().tobytes()


def put_modules(content: RecordDict, states: wmod.ModuleStates) -> int:
    """One ArrayRecord per module into ``content``; returns the bytes added."""
    n = 0
    for m, s in states.items():
        rec = ArrayRecord(torch_state_dict={k: v.detach().cpu().clone() for k, v in s.items()})
        content[MODULE + m] = rec
        n += int(rec.count_bytes())
    return n


def get_modules(content: RecordDict) -> wmod.ModuleStates:
    return {
        k[len(MODULE) :]: dict(rec.to_torch_state_dict())
        for k, rec in content.array_records.items()
        if k.startswith(MODULE)
    }


def modules_nbytes(content: RecordDict) -> int:
    return sum(int(rec.count_bytes()) for k, rec in content.array_records.items() if k.startswith(MODULE))


def tensor_record(t: torch.Tensor) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={"x": t.detach().cpu().contiguous()})


def record_tensor(rec: ArrayRecord) -> torch.Tensor:
    return rec.to_torch_state_dict()["x"]
