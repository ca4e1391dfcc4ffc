"""The one dispatcher every public merge function goes through: arrays in, array out;
folders in, ``out`` folder written."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from .._errors import ConfigError
from .._folders import MergeResult, ProgressArg, merge_folders

Model = Any  # a numpy array, a torch tensor, or a path to a model folder / .safetensors file


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, Path))


def merge(
    method: str,
    models: Sequence[Model],
    *,
    base: Optional[Model] = None,
    params: Optional[Dict[str, Any]] = None,
    out: Optional[Union[str, Path]] = None,
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
) -> Union[Any, MergeResult]:
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
        raise ConfigError(f"config error: {method} needs at least one model")
    if all(_is_path(m) for m in everything):
        if out is None:
            raise ConfigError("config error: folder merges need out=PATH")

        def folders() -> MergeResult:
            return merge_folders(
                method, base, list(models), params, out, dtype=dtype, out_dtype=out_dtype, threads=threads,
                max_shard_size=max_shard_size, progress=progress, seed=seed, overwrite=overwrite,
                cache_dir=cache_dir, fsync=fsync,
            )

        if executor == "local" and ray_address is None:
            return folders()  # the default: also keeps an enclosing use_executor block's choice
        from ..distributed import use_executor

        with use_executor(executor, ray_address):
            return folders()
    from .._arrays import is_array, merge_arrays  # numpy: only where arrays are merged

    if all(is_array(m) for m in everything):
        if out is not None:
            raise ConfigError("config error: out= is for folder merges; array merges return the result")
        if executor != "local" or ray_address is not None:
            raise ConfigError(f"config error: executor={executor!r} is for folder merges; arrays merge in this process")
        return merge_arrays(method, base, list(models), params, seed=seed, threads=threads)
    raise ConfigError("config error: pass either all arrays/tensors or all model paths, not a mix")



def as_list(x: Optional[Sequence[float]]):
    """Per-model parameter lists as plain floats (None stays None: the method's default)."""
    return None if x is None else [float(v) for v in x]
