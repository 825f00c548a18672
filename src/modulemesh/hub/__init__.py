"""A module hub on any fsspec URL: content-addressed blobs, versioned names, optional ed25519 signatures.

``Hub(url).publish(path)`` uploads an expert record or a saved mesh; ``Hub(url).pull("name@2", out)``
downloads it bit-identical after checking every hash (and the signature when required);
``Hub(url).list()`` shows what is there. See ``store`` for the layout and what each URL scheme
guarantees with concurrent publishers.
"""

from .errors import HubError
from .package import describe, verify_local, verify_pulled
from .signing import generate_key, load_trusted_keys
from .store import Hub

__all__ = ["Hub", "HubError", "describe", "verify_local", "verify_pulled", "generate_key", "load_trusted_keys"]
