"""ModuleMesh: a router over a pool of experts, predicting over one global label space.

Experts may cover different class subsets. Each expert's softmax over its own classes is placed
into the global label space (zero probability elsewhere) and the mesh output is the mixture

    p(y | x) = sum_i w_i(x) p_i(y | x)

computed in log space. The mesh returns log-probabilities, so ``F.nll_loss`` on them is the
mixture's negative log-likelihood; for a single expert covering every class it equals the usual
cross-entropy. Experts whose weight is zero for an input (top-k routing, adaptive compute: see
``adaptive``) are not run on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_module, save_module
from ..errors import CheckpointError, ModuleMeshError
from ..io import atomic_write_json
from .density import DensityRouter
from .expert import Expert
from .expert_routing import export_expert_state
from .integrity import check_file_hashes, check_seal, file_hashes, read_json, require, seal
from .pool import ExpertPool
from .routers import EntropyRouter, OracleRouter, RandomRouter, Router, TopKRouter, prediction_entropy

# Log-probability of a class no running expert covers: finite (unlike -inf) so logaddexp and its
# gradients stay defined, and far below any real log-probability so it never wins an argmax.
NO_COVER = -1e4
FORMAT = "modulemesh.mesh/2"


@dataclass
class MeshOutput:
    log_probs: torch.Tensor  # (N, C) log p(y|x) over the global label space
    weights: torch.Tensor  # (N, E) routing weights, 0 where an expert did not run
    gate_logits: torch.Tensor | None = None  # (N, E) for learned gates
    entropies: torch.Tensor | None = None  # (N, E) prediction entropy of each expert (dense routing)


class ModuleMesh(nn.Module):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...], router: Router, pool: ExpertPool | None = None):
        super().__init__()
        self.num_classes = int(num_classes)
        self.input_shape = tuple(input_shape)
        self.router = router
        self.pool = pool if pool is not None else ExpertPool()
        if router.num_experts > len(self.pool):
            raise ModuleMeshError(
                f"router has {router.num_experts} expert slots but the pool holds {len(self.pool)} experts"
            )
        for expert in self.pool:
            self.check_fits(expert)
        while router.num_experts < len(self.pool):
            router.add_expert()

    # ------------------------------------------------------------------ experts
    @property
    def experts(self) -> list[Expert]:
        return list(self.pool)

    def check_fits(self, expert: Expert) -> None:
        bad = [c for c in expert.classes if not 0 <= c < self.num_classes]
        if bad:
            raise ModuleMeshError(
                f"expert {expert.name!r} covers classes {bad} outside this mesh's 0..{self.num_classes - 1}"
            )
        if tuple(expert.input_shape) != self.input_shape:
            raise ModuleMeshError(
                f"expert {expert.name!r} takes inputs {expert.input_shape}, the mesh gets {self.input_shape}"
            )

    def add_expert(self, expert: Expert) -> Expert:
        self.check_fits(expert)
        self.pool.add(expert)
        self.router.add_expert()
        device = next((p.device for p in self.parameters()), None)
        return expert.to(device) if device is not None else expert

    def remove_expert(self, name: str) -> Expert:
        index = self.pool.index(name)
        expert = self.pool.remove(name)
        self.router.remove_expert(index)
        return expert

    def covered_classes(self) -> set[int]:
        return {c for e in self.pool for c in e.classes}

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> MeshOutput:
        if len(self.pool) == 0:
            raise ModuleMeshError("the mesh has no experts yet; add one with mesh.add_expert(Expert(...))")
        if tuple(x.shape[1:]) != self.input_shape and x[0].numel() != _prod(self.input_shape):
            raise ModuleMeshError(
                f"input batch has shape {tuple(x.shape)}; this mesh expects (N, "
                f"{', '.join(map(str, self.input_shape))})"
            )
        experts = self.experts
        if self.router.needs_expert_outputs:
            logits = [e(x) for e in experts]
            weights, gate = self.router(x, logits, task_ids)
            return MeshOutput(
                self._mix_dense(logits, weights), weights, gate, torch.stack([prediction_entropy(z) for z in logits], 1)
            )
        if len(experts) == 1:
            # Fast path (a monolithic model): one expert gets all the weight; no gate to run.
            weights = x.new_ones(x.shape[0], 1, dtype=torch.float32)
            return MeshOutput(self._global(experts[0], experts[0](x)), weights)
        weights, gate = self.router(x, None, task_ids)
        if bool((weights > 0).all()):
            return MeshOutput(self._mix_dense([e(x) for e in experts], weights), weights, gate)
        return MeshOutput(self._mix_sparse(x, weights), weights, gate)

    def _global(self, expert: Expert, logits: torch.Tensor) -> torch.Tensor:
        lp = F.log_softmax(logits, dim=1)
        if len(expert.classes) == self.num_classes and expert.covers_in_order:
            return lp
        out = lp.new_full((lp.shape[0], self.num_classes), NO_COVER)
        return out.index_copy(1, expert.class_index, lp)

    def _mix_dense(self, logits: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        logw = weights.clamp_min(1e-30).log()
        terms = torch.stack(
            [self._global(e, z) + logw[:, i : i + 1] for i, (e, z) in enumerate(zip(self.experts, logits))]
        )
        return torch.logsumexp(terms, dim=0)

    def _mix_sparse(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        acc = x.new_full((x.shape[0], self.num_classes), NO_COVER, dtype=torch.float32)
        for i, expert in enumerate(self.experts):
            rows = (weights[:, i] > 0).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            term = self._global(expert, expert(x[rows])) + weights[rows, i : i + 1].log()
            acc = acc.index_copy(0, rows, torch.logaddexp(acc[rows], term))
        return acc

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self(x, task_ids).log_probs.argmax(1)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Each expert as its own record (with its router state), the whole router as one more module,
        and ``mesh.json`` tying them: it lists every file's sha256 and is sealed (its seal is the root)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for i, e in enumerate(self.pool):
            e.router_state = export_expert_state(self.router, i)
            e.save(d / "experts" / e.name)
        save_module(d / "router", self.router.export_state(), {"kind": "router", **router_spec(self.router)})
        files = ["router.json"] + [f"experts/{name}.json" for name in self.pool.names]
        return atomic_write_json(
            d / "mesh.json",
            seal(
                {
                    "format": FORMAT,
                    "num_classes": self.num_classes,
                    "input_shape": list(self.input_shape),
                    "experts": self.pool.names,
                    "router": router_spec(self.router),
                    "files": file_hashes(d, files),
                }
            ),
        )

    @staticmethod
    def read_manifest(directory: str | os.PathLike) -> dict:
        """mesh.json after checking its seal, its fields and the sha256 of every file it lists."""
        d = Path(directory)
        path = d / "mesh.json"
        if not path.exists():
            raise CheckpointError(f"{d} holds no mesh.json; point at a directory written by ModuleMesh.save()")
        meta = read_json(path, "mesh manifest")
        check_seal(meta, path)
        require(meta, path, format=str, num_classes=int, input_shape=list, experts=list, router=dict, files=dict)
        if meta["format"] != FORMAT:
            raise CheckpointError(f"{path} has format {meta['format']!r}; this version reads {FORMAT!r}, re-save it")
        needed = {"router.json", *(f"experts/{name}.json" for name in meta["experts"])}
        if not needed <= set(meta["files"]):
            raise CheckpointError(f"{path} lacks the hashes of {sorted(needed - set(meta['files']))}; re-save the mesh")
        check_file_hashes(d, meta["files"], path)
        return meta

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> ModuleMesh:
        d = Path(directory)
        meta = cls.read_manifest(d)
        pool = ExpertPool()
        for name in meta["experts"]:
            pool.add(Expert.load(d / "experts" / name))
        state, rmeta = load_module(d / "router")
        try:
            router = router_from_spec(meta["router"], tuple(meta["input_shape"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"router spec in {d / 'mesh.json'} is not usable ({e!r}); re-save the mesh") from None
        mesh = cls(meta["num_classes"], tuple(meta["input_shape"]), router, pool)
        try:
            router.import_state(state)
        except (RuntimeError, KeyError, ValueError, IndexError) as e:
            raise CheckpointError(f"router weights in {d} do not match its manifest: {str(e).splitlines()[0]}") from e
        return mesh.to(device)


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def router_spec(router: Router) -> dict[str, Any]:
    """The router's constructor settings for mesh.json, plus its adaptive-compute threshold when set."""
    spec = _router_settings(router)
    if router.threshold is not None:
        spec["threshold"] = router.threshold
    return spec


