"""Subcommands of the modulemesh CLI, one module each."""
