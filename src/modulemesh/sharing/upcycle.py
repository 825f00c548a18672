"""Sparse upcycling (Komatsuzaki et al., ICLR 2023): a trained dense model becomes a mesh of E experts.

Every expert starts as an exact copy of the dense model and the top-k gate's output layer starts at
zero, so the gate gives every expert weight 1/E. A mixture of E identical distributions is that
distribution: at step 0 the mesh computes exactly the dense model's function (a test checks it).
Whole networks are copied: the mesh's experts are separate records (saved, composed, forgotten one
by one), which a trunk shared by the copies would break.

Identical experts stay identical under training: they get identical gradients, and the gate gets
none (a softmax over equal experts has a flat loss); only the load-balance term's argmax, which
breaks ties towards expert 0, nudges them apart, by about 1e-4 in 40 steps. ``break_symmetry``
therefore adds small noise to each copy's weight matrices (``noise`` times each matrix's own
standard deviation, seeded per expert) before continued training starts. Noise, not per-expert
data orders: in a mixture every expert sees the same batch (that is what teaches the gate), so
giving each its own data order would mean training them apart, without the gate; noise keeps data
and loss the same and changes the function by very little (the report states the accuracy right
after it). Training then minimizes the mixture's NLL plus ``load_balance_weight`` times the mesh's
Switch-style load-balance term.

Sparse training (``router.train_k`` < E), so that a step costs about one dense step plus the gate:
each input trains only its gate's top ``train_k`` experts. With ``train_k >= 2`` the kept weights are
renormalized and the mixture's NLL teaches the gate through their ratios. With ``train_k = 1`` a
renormalized weight is always 1 and gives the gate no gradient; the selected expert's logits are
instead multiplied by s = p_i / stopgrad(p_i) (Switch Transformer's output scaling by the gate
probability, made straight-through: its value is 1, so the mesh still is the dense model at step 0 and
training computes what top-1 evaluation computes, while dL/ds, the gain from sharpening that expert's
prediction, reaches the gate: inputs move towards experts that are right on them). Both use the
load-balance term on the full gate probabilities.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..checkpoint import module_paths
from ..config import OptimizerSection, Section
from ..errors import CheckpointError, ConfigError, ModuleMeshError
from ..mesh import Expert, ExpertPool, ModuleMesh, TopKRouter
from ..mesh.integrity import read_json
from ..mesh.mesh import NO_COVER
from ..mesh.provenance import stamp
from ..mesh.regularizers import load_balance_loss
from ..mesh.routers import topk_mask
from ..training.fit import FitResult, TensorBatches, fit
from ..training.optim import OptimizerSpec


class RouterSection(Section):
    k: Union[int, Literal["auto"]] = Field(1, description="experts per input at evaluation; auto: threshold rule")
    threshold: Optional[float] = Field(None, gt=0, le=1, description="adaptive compute, with k: auto")
    hidden: int = Field(16, ge=0, description="width of the gate's hidden layer; 0: a linear gate")
    temperature: float = Field(1.0, gt=0)
    dense_training: bool = Field(True, description="train with every expert (else the top-k ones)")
    load_balance_weight: float = Field(0.01, ge=0)
    train_k: Optional[int] = Field(
        None, ge=1, description="experts each input trains (1: sparse upcycling); unset: dense_training decides"
    )

    @model_validator(mode="after")
    def _k(self) -> "RouterSection":
        if self.k != "auto" and self.k < 1:
            raise ValueError(f"router.k must be a positive integer or auto (got {self.k})")
        if (self.k == "auto") != (self.threshold is not None):
            raise ValueError("adaptive compute needs both router.k: auto and router.threshold: p with 0 < p <= 1")
        return self


class TrainSection(OptimizerSection):
    steps: int = Field(300, ge=0)
    batch_size: int = Field(128, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    lr: float = Field(0.05, gt=0)


class UpcycleConfig(Section):
    """``--config CFG``: the router, the noise and the continued training of an upcycled mesh."""

    experts: int = Field(4, ge=2)
    noise: float = Field(0.01, ge=0, description="symmetry breaking: noise std / each weight matrix's std")
    router: RouterSection = Field(default_factory=RouterSection)
    train: TrainSection = Field(default_factory=TrainSection)

    @model_validator(mode="after")
    def _k_fits(self) -> "UpcycleConfig":
        if self.router.k != "auto" and self.router.k > self.experts:
            raise ValueError(f"router.k={self.router.k} exceeds the {self.experts} experts; pick k <= experts")
        if (self.router.train_k or 0) > self.experts:
            raise ValueError(
                f"router.train_k={self.router.train_k} exceeds the {self.experts} experts; pick train_k <= experts"
            )
        return self

    @property
    def train_k(self) -> int:
        """Experts each input trains in continued training (E: dense routing)."""
        r = self.router
        if r.train_k is not None:
            return r.train_k
        return self.experts if r.dense_training or r.k == "auto" else min(r.k, self.experts)


def load_dense(source: Union[str, os.PathLike]) -> Expert:
    """The dense model to upcycle: an expert record (PATH or PATH.json), ``MESH_DIR:NAME`` (one expert
    of a saved mesh; ``MESH_DIR`` alone when it holds one expert) or a stand-alone model file
    (``preserve.train.save_model``; ``kind: model``)."""
    text = str(source)
    mesh_dir, _, name = text.rpartition(":") if ":" in text else ("", "", "")
    if mesh_dir and Path(mesh_dir).is_dir():
        return _from_mesh(Path(mesh_dir), name)
    p = Path(text)
    if p.is_dir():
        return _from_mesh(p, None)
    manifest_path = module_paths(p)[1]
    if not manifest_path.exists():
        raise CheckpointError(
            f"no dense model at {text}: give an expert record (PATH or PATH.json), a model file or MESH_DIR:EXPERT"
        )
    kind = read_json(manifest_path, "module manifest").get("kind")
    if kind == "expert":
        return Expert.load(p)
    if kind == "model":
        from ..preserve.train import load_model

        model, manifest = load_model(p)
        expert = Expert(p.name.replace(".", "_"), manifest["classes"], manifest["backbone"], manifest["input_shape"])
        expert.net.load_state_dict(model.state_dict())
        return expert
    raise CheckpointError(f"{manifest_path} holds a {kind!r} module; upcycle needs an expert or a model")


def _from_mesh(directory: Path, name: Optional[str]) -> Expert:
    mesh = ModuleMesh.load(directory)
    if name:
        return mesh.pool.get(name)  # an unknown name lists the known ones
    if len(mesh.experts) != 1:
        raise ModuleMeshError(
            f"{directory} holds {len(mesh.experts)} experts; name the one to upcycle as {directory}:NAME "
            f"(one of {', '.join(mesh.pool.names)})"
        )
    return mesh.experts[0]


def upcycle(dense: Expert, cfg: UpcycleConfig, num_classes: Optional[int] = None) -> ModuleMesh:
    """A mesh of ``cfg.experts`` exact copies of ``dense`` behind a zero-initialized (uniform) top-k gate."""
    if cfg.experts < 2:
        raise ModuleMeshError(f"--experts must be at least 2 (got {cfg.experts}); one expert is the dense model")
    r = cfg.router
    top = max(dense.classes) + 1
    if num_classes is not None and num_classes < top:
        raise ModuleMeshError(f"num_classes {num_classes} is below the largest class the model covers ({top - 1})")
    gate = TopKRouter(
        math.prod(dense.input_shape),
        num_experts=cfg.experts,
        k=r.k,
        temperature=r.temperature,
        hidden=r.hidden,
        dense_training=r.dense_training,
    )
    with torch.no_grad():  # neutral start: equal gate logits for every input -> weights 1/E
        gate.head.weight.zero_()
        gate.head.bias.zero_()
    gate.threshold = r.threshold
    pool = ExpertPool()
    base = dense.name.replace(".", "_")
    for i in range(cfg.experts):
        copy = dense.clone(f"{base}_e{i}").unfreeze()
        copy.metadata = {**copy.metadata, "initialized_from": dense.name, "upcycled_from": dense.name}
        copy.router_state = ({}, {})
        pool.add(copy)
    mesh = ModuleMesh(num_classes or top, tuple(dense.input_shape), gate, pool)
    return mesh


@torch.no_grad()
def break_symmetry(mesh: ModuleMesh, noise: float, seed: int) -> None:
    """Add N(0, (noise * std(W))^2) to every weight matrix W of every expert, seeded per expert."""
    if noise <= 0:
        return
    for i, expert in enumerate(mesh.experts):
        g = torch.Generator().manual_seed(seed * 1009 + i)
        for p in expert.parameters():
            if p.dim() >= 2 and p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=g).to(p) * (noise * float(p.std())))


def training_log_probs(mesh: ModuleMesh, x: torch.Tensor, train_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training forward with ``train_k`` experts per input: (log p(y|x) over the mesh's classes, full
    gate probabilities). ``train_k`` >= E is the mesh's own (dense) forward; below E only the selected
    experts run (see the module docstring for the top-1 straight-through weight)."""
    router = mesh.router
    if train_k >= len(mesh.experts):
        out = mesh(x)
        return out.log_probs, out.weights
    if not isinstance(router, TopKRouter):
        raise ModuleMeshError(f"sparse training needs the top-k gate, not {type(router).__name__}")
    probs = F.softmax(router.gate_logits(x) / router.temperature, dim=1)
    if train_k > 1:
        return mesh._mix_sparse(x, topk_mask(probs, train_k, renormalize=True)), probs
    chosen = probs.argmax(1)
    out = x.new_full((x.shape[0], mesh.num_classes), NO_COVER, dtype=torch.float32)
    for i, expert in enumerate(mesh.experts):
        rows = (chosen == i).nonzero(as_tuple=True)[0]
        if rows.numel():
            p = probs[rows, i : i + 1]
            out = out.index_copy(0, rows, mesh._global(expert, expert(x[rows]) * (p / p.detach())))
    return out, probs


