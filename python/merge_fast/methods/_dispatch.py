"""The one dispatcher every public merge function goes through: arrays in, array out;
folders in, ``out`` folder written."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Union, cast, overload

from .. import _core
from .._errors import config_error
from .._folders import MergeResult, ProgressArg
from .. import plan as _plan

if TYPE_CHECKING:  # neither is imported at run time by `import merge_fast`
    import numpy
    import torch

# A path to a model folder / .safetensors file (or a hub repo id, ``model+adapter``) ...
PathLike = Union[str, "os.PathLike[str]"]
# ... or an array: numpy (float32/float16/bfloat16) or a torch tensor. The result of an
# array merge has the type of the inputs.
Array = Union["numpy.ndarray", "torch.Tensor"]
Model = Union[PathLike, Array]


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


@overload
def merge(
    method: str,
    models: Sequence[Array],
    *,
    base: Optional[Array] = None,
    params: Optional[Dict[str, Any]] = None,
    out: None = None,
    dtype: str = "float32",
    out_dtype: Optional[str] = None,
    threads: Optional[int] = None,
    max_shard_size: Union[int, str] = "5GB",
    progress: ProgressArg = False,
    seed: int = 0,
    overwrite: bool = False,
    cache_dir: Optional[Union[str, Path]] = None,
    fsync: bool = True,
    executor: str = "local",
    ray_address: Optional[str] = None,
) -> Array: ...
@overload
def merge(
    method: str,
    models: Sequence[PathLike],
    *,
    base: Optional[PathLike] = None,
    params: Optional[Dict[str, Any]] = None,
    out: PathLike,
    dtype: str = "float32",
    out_dtype: Optional[str] = None,
    threads: Optional[int] = None,
    max_shard_size: Union[int, str] = "5GB",
    progress: ProgressArg = False,
    seed: int = 0,
    overwrite: bool = False,
    cache_dir: Optional[Union[str, Path]] = None,
    fsync: bool = True,
    executor: str = "local",
    ray_address: Optional[str] = None,
) -> MergeResult: ...
@overload
def merge(
    method: str,
    models: Sequence[Model],
    *,
    base: Optional[Model] = None,
    params: Optional[Dict[str, Any]] = None,
    out: Optional[PathLike] = None,
    dtype: str = "float32",
    out_dtype: Optional[str] = None,
    threads: Optional[int] = None,
    max_shard_size: Union[int, str] = "5GB",
    progress: ProgressArg = False,
    seed: int = 0,
    overwrite: bool = False,
    cache_dir: Optional[Union[str, Path]] = None,
    fsync: bool = True,
    executor: str = "local",
    ray_address: Optional[str] = None,
) -> Union[Array, MergeResult]: ...
def merge(
    method: str,
    models: Sequence[Model],
    *,
    base: Optional[Model] = None,
    params: Optional[Dict[str, Any]] = None,
    out: Optional[PathLike] = None,
    dtype: str = "float32",
    out_dtype: Optional[str] = None,
    threads: Optional[int] = None,
    max_shard_size: Union[int, str] = "5GB",
    progress: ProgressArg = False,
    seed: int = 0,
    overwrite: bool = False,
    cache_dir: Optional[Union[str, Path]] = None,
    fsync: bool = True,
    executor: str = "local",
    ray_address: Optional[str] = None,
) -> Union[Array, MergeResult]:
    """Merges ``models`` (and ``base``) with the named method and its parameters.

    Arrays in, array out; folders in, ``out`` folder written. Per-model parameters (such
    as ``weight``) are lists with one value per model in ``models`` (base excluded). A model
    path that does not exist is a Hugging Face Hub repo id (``org/name[@revision]``),
    downloaded into ``cache_dir`` (default: the standard HF cache; see merge_fast.hub).
    ``overwrite``: replace an existing, non-empty ``out`` that holds a previous merge
    output (anything else is refused). Every file is fsynced before it is renamed into
    place; ``fsync=False`` skips that, for scratch merges. ``executor="ray"`` (folders only)
    runs the plan as Ray tasks on the cluster at ``ray_address`` (default: the running or a
    new local Ray), byte-identical to the local merge (see merge_fast.distributed).
    """
    params = {k: v for k, v in (params or {}).items() if v is not None}
    everything = list(models) + ([base] if base is not None else [])
    if not models:
        raise config_error(f"{method} needs at least one model")
    if all(_is_path(m) for m in everything):
        if out is None:
            raise config_error("folder merges need out=PATH")

        def folders() -> MergeResult:
            return merge_folders(
                method, None if base is None else os.fspath(cast(PathLike, base)),
                [os.fspath(cast(PathLike, m)) for m in models], params, out,
                dtype=dtype, out_dtype=out_dtype, threads=threads, max_shard_size=max_shard_size,
                progress=progress, seed=seed, overwrite=overwrite, cache_dir=cache_dir, fsync=fsync,
            )

        if executor == "local" and ray_address is None:
            return folders()  # the default: also keeps an enclosing use_executor block's choice
        from ..distributed import use_executor

        with use_executor(executor, ray_address):
            return folders()
    from .._arrays import is_array, merge_arrays  # numpy: only where arrays are merged

    if all(is_array(m) for m in everything):
        if out is not None:
            raise config_error("out= is for folder merges; array merges return the result")
        if executor != "local" or ray_address is not None:
            raise config_error(f"executor={executor!r} is for folder merges; arrays merge in this process")
        return merge_arrays(method, base, list(models), params, seed=seed, threads=threads)
    raise config_error("pass either all arrays/tensors or all model paths, not a mix")



def as_list(x: Optional[Sequence[float]]):
    """Per-model parameter lists as plain floats (None stays None: the method's default)."""
    return None if x is None else [float(v) for v in x]


def merge_folders(
    method: str,
    base: Optional[PathLike],
    models: Sequence[PathLike],
    params: Dict[str, Any],
    out: PathLike,
    *,
    dtype: str = "float32",
    out_dtype: Optional[str] = None,
    threads: Optional[int] = None,
    max_shard_size: Union[int, str] = "5GB",
    progress: ProgressArg = False,
    seed: int = 0,
    overwrite: bool = False,
    cache_dir: Optional[Union[str, Path]] = None,
    fsync: bool = True,
) -> MergeResult:
    """A same-name merge of model folders (or hub ids, or ``model+adapter``) into `out`."""
    from .._output import check_threads
    from ..hub import resolve_paths
    from ..lora import merged_adapter

    _plan.check_output(out, [base, *models], overwrite=overwrite)
    check_threads(threads)
    code = _plan.out_dtype_code(dtype, out_dtype)
    refs = ([base] if base is not None else []) + list(models)
    local, hub_inputs = resolve_paths(refs, cache_dir=cache_dir, progress=progress is True)
    read = [x for pa in local for x in pa if x is not None]  # the folders the output must not touch
    _plan.check_output(out, read, overwrite=overwrite)
    # A `model+adapter` is read through a cached copy with the adapter merged in (as configs
    # and merge_fast.lora.apply compute it).
    folders = [p if a is None else str(merged_adapter(p, a, cache_dir)) for p, a in local]
    lbase = folders[0] if base is not None else None
    paths, plans = _plan.same_tensor_plan(method, lbase, folders[1 if base is not None else 0:],
                                          lambda _name: params, code)
    recipe: Dict[str, Any] = {
        "merge_fast_version": _core.__version__,
        "method": method,
        "base_model": str(base) if base is not None else None,
        "models": [str(m) for m in models],
        "parameters": params,
        "dtype": dtype,
        "out_dtype": out_dtype,
        "seed": seed,
    }
    if hub_inputs:
        recipe["hub_inputs"] = [h.to_json() for h in hub_inputs]
    return _plan.execute(
        paths,
        plans,
        out,
        recipe=recipe,
        side_files_from=paths[0],
        out_dtype=code,
        threads=threads,
        max_shard_size=max_shard_size,
        progress=progress,
        seed=seed,
        overwrite=overwrite,
        inputs=read,
        fsync=fsync,
    )
