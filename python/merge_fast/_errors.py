"""Exception hierarchy. The classes are defined by the compiled core (so Rust errors map
onto them directly) and re-exported here. Python-side messages get their prefix
("config error: ", "I/O error: ") here and only here: :func:`config_error`, :func:`io_error`,
and :func:`unprefixed` to take it off (to re-locate a message)."""
from types import FrameType
from typing import Optional, Type, TypeVar

from ._core import (
    ConfigError,
    InvalidCheckpoint,
    MergeError,
    MergeInterrupted,
    MergeIOError,
    NumericalError,
    TensorMismatch,
)

CONFIG_PREFIX = "config error: "
IO_PREFIX = "I/O error: "
_E = TypeVar("_E", bound=BaseException)


def config_error(message: str, cls: "Type[_E]" = ConfigError) -> _E:  # type: ignore[assignment]
    """A ConfigError (or subclass `cls`) with the config-error prefix."""
    return cls(CONFIG_PREFIX + message)


def io_error(message: str) -> MergeIOError:
    """A MergeIOError with the I/O-error prefix."""
    return MergeIOError(IO_PREFIX + message)


def unprefixed(e: BaseException) -> str:
    """The message of `e` without its category prefix."""
    msg = str(e)
    for prefix in (CONFIG_PREFIX, IO_PREFIX):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


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
    level = 2
    f: Optional[FrameType] = sys._getframe(1)
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
