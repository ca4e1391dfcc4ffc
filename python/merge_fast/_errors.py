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

__all__ = [
    "MergeError",
    "InvalidCheckpoint",
    "TensorMismatch",
    "ConfigError",
    "NumericalError",
    "MergeIOError",
    "MergeInterrupted",
]
