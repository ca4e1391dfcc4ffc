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



class MergeWarning(UserWarning):
    """A merge that was accepted but deserves a look (e.g. inputs of different dtypes)."""


def warn(message: str) -> None:
    """A MergeWarning attributed to the first caller outside merge_fast."""
    import os
    import sys
    import warnings

    pkg = os.path.dirname(os.path.abspath(__file__))
    level, f = 2, sys._getframe(1)
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(pkg + os.sep):
        f, level = f.f_back, level + 1
    warnings.warn(message, MergeWarning, stacklevel=level)


__all__ = [
    "MergeWarning",
    "MergeError",
    "InvalidCheckpoint",
    "TensorMismatch",
    "ConfigError",
    "NumericalError",
    "MergeIOError",
    "MergeInterrupted",
]
