"""The hub's user-facing error (one line, exit code 2 through the CLI)."""

from ..errors import ModuleMeshError


class HubError(ModuleMeshError):
    """Unreachable hub, unknown module, tampered blob/entry/signature, untrusted key."""