def _router_settings(router: Router) -> dict[str, Any]:
    if isinstance(router, EntropyRouter):
        return {"type": "entropy", "temperature": router.temperature, "normalize": router.normalize}
    if isinstance(router, TopKRouter):
        return {
            "type": "topk",
            "k": router.k,
            "temperature": router.temperature,
            "hidden": router.hidden,
            "renormalize": router.renormalize,
            "dense_training": router.dense_training,
            "num_experts": router.num_experts,
        }
    if isinstance(router, RandomRouter):
        return {"type": "random", "k": router.k}
    if isinstance(router, DensityRouter):
        return {"type": "density", **router.spec()}
    if isinstance(router, OracleRouter):
        return {"type": "oracle", "task_to_expert": {str(k): v for k, v in router.task_to_expert.items()}}
    raise ModuleMeshError(f"cannot save router of type {type(router).__name__}")


def router_from_spec(spec: dict[str, Any], input_shape: tuple[int, ...]) -> Router:
    router = _router_from_settings(spec, input_shape)
    try:
        router.threshold = spec.get("threshold")
    except ModuleMeshError as e:
        raise ValueError(str(e)) from None
    return router


def _router_from_settings(spec: dict[str, Any], input_shape: tuple[int, ...]) -> Router:
    kind = spec.get("type")
    if kind == "entropy":
        return EntropyRouter(temperature=spec["temperature"], normalize=spec.get("normalize", False))
    if kind == "topk":
        return TopKRouter(
            _prod(input_shape),
            num_experts=spec["num_experts"],
            k=spec["k"],
            temperature=spec["temperature"],
            hidden=spec["hidden"],
            renormalize=spec["renormalize"],
            dense_training=spec.get("dense_training", True),
        )
    if kind == "random":
        return RandomRouter(k=spec["k"])
    if kind == "density":
        return DensityRouter.from_spec(spec)
    if kind == "oracle":
        r = OracleRouter()
        r.task_to_expert = {int(k): int(v) for k, v in spec.get("task_to_expert", {}).items()}
        return r
    raise CheckpointError(f"unknown router type {kind!r} in a saved mesh")
