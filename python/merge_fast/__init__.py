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

# Imported on first use (PEP 562), so `import merge_fast` and the CLI load neither numpy nor
# the config / cross-architecture machinery unless the work needs them.
_LAZY = {
    "subspace_masks": ("subspace", "subspace_masks"),
    "config": ("config", None),
    "lora": ("lora", None),
    "run": ("config", "run"),
    "svd": ("linalg", "svd"),
    "procrustes": ("linalg", "procrustes"),
    "align": ("crossarch", "align"),
    "procrustes_absorb": ("crossarch", "procrustes_absorb"),
    "extract_lora": ("lora_extract", "extract_lora"),
    "merge_lora_adapters": ("lora_merge", "merge_adapters"),
    "partial": ("merge_state", "partial"),
    "combine": ("merge_state", "combine"),
    "finalize": ("merge_state", "finalize"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'merge_fast' has no attribute {name!r}")
    import importlib

    mod, attr = _LAZY[name]
    m = importlib.import_module(f".{mod}", __name__)
    value = m if attr is None else getattr(m, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    "Checkpoint",
    "MergeResult",
    "run",
    "config",
    "lora",
    "extract_lora",
    "merge_lora_adapters",
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
