"""Write a model in the anchor's layout from canonical values computed one tensor at a time.

Output tensors are grouped into shards of at most ``max_shard_size`` bytes (as stored);
each shard's tensors are computed, written with ``_core.save_file`` (rounded once to the
output dtype) and freed, so peak memory is about one shard in float32 plus the working
tensors. Everything goes into a staged folder renamed into place only when complete.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np

from .. import _core
from .._errors import config_error
from .._folders import copy_side_files
from ..plan import OUT_DTYPES
from .._output import check_output_dir, parse_size, staged_dir
from ..arch import apply_output_recipe, plan_decanonical
from ._model import ModelView

_SIZES = {"F32": 4, "BF16": 2, "F16": 2}


@dataclasses.dataclass
class WriteResult:
    path: Path
    tensors_written: int
    bytes_written: int
    files: List[Path]
    seconds: float


def _out_code(out_dtype: Optional[str]) -> Optional[str]:
    if out_dtype is None:
        return None
    if out_dtype not in OUT_DTYPES:
        raise config_error(f"out_dtype must be one of float32, bfloat16, float16, got {out_dtype!r}")
    return OUT_DTYPES[out_dtype]


def write_canonical_model(
    anchor: ModelView,
    value: Callable[[str], np.ndarray],
    out: Union[str, Path],
    *,
    recipe: Dict[str, Any],
    out_dtype: Optional[str] = None,
    max_shard_size: Union[int, str] = "128MB",
    inputs: Optional[List[Path]] = None,
    overwrite: bool = False,
) -> WriteResult:
    """Writes every stored tensor of ``anchor`` (same names, shapes, order), each canonical
    part taken from ``value(key)`` (float32, canonical shape)."""
    code = _out_code(out_dtype)
    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as e:
        raise config_error(f"{e}") from None
    protected = [anchor.folder, *(inputs or [])]
    check_output_dir(out, protected, overwrite=overwrite)
    out = Path(out).absolute()
    fam = anchor.family
    canon_shapes = {k: r.shape for k, r in anchor.recipes.items()}
    out_recipes = plan_decanonical(canon_shapes, anchor.config, fam, source_family=fam.name)
    order = [n for n in anchor.shapes if n in out_recipes]
    dtypes = {}
    for n in order:
        dt = code or anchor.dtypes[n]
        dtypes[n] = dt if dt in _SIZES else "F32"
    # Group into shards by stored size.
    shards: List[List[str]] = [[]]
    size = 0
    for n in order:
        nb = int(np.prod(anchor.shapes[n], dtype=np.int64)) * _SIZES[dtypes[n]]
        if shards[-1] and size + nb > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nb
    total = len(shards)
    fname = (lambda i: "model.safetensors") if total == 1 else (
        lambda i: f"model-{i + 1:05d}-of-{total:05d}.safetensors")
    meta = {"format": "pt", "merge_fast": json.dumps(recipe, sort_keys=True, default=str)}
    t0 = time.perf_counter()
    written = 0
    nbytes = 0
    weight_map: Dict[str, str] = {}
    with staged_dir(out, protected, overwrite=overwrite) as tmp:
        for si, names in enumerate(shards):
            batch = []
            for n in names:
                r = out_recipes[n]
                if r.axis is None and not r.transpose:
                    arr = value(r.segments[0].key)
                else:
                    arr = apply_output_recipe(r, {k: value(k) for k in r.keys})
                arr = np.ascontiguousarray(arr, dtype=np.float32)
                if tuple(arr.shape) != tuple(anchor.shapes[n]):
                    raise config_error(f"internal: tensor '{n}' built with shape {arr.shape}, "
                                      f"expected {anchor.shapes[n]}")
                batch.append((n, arr.reshape(-1), list(arr.shape), dtypes[n]))
                weight_map[n] = fname(si)
                nbytes += arr.size * _SIZES[dtypes[n]]
            anchor.clear()
            _core.save_file(str(tmp / fname(si)), batch, meta)
            written += len(batch)
            del batch
        if total > 1:
            idx = {"metadata": {"total_size": nbytes}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2) + "\n")
        copy_side_files(anchor.folder, tmp, code)
    return WriteResult(out, written, nbytes, [out / fname(i) for i in range(total)], time.perf_counter() - t0)


def copy_model_verbatim(src: Path, out: Union[str, Path], *, overwrite: bool = False) -> WriteResult:
    """Copies a model folder's weight files and side files unchanged (atomically)."""
    t0 = time.perf_counter()
    src = Path(src)
    check_output_dir(out, [src], overwrite=overwrite)
    out = Path(out).absolute()
    files = []
    nbytes = 0
    with staged_dir(out, [src], overwrite=overwrite) as tmp:
        for f in sorted(src.iterdir()):
            if f.is_file() and (f.suffix == ".safetensors" or f.name == "model.safetensors.index.json"):
                shutil.copy2(f, tmp / f.name)
                files.append(out / f.name)
                nbytes += f.stat().st_size if f.suffix == ".safetensors" else 0
        copy_side_files(src, tmp, None)
    return WriteResult(out, 0, nbytes, files, time.perf_counter() - t0)