def mesh_loss(mesh: ModuleMesh, load_balance_weight: float, train_k: Optional[int] = None) -> Callable:
    """The NLL of the training forward (``train_k`` experts per input; None: every expert) plus the
    load-balance term, as ``fit``'s loss."""
    k = len(mesh.experts) if train_k is None else train_k

    def loss_fn(xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        log_probs, probs = training_log_probs(mesh, xb, k)
        loss = F.nll_loss(log_probs, yb)
        if load_balance_weight > 0:
            loss = loss + load_balance_weight * load_balance_loss(probs)
        return loss

    return loss_fn


def continue_training(
    mesh: ModuleMesh,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: UpcycleConfig,
    seed: int = 0,
    steps: Optional[int] = None,
    device: Optional[torch.device] = None,
    on_step: Optional[Callable[[int], None]] = None,
) -> FitResult:
    """Train the whole mesh (experts and gate) for ``steps`` steps (default ``cfg.train.steps``) with
    ``fit``; the result carries the FLOPs per step (counted). Call ``break_symmetry`` first."""
    steps = cfg.train.steps if steps is None else steps
    t = cfg.train
    batches = TensorBatches(x, y, steps, t.batch_size, seed, device)
    spec = OptimizerSpec(t.optimizer, t.lr, t.momentum, t.weight_decay)
    return fit(
        mesh,
        mesh_loss(mesh, cfg.router.load_balance_weight, cfg.train_k),
        batches,
        steps=steps,
        optimizer=spec,
        modules=[mesh],
        count_flops=steps > 0,
        on_step=(lambda s, loss: on_step(s)) if on_step else None,
        what="the upcycled mesh",
    )


def record_provenance(mesh: ModuleMesh, dense: Expert, x: torch.Tensor, y: torch.Tensor, config: dict, acc: float):
    """Each expert's provenance: its parent (the dense model) and the continued training as one task."""
    task = SimpleNamespace(id=0, name="upcycle", classes=sorted(set(dense.classes)), x_train=x, y_train=y)
    task.num_train = int(x.shape[0])
    for expert in mesh.experts:
        stamp(expert, task, config, acc, parent=dense)


@torch.no_grad()
def evaluate_mesh(mesh: ModuleMesh, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> dict[str, float]:
    """Test accuracy (%) and mean per-sample inference costs (experts actually run + router)."""
    from ..mesh.adaptive import inference_costs
    from ..training.evaluate import count_correct

    device = next(mesh.parameters()).device
    mesh.eval()
    weights: list[torch.Tensor] = []

    def scores_of(xb: torch.Tensor) -> torch.Tensor:
        out = mesh(xb)
        weights.append(out.weights.cpu())
        return out.log_probs

    correct = count_correct(scores_of, x, y, batch_size, device)
    return {"accuracy": 100.0 * correct / max(len(y), 1), **inference_costs(mesh, torch.cat(weights))}


def check_data(dense: Expert, x: torch.Tensor, data: str) -> None:
    if tuple(x.shape[1:]) != tuple(dense.input_shape):
        raise ConfigError(
            f"data set {data!r} has inputs {tuple(x.shape[1:])}, the dense model takes {tuple(dense.input_shape)}; "
            "upcycle on the data the model was trained for"
        )


__all__ = [
    "UpcycleConfig",
    "load_dense",
    "upcycle",
    "break_symmetry",
    "training_log_probs",
    "mesh_loss",
    "continue_training",
    "record_provenance",
    "check_data",
    "evaluate_mesh",
]
