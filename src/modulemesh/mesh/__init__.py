"""The mesh: experts, their pool, routers, regularizers and the ModuleMesh that ties them."""

from .backbones import MLP, ResNet18, SmallCNN, build_backbone
from .density import DensityRouter, fit_ppca, ppca_log_density
from .expert import Expert
from .mesh import MeshOutput, ModuleMesh
from .pool import ExpertPool, UnknownExpertError
from .regularizers import (
    class_given_expert,
    load_balance_loss,
    routing_entropy,
    specialization_loss,
    specialization_scores,
)
from .routers import EntropyRouter, OracleRouter, RandomRouter, Router, TopKRouter, build_router, prediction_entropy

__all__ = [
    "MLP",
    "SmallCNN",
    "ResNet18",
    "build_backbone",
    "Expert",
    "ExpertPool",
    "UnknownExpertError",
    "ModuleMesh",
    "MeshOutput",
    "Router",
    "DensityRouter",
    "fit_ppca",
    "ppca_log_density",
    "EntropyRouter",
    "TopKRouter",
    "RandomRouter",
    "OracleRouter",
    "build_router",
    "prediction_entropy",
    "class_given_expert",
    "specialization_scores",
    "specialization_loss",
    "load_balance_loss",
    "routing_entropy",
]
