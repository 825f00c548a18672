"""Networks for module-to-module distillation: token models that can be cut into modules.

Every model here is a *token network*: ``embed`` (patch embedding + position) -> ``blocks``
(transformer blocks over the token sequence) -> ``head`` (LayerNorm, mean over tokens, Linear).
Specs are plain dicts so they live in YAML configs and module manifests:

    {"type": "vit", "dim": 64, "depth": 4, "heads": 4, "mlp_ratio": 2.0, "patch": 7}
    {"type": "moe_vit", "dim": 48, "depth": 4, "heads": 4, "experts": 4, "k": 2, "moe_every": 1}

``moe_vit`` replaces the MLP of every ``moe_every``-th block by a token-level mixture of experts:
a linear gate, softmax, the top-k mask of ``modulemesh.mesh.routers.topk_mask`` and sparse dispatch
(only the selected experts run on a token), plus the Switch-Transformer load-balancing loss.

Cutting (``cut``) splits the blocks into K consecutive groups, the first group keeping the embedding
and the last the head (as in Deep Incubation), so module 0 reads images and module K-1 writes
logits. The pieces share the network's parameters: running them in order *is* the network.
``Stitch`` (LayerNorm + Linear) adapts widths where a module meets a model of another width;
``Hybrid`` runs ``meta[:i] + module_i + meta[i+1:]``; ``ModularNet`` is the assembled student.
"""

from .modular import (
    Hybrid,
    ModularNet,
    Segment,
    Stitch,
    StitchedModule,
    block_ranges,
    build_modular,
    cut,
    stitch_module,
)
from .networks import (
    Attention,
    Block,
    FeedForward,
    Head,
    MoEFeedForward,
    PatchEmbed,
    TokenNet,
    build_net,
    count_parameters,
    moe_aux_loss,
    reset_aux,
)
from .spec import (
    MODEL_TYPES,
    auto_patch,
    check_spec,
    looks_like_spec,
    parse_spec,
    resolve_spec,
    token_grid,
)

__all__ = [
    "MODEL_TYPES",
    "parse_spec",
    "looks_like_spec",
    "check_spec",
    "auto_patch",
    "resolve_spec",
    "token_grid",
    "PatchEmbed",
    "Attention",
    "FeedForward",
    "MoEFeedForward",
    "Block",
    "Head",
    "TokenNet",
    "build_net",
    "block_ranges",
    "Segment",
    "cut",
    "Stitch",
    "StitchedModule",
    "stitch_module",
    "Hybrid",
    "ModularNet",
    "build_modular",
    "moe_aux_loss",
    "reset_aux",
    "count_parameters",
]
