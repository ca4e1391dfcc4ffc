"""Cross-architecture outputs through the plan layer and the Rust engine.

An output is planned in the anchor's stored layout: each stored tensor either has a plan
source the core materialises on the fly (a stored tensor, a row gather, an ``affine``
source ``scale · L · S · diag(g) · R · diag(h)`` over a donor's tensor), or is computed
here with numpy (fused or transposed stored layouts, width projections, biases) and put in
a temporary side file the plan reads. The small matrices the affine sources need (the
rotation ``R``, its transpose, norm gains) go into the same side files. The engine's
writer then writes the output (positioned shards, atomic rename, fsync, progress).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import _core
from .. import plan as _plan
from .._folders import MergeResult, ProgressArg
from .._errors import config_error
from ..arch import apply_output_recipe, plan_decanonical
from ._model import ModelView

#: Side files are cut at this size (numpy-computed tensors are buffered until written).
SIDE_FILE_BYTES = 64 * 1024 * 1024

_SIZES = {"F32": 4, "BF16": 2, "F16": 2}

#: Tensors of a plan: the canonical key's source, or None to compute it with numpy.
SourceFn = Callable[[str], Optional[_plan.Source]]


class SideFiles:
    """Temporary safetensors files holding tensors made in Python, read by the plan."""

    def __init__(self, inputs: _plan.Inputs, folder: Path, limit: int = SIDE_FILE_BYTES):
        self.inputs, self.folder, self.limit = inputs, folder, limit
        self.batch: List[Tuple[str, np.ndarray, List[int], str]] = []
        self.size = 0
        self.count = 0
        self.index: Optional[int] = None
        self.names: Dict[str, _plan.TensorRef] = {}

    def _path(self) -> Path:
        return self.folder / f"side-{self.count:05d}.safetensors"

    def ref(self, name: str, value: Callable[[], np.ndarray]) -> _plan.TensorRef:
        """``name`` in a side file, made by ``value()`` on first use."""
        hit = self.names.get(name)
        if hit is not None:
            return hit
        arr = np.ascontiguousarray(value(), dtype=np.float32)
        if self.index is None:
            self.index = self.inputs(self._path())
        self.batch.append((name, arr.reshape(-1), list(arr.shape), "F32"))
        self.size += arr.nbytes
        ref: _plan.TensorRef = {"input": self.index, "tensor": name}
        self.names[name] = ref
        if self.size >= self.limit:
            self.flush()
        return ref

    def flush(self) -> None:
        if not self.batch:
            return
        _core.save_file(str(self._path()), self.batch, {"format": "pt"})
        self.batch, self.size, self.index = [], 0, None
        self.count += 1


def stored_source(view: ModelView, key: str, index: int) -> Optional[_plan.TensorSource]:
    """The stored tensor holding canonical ``key`` when it is that tensor unchanged."""
    r = view.recipes.get(key)
    if r is None or not r.is_identity:
        return None
    return _plan.tensor(index, r.source)


#: ``(method, params, base, inputs)`` of one output tensor.
Planned = Tuple[str, Dict[str, Any], Optional[_plan.Source], List[_plan.Source]]


def execute_canonical(
    anchor: ModelView,
    inputs: _plan.Inputs,
    side: SideFiles,
    plan_for: Callable[[str, str], Optional[Planned]],
    value: Callable[[str], np.ndarray],
    out: Union[str, Path],
    *,
    recipe: Dict[str, Any],
    out_dtype: Optional[str],
    max_shard_size: Union[int, str],
    protected: Sequence[Path],
    overwrite: bool,
    threads: Optional[int] = None,
    progress: ProgressArg = False,
    seed: int = 0,
    fsync: bool = True,
) -> MergeResult:
    """Plans and runs every stored tensor of ``anchor`` (same names, shapes, order).

    ``plan_for(stored_name, canonical_key)``: the plan of a stored tensor that is one
    canonical tensor unchanged, or None; then, and for fused or transposed stored tensors,
    the canonical parts come from ``value(key)`` (numpy, float32), through a side file."""
    code = _plan.out_dtype_code("float32", out_dtype)
    shard = _plan.shard_size(max_shard_size, "max_shard_size")
    canon_shapes = {k: r.shape for k, r in anchor.recipes.items()}
    fam = anchor.family
    out_recipes = plan_decanonical(canon_shapes, anchor.config, fam, source_family=fam.name)
    plans: List[_plan.TensorPlan] = []
    for n in anchor.shapes:
        r = out_recipes.get(n)
        if r is None:
            continue
        dt = code or anchor.dtypes[n]
        dt = dt if dt in _SIZES else "F32"
        single = r.axis is None and not r.transpose
        planned = plan_for(n, r.segments[0].key) if single else None
        if planned is None:
            def made(r: Any = r, n: str = n) -> np.ndarray:
                arr = value(r.segments[0].key) if single else apply_output_recipe(r, {k: value(k) for k in r.keys})
                if tuple(arr.shape) != tuple(anchor.shapes[n]):
                    raise config_error(f"internal: tensor '{n}' built with shape {arr.shape}, expected "
                                       f"{anchor.shapes[n]}")
                return arr

            ref = side.ref("out/" + n, made)
            anchor.clear()
            planned = ("passthrough", {}, None, [_plan.tensor(ref["input"], ref["tensor"])])
        method, params, base, srcs = planned
        plans.append(_plan.TensorPlan(n, method, params, base, srcs, dt))
    side.flush()
    return _plan.execute(inputs.paths, plans, out, recipe=recipe, side_files_from=anchor.folder, out_dtype=code,
                         threads=threads, max_shard_size=shard, progress=progress, overwrite=overwrite,
                         inputs=list(protected), seed=seed, fsync=fsync)


def new_side_dir() -> "tempfile.TemporaryDirectory[str]":
    return tempfile.TemporaryDirectory(prefix="merge_fast_crossarch_")

