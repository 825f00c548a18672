"""User-facing errors.

Everything a user can get wrong (config, data, checkpoints, shapes) raises a subclass of
``ModuleMeshError`` with a message that names the problem and the fix. The CLI prints the
message as one line on stderr and exits with code 2; library users catch it like any exception.
"""


class ModuleMeshError(Exception):
    """A problem caused by input the user can fix; the message says how."""


class ConfigError(ModuleMeshError, ValueError):
    """Unknown key, wrong type or out-of-range value in an experiment config."""


class DataError(ModuleMeshError, ValueError):
    """A dataset is missing, empty, mis-shaped or mislabelled."""


class CheckpointError(ModuleMeshError, ValueError):
    """A saved module is missing, corrupt, tampered with or incompatible."""


class TrainingError(ModuleMeshError, RuntimeError):
    """Training diverged (NaN/inf loss) or was configured so it cannot proceed."""
