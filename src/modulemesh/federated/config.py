"""Typed config of ``modulemesh federate`` (YAML + ``--set`` via ``modulemesh.config.load_config``)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from ..config import DataConfig, Section
from .compress import parse_codec


class DistillConfig(Section):
    """Federated distillation (seed 004): clients send logits on a public proxy set."""

    proxy_size: int = Field(5000, ge=10, description="unlabelled public examples held out of the training pool")
    temperature: float = Field(
        2.0, gt=0, description="KD temperature T of the student (and of clients' back-distillation)"
    )
    score: Literal["neg_entropy", "max_prob", "uniform"] = "neg_entropy"
    tau: float = Field(1.0, gt=0, description="confidence temperature: alpha_k = softmax_k(conf_k / tau)")
    space: Literal["logits", "probs"] = "logits"
    robust: Literal["none", "median", "trimmed_mean"] = "none"
    client_weight: float = Field(
        1.0, ge=0, description="weight of KD toward last round's global soft labels in local training (0 = one-way FD)"
    )
    digest_epochs: float = Field(
        0.0,
        ge=0,
        description="FedMD's digest (Li & Wang 2019): before each round's local training, a client trains this many "
        "epochs over the proxy set on KD toward last round's global soft labels alone, then revisits its own data "
        "(0 = off; no extra traffic: the soft labels are already broadcast)",
    )
    class_weights: Literal["none", "counts"] = Field(
        "none",
        description="counts: weight client k's soft label for class c by its share of class-c training examples "
        "(n_kc / n_c, times the confidence weight; each client sends its per-class counts once), the class-level "
        "ensemble of FedGen (Zhu et al. 2021) and FedFTG (Zhang et al. 2022)",
    )
    sharpen: float = Field(
        1.0,
        gt=0,
        description="DS-FL entropy-reduction aggregation: soft labels become softmax(p / sharpen) of the aggregated "
        "probabilities p (1 = off; DS-FL uses 0.1)",
    )
    feddf: bool = Field(
        False,
        description="FedDF (Lin et al. 2020): clients start each round from the global model and send weights; the "
        "server averages them (FedAvg) and distills the clients' aggregated proxy logits into that average",
    )
    ema: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="EMA decay of the global model across rounds (0 = off); the EMA is what is evaluated",
    )
    student_backbone: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _class_weights_need_weighted_mean(self) -> "DistillConfig":
        if self.class_weights != "none" and self.robust != "none":
            raise ValueError(
                f"class_weights={self.class_weights!r} weights the mean of the clients' soft labels; it cannot be "
                f"combined with robust={self.robust!r} (set one of them to its default)"
            )
        return self

    student_epochs: float = Field(2.0, gt=0)
    student_lr: float = Field(0.05, gt=0)
    student_optimizer: Literal["sgd", "adam"] = Field(
        "sgd",
        description="the server's distillation optimizer: sgd (with federation.momentum) or adam (FedDF's choice, "
        "Lin et al. 2020: a fresh Adam each round; set student_lr=0.001)",
    )
    student_batch_size: int = Field(64, ge=1)


class ModulesConfig(Section):
    """Peers hosting expert modules, sharing them with neighbours (seed 000 §3.3D, seed 001 §2.2)."""

    topology: Literal["ring", "full", "star", "random"] = "ring"
    degree: int = Field(4, ge=1, description="degree of the random k-regular topology")
    num_modules: Optional[int] = Field(None, ge=1, description="distinct expert modules (default: one per peer)")
    modules_per_peer: int = Field(2, ge=1)
    expert: dict[str, Any] = Field(default_factory=lambda: {"type": "mlp", "hidden": [100]})
    distill_weight: float = Field(0.5, ge=0, description="alpha of L_task + alpha L_distill + beta L_sparse")
    sparse_weight: float = Field(0.01, ge=0, description="beta: weight of the routing-entropy penalty")
    temperature: float = Field(2.0, gt=0, description="KD temperature of L_distill")
    router_temperature: float = Field(
        1.0, gt=0, description="temperature of the mesh's EntropyRouter over a peer's experts"
    )
    update_fraction: float = Field(
        1.0, gt=0, le=1, description="fraction of its modules a peer trains each round (round-robin)"
    )
    send_threshold: float = Field(
        0.0, ge=0, description="send a module only if its relative change since last sent exceeds this"
    )


class FederationConfig(Section):
    mode: Literal["fedavg", "modules", "distill", "local", "central"] = "distill"
    engine: Literal["sim", "flower", "hivemind"] = "sim"
    clients: int = Field(10, ge=1)
    rounds: int = Field(10, ge=1)
    partition: Literal["iid", "dirichlet", "dirichlet_clientwise", "task"] = Field(
        "dirichlet",
        description="dirichlet: one Dirichlet draw per class over the clients; dirichlet_clientwise: one "
        "label mix per client (sizes fixed first, see client_sizes)",
    )
    alpha: float = Field(1.0, gt=0, description="Dirichlet concentration of the label-skew partition")
    client_sizes: Literal["balanced", "lognormal"] = Field(
        "balanced", description="client sizes of dirichlet_clientwise"
    )
    min_client_size: int = Field(10, ge=1)
    max_train: Optional[int] = Field(None, ge=1, description="subsample the training pool (seeded)")
    max_test: Optional[int] = Field(None, ge=1)
    local_epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    prox_mu: float = Field(
        0.0,
        ge=0,
        description="FedProx (Li et al. 2020): mu/2 ||w - w_start||^2 added to each client's local loss, w_start the "
        "weights it began the round with (the global model in FedAvg and FedDF); 0 = off, no extra bytes",
    )
    scaffold: bool = Field(
        False,
        description="SCAFFOLD (Karimireddy et al. 2020): control variates correct each local step by c - c_i "
        "(fedavg and FedDF, sim and flower engines); the server's c goes down with the model and each client's "
        "change of c_i comes up with its weights, so messages double",
    )
    server_momentum: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="FedAvgM (Hsu et al. 2019): heavy-ball momentum of the server's step on the averaged update "
        "(fedavg, and FedDF's average before distillation); 0 = plain averaging",
    )
    server_lr: float = Field(1.0, gt=0, description="the server's step size on the averaged update (1 = FedAvg)")
    lr_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        description="clients' (and the centralized baseline's) lr in round r is lr * lr_decay**r (1 = constant)",
    )
    backbone: dict[str, Any] = Field(default_factory=lambda: {"type": "mlp", "hidden": [200, 200]})
    codec: str = Field("fp32", description="fp32 | fp16 | int8 | topk:K (logits) | lowrank:R")
    aggregator: Literal["mean", "fisher", "median", "trimmed_mean"] = "mean"
    trim: float = Field(0.1, ge=0, lt=0.5)
    failure_rate: float = Field(0.0, ge=0, lt=1, description="fraction of peers that vanish mid-round")
    failure_mode: Literal["transient", "permanent"] = "transient"
    poisoned: int = Field(0, ge=0, description="number of poisoned peers")
    poison_scale: float = Field(10.0, gt=0)
    eval_every: int = Field(1, ge=1)
    client_eval_size: Optional[int] = Field(
        None, ge=1, description="test examples used for per-client accuracy (default: the whole test set)"
    )
    membership_references: int = Field(
        4, ge=0, description="reference models of the calibrated membership attack on the final model (0: no audit)"
    )
    distill: DistillConfig = Field(default_factory=DistillConfig)
    modules: ModulesConfig = Field(default_factory=ModulesConfig)

    @field_validator("codec")
    @classmethod
    def _codec(cls, v: str) -> str:
        parse_codec(v)
        return v

    @model_validator(mode="after")
    def _drift_fixes_need_their_mode(self) -> "FederationConfig":
        averages = self.mode == "fedavg" or (self.mode == "distill" and self.distill.feddf)
        if (self.server_momentum > 0 or self.server_lr != 1.0) and (not averages or self.engine == "hivemind"):
            raise ValueError(
                "server_momentum / server_lr step the server's average of client weights: use them with mode fedavg "
                "or with distill.feddf=true, on the sim or flower engine (or leave them at 0 / 1)"
            )
        if self.scaffold and (not averages or self.engine == "hivemind" or self.momentum > 0):
            raise ValueError(
                "scaffold needs mode fedavg or distill.feddf=true on the sim or flower engine, and plain local SGD "
                "(momentum=0): its control update assumes K plain steps (or set scaffold=false)"
            )
        if self.prox_mu > 0 and self.mode in ("modules", "central"):
            raise ValueError(
                f"prox_mu (FedProx) pulls a client toward the model it received; mode {self.mode!r} has none "
                "(use it with fedavg, distill or local, or set prox_mu=0)"
            )
        return self


class FederateExperiment(Section):
    name: str = "federate"
    seed: int = 0
    device: str = "auto"
    data: DataConfig = Field(default_factory=lambda: DataConfig(name="mnist"))
    federation: FederationConfig = Field(default_factory=FederationConfig)
