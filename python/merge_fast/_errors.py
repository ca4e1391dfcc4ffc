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


class MergeWarning(UserWarning):
    """Something merge_fast ran anyway but the user should know (an ignored config key, a
    degenerate tensor a kernel resolved by a fallback, inputs of different dtypes)."""


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
    "ModelNotFound",
]
