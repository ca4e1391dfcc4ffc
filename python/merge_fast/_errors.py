"""Exception hierarchy. The classes are defined by the compiled core (so Rust errors map
onto them directly) and re-exported here."""
from ._core import (
    ConfigError,
    InvalidCheckpoint,
    MergeError,
    MergeInterrupted,
    MergeIOError,
    NumericalError,
    TensorMismatch,
)



class ModelNotFound(ConfigError):
    """A model reference that is neither a local path nor a reachable hub repo (missing,
    private or gated repo, missing revision or file, offline without a cached copy)."""


__all__ = [
    "MergeError",
    "InvalidCheckpoint",
    "TensorMismatch",
    "ConfigError",
    "NumericalError",
    "MergeIOError",
    "MergeInterrupted",
    "ModelNotFound",
]
