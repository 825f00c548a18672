"""Module-to-module distillation: token networks that can be cut into modules (``models``) and the m2mKD pipeline
(``m2mkd``). The distillation losses are ``modulemesh.training.losses``."""
