"""merge_fast: streaming, bounded-memory merges of LLM checkpoints with a Rust core.

>>> import merge_fast as mf
>>> c = mf.slerp(a, b, t=0.3)                                  # arrays in, array out
>>> r = mf.slerp("models/A", "models/B", t=0.3, out="models/AB")  # folders in, folder out

torch is never imported here; ``merge_fast.torch`` (Fisher estimation, subspace masks)
needs it.
"""
from ._core import Checkpoint, __version__
from ._errors import (
    ConfigError,
    InvalidCheckpoint,
    MergeError,
    MergeInterrupted,
    MergeIOError,
    ModelNotFound,
    MergeWarning,
    NumericalError,
    TensorMismatch,
)
from ._folders import MergeResult
from . import methods as _methods
from .methods import *  # noqa: F401,F403
from .subspace import subspace_masks
from . import config, lora
from .config import run
from .linalg import procrustes, svd
from .crossarch import align, procrustes_absorb
from .merge_state import combine, finalize, partial

__all__ = [
    "__version__",
    "Checkpoint",
    "MergeResult",
    "run",
    "config",
    "lora",
    *_methods.__all__,
    "subspace_masks",
    "svd",
    "procrustes",
    "align",
    "procrustes_absorb",
    "partial",
    "combine",
    "finalize",
    "MergeError",
    "InvalidCheckpoint",
    "TensorMismatch",
    "ConfigError",
    "NumericalError",
    "MergeIOError",
    "MergeInterrupted",
    "ModelNotFound",
    "MergeWarning",
]
