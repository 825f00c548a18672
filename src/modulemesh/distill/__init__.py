"""Knowledge distillation: shared losses (``losses``) and module-to-module distillation."""
