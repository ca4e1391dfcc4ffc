"""Types of the compiled core (rust/bindings). Checked against the module by
``python -m mypy.stubtest merge_fast._core`` in CI."""
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, final

import numpy as np
import numpy.typing as npt

_Path = Union[str, os.PathLike[str]]
_F32 = npt.NDArray[np.float32]
# (tensors done, tensors total, bytes done, bytes total)
_Progress = Callable[[int, int, int, int], Any]

__all__ = [
    "__version__", "MergeError", "InvalidCheckpoint", "TensorMismatch", "ConfigError", "NumericalError",
    "MergeIOError", "MergeInterrupted", "Checkpoint", "execute_plan", "merge_arrays", "plan_layout", "save_file",
    "METHODS", "method_specs", "svd_stack", "procrustes_stack", "subspace_masks",
]

__version__: str
METHODS: List[str]

def method_specs() -> List[Dict[str, Any]]:
    """Every method's spec (name, base rule, model counts, parameters), declared next to its kernel."""

class MergeError(Exception): ...
class InvalidCheckpoint(MergeError): ...
class TensorMismatch(MergeError): ...
class ConfigError(MergeError): ...
class NumericalError(MergeError): ...
class MergeIOError(MergeError, OSError): ...
class MergeInterrupted(MergeError): ...

@final
class Checkpoint:
    """A safetensors file, or a folder of shards (with or without an index), memory-mapped."""

    def __new__(cls, path: _Path) -> Checkpoint: ...
    @property
    def root(self) -> str: ...
    def names(self) -> List[str]: ...
    def tensors(self) -> List[Tuple[str, str, List[int]]]: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: object, /) -> bool: ...
    def metadata(self) -> Dict[str, str]: ...
    def read_f32(self, name: str) -> _F32: ...
    def sum(self, name: str) -> float: ...

def execute_plan(
    plan_json: str, out_dir: _Path, threads: Optional[int] = None, progress: Optional[_Progress] = None
) -> Dict[str, Any]: ...
def plan_layout(plan_json: str) -> Dict[str, Any]: ...
def merge_arrays(
    method: str,
    params_json: str,
    shape: Sequence[int],
    base: Optional[_F32],
    inputs: Sequence[_F32],
    seed: int = 0,
    tensor: str = "array",
    threads: Optional[int] = None,
) -> _F32: ...
def save_file(
    path: _Path, tensors: Sequence[Tuple[str, _F32, Sequence[int], str]], metadata: Optional[Dict[str, str]] = None
) -> None: ...
def svd_stack(
    x: npt.NDArray[np.float32], k: Optional[int] = None, oversample: int = 10, power_iters: int = 2, seed: int = 0
) -> Tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32], List[float]]: ...
def procrustes_stack(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...
def subspace_masks(
    it_path: _Path,
    pt_path: _Path,
    names: Sequence[str],
    rank: int,
    out: _Path,
    seed: int = 0,
    threads: Optional[int] = None,
    metadata: Optional[Dict[str, str]] = None,
) -> Dict[str, Any]: ...
