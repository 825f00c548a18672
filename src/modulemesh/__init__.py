"""ModuleMesh: modular, continually learned, collaboratively built neural networks.

Start with ``modulemesh.mesh`` (Expert, ModuleMesh, the routers), ``modulemesh.runner.run_experiment``
for a whole experiment from a config, or the ``modulemesh`` command. Nothing heavy is imported
here, so ``modulemesh --help`` stays fast.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("modulemesh")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
