"""The plan layer: every merge request (a config, a Python folder function, a LoRA apply, a
Fisher merge) becomes the one plan the Rust core executes.

A plan is data: the input files, and per output tensor its method, parameters and sources.
The source builders below mirror ``rust/core/src/plan.rs`` (``Source``: ``tensor``, ``lora``,
``rows``, ``affine``); nothing else in the package writes a ``{"kind": ...}`` dict. Missing tensors are
checked by :func:`require_tensors`, the output folder by :func:`check_output`, and
:func:`execute` serializes the plan and hands it to the executor (:mod:`merge_fast._folders`).

Layers (no module imports one above it): cli → config → methods/crossarch/... → lora →
plan → _folders (executor) → _output/hub/_errors/_core.
"""
from __future__ import annotations

import array
import dataclasses
import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Literal, Optional, Sequence, Tuple, TypedDict, Union

from . import _core
from ._errors import InvalidCheckpoint, TensorMismatch, config_error
from ._folders import MergeResult, ProgressArg, run
from ._output import check_output_dir, check_threads, parse_size

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "TensorRef", "TensorSource", "LoraSource", "RowsSource", "AffineSource", "Source", "affine", "TensorPlan", "Inputs",
    "tensor", "lora", "rows", "layer_structure", "check_output", "missing", "require_tensors", "same_tensor_plan",
    "open_checkpoint", "out_dtype_code", "shard_size", "plan_json", "plan_text", "plain", "execute",
]


# ---------------------------------------------------------------- sources (plan.rs `Source`)
class TensorRef(TypedDict):
    """One stored tensor of one input (``TensorRef`` in plan.rs)."""

    input: int
    tensor: str


class _TensorSourceRequired(TypedDict):
    kind: Literal["tensor"]
    input: int


class TensorSource(_TensorSourceRequired, total=False):
    """A stored tensor, read as it is; without ``tensor`` the output tensor's own name."""

    tensor: str


class LoraSource(TypedDict):
    """``base + scale · B·A`` (``(B·A)ᵀ`` with ``transpose``), made chunk by chunk by the core."""

    kind: Literal["lora"]
    base: "Source"
    a: TensorRef
    b: TensorRef
    scale: float
    transpose: bool


class RowsSource(TypedDict):
    """Output row i is the mean of the ``[source, row]`` pairs of ``rows[i]`` (zeros if none)."""

    kind: Literal["rows"]
    sources: List["Source"]
    shape: List[int]
    rows: List[List[Tuple[int, int]]]


class _AffineRequired(TypedDict):
    kind: Literal["affine"]
    src: "Source"
    shape: List[int]
    scale: float


class AffineSource(_AffineRequired, total=False):
    """``scale · left · src · diag(right_in) · right · diag(right_out)`` of a 2-D source,
    each factor optional (cross-architecture alignment: a donor weight carried into the
    anchor's residual stream); ``shape`` is the result's."""

    left: TensorRef
    right: TensorRef
    right_in: TensorRef
    right_out: TensorRef


Source = Union[TensorSource, LoraSource, RowsSource, AffineSource]


def tensor(input: int, name: Optional[str] = None) -> TensorSource:
    """A stored tensor of input ``input`` (``name`` omitted: the output tensor's name)."""
    if name is None:
        return {"kind": "tensor", "input": input}
    return {"kind": "tensor", "input": input, "tensor": name}


def lora(base: Source, a: TensorRef, b: TensorRef, scale: float, transpose: bool) -> LoraSource:
    return {"kind": "lora", "base": base, "a": a, "b": b, "scale": scale, "transpose": transpose}


def rows(sources: List[Source], shape: List[int], row_map: List[Any]) -> RowsSource:
    return {"kind": "rows", "sources": sources, "shape": shape, "rows": row_map}


def affine(src: Source, shape: Sequence[int], *, left: Optional[TensorRef] = None,
           right: Optional[TensorRef] = None, right_in: Optional[TensorRef] = None,
           right_out: Optional[TensorRef] = None, scale: float = 1.0) -> AffineSource:
    d: AffineSource = {"kind": "affine", "src": src, "shape": [int(x) for x in shape], "scale": float(scale)}
    if left is not None:
        d["left"] = left
    if right is not None:
        d["right"] = right
    if right_in is not None:
        d["right_in"] = right_in
    if right_out is not None:
        d["right_out"] = right_out
    return d


@dataclasses.dataclass
class TensorPlan:
    """One output tensor: its method, parameters and sources (plan.rs ``TensorSpec``)."""

    name: str
    method: str
    params: Dict[str, Any]
    base: Optional[Source]
    inputs: List[Source]
    dtype: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"name": self.name, "method": self.method, "params": self.params, "inputs": self.inputs}
        if self.base is not None:  # absent means none: keeps the plan text short
            d["base"] = self.base
        if self.dtype:
            d["dtype"] = self.dtype
        return d


class Inputs:
    """The plan's input files, one index per distinct path, in first-seen order."""

    def __init__(self, paths: Optional[List[str]] = None):
        self.paths: List[str] = [] if paths is None else paths

    def __call__(self, path: PathLike) -> int:
        p = str(path)
        if p not in self.paths:
            self.paths.append(p)
        return self.paths.index(p)


# ---------------------------------------------------------------- layer structure
_LAYER_RE = re.compile(r"^(?P<prefix>(?:.*?\.)?(?:layers|h|layer|blocks|block))\.(?P<idx>\d+)\.(?P<rest>.+)$")
_PRE_RE = re.compile(r"(embed_tokens|\bwte\b|\bwpe\b|embed_in|word_embeddings|position_embeddings|token_type_embeddings|\bembeddings?\b)")


def layer_structure(names: Sequence[str]) -> Tuple[Dict[int, List[Tuple[str, str]]], Optional[str], List[str], List[str]]:
    """Tensor names by layer: ``<prefix>.<layers|h|layer|blocks>.<i>.<rest>`` is layer i (one
    prefix per model), other tensors are "pre" (embeddings) or "post" (final norm, head).
    Returns ({i: [(rest, name)]}, prefix, pre, post), each in the names' order."""
    layers: Dict[int, List[Tuple[str, str]]] = {}
    prefix = None
    pre, post = [], []
    for n in names:
        m = _LAYER_RE.match(n)
        if m and (prefix is None or m.group("prefix") == prefix):
            prefix = m.group("prefix")
            layers.setdefault(int(m.group("idx")), []).append((m.group("rest"), n))
        elif _PRE_RE.search(n) and "embed_out" not in n:
            pre.append(n)
        else:
            post.append(n)
    return layers, prefix, pre, post


# ---------------------------------------------------------------- checks
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
OUT_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "fp32": "F32", "bf16": "BF16", "fp16": "F16"}


def check_output(out: PathLike, inputs: Iterable[Optional[PathLike]] = (), *, overwrite: bool = False) -> Path:
    """The output-folder check (see :func:`merge_fast._output.check_output_dir`)."""
    return check_output_dir(out, inputs, overwrite=overwrite)


def missing(names: Iterable[str], have: Any) -> List[str]:
    return [n for n in names if n not in have]


def require_tensors(names: Sequence[str], have: Any, path: Any, *, ref: Optional[Any] = None,
                    what: str = "missing from", hint: str = "", extra: Sequence[str] = ()) -> None:
    """The missing-tensor check: TensorMismatch naming the first of ``names`` that ``have``
    (a checkpoint or a set of names) lacks, and how many; with ``ref`` (the input ``names``
    come from) and ``extra`` (``path``'s tensors that ``ref`` lacks) both directions."""
    gone = missing(names, have)
    if not gone and not extra:
        return
    if ref is None:
        raise TensorMismatch(f"tensor mismatch for '{gone[0]}': {len(gone)} tensor(s) {what} {path}, e.g. {gone[:5]}{hint}")
    parts = []
    if gone:
        parts.append(f"{len(gone)} tensor(s) of {ref} missing from {path}, e.g. {gone[:3]}")
    if extra:
        parts.append(f"{len(extra)} tensor(s) of {path} not in {ref}, e.g. {list(extra[:3])}")
    raise TensorMismatch(f"tensor mismatch for '{(gone or list(extra))[0]}': " + "; ".join(parts))


def open_checkpoint(path: PathLike) -> "_core.Checkpoint":
    p = Path(path)
    if not p.exists():
        raise InvalidCheckpoint(f"invalid checkpoint {p}: no such file or folder")
    return _core.Checkpoint(str(p))


def out_dtype_code(dtype: str, out_dtype: Optional[str]) -> Optional[str]:
    """Validates `dtype`/`out_dtype` and returns the safetensors dtype to write, or None for
    'keep each tensor's input dtype'. Computation is always float32: a bfloat16/float16
    compute dtype (mergekit's `dtype`) only sets the default output dtype."""
    if dtype not in COMPUTE_DTYPES:
        raise config_error(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
    if out_dtype is None:
        return None if dtype == "float32" else OUT_DTYPES[dtype]
    if out_dtype not in OUT_DTYPES:
        raise config_error(f"out_dtype must be one of float32, bfloat16, float16, got {out_dtype!r}")
    return OUT_DTYPES[out_dtype]


def shard_size(size: Union[int, str], what: Optional[str] = None) -> int:
    """``max_shard_size`` in bytes (see :func:`merge_fast._output.parse_size`); a bad value is
    a ConfigError (prefixed with ``what``, the option's name, when given)."""
    try:
        return parse_size(size)
    except ValueError as e:
        raise config_error(f"{what}: {e}" if what else str(e)) from None


# ---------------------------------------------------------------- same-name plans
def same_tensor_plan(
    method: str,
    base: Optional[PathLike],
    models: Sequence[PathLike],
    params_for: Callable[[str], Dict[str, Any]],
    out_dtype: Optional[str],
) -> Tuple[List[str], Sequence[TensorPlan]]:
    """Plans a merge of models that share tensor names: every tensor of the reference model
    (the base, else the first) from the same name in each input. Name sets must agree."""
    paths = ([str(base)] if base is not None else []) + [str(m) for m in models]
    names = _common_names(paths)
    return paths, _SameNamePlans(names, method, params_for, len(paths), base is not None, out_dtype)


def _common_names(paths: List[str]) -> List[str]:
    """The reference's tensor names, after checking every input has the same set. The
    checkpoints are opened one at a time and closed on return (the engine opens its own):
    on 200k-tensor models each open one holds tens of MB."""
    ref_names = open_checkpoint(paths[0]).names()
    for p in paths[1:]:
        c = open_checkpoint(p)
        if len(c) == len(ref_names) and all(n in c for n in ref_names):
            continue  # same set (names in a checkpoint are unique): no sets of names to build
        ref_set, names = set(ref_names), set(c.names())
        require_tensors(sorted(ref_set - names), names, p, ref=paths[0], extra=sorted(names - ref_set))
    return ref_names


class _SameNamePlans(Sequence[TensorPlan]):
    """The plans of a same-name merge, made on demand from the tensor names: holding a
    TensorPlan (and its source dicts) per tensor costs ~1 KB each on 100k-tensor models.
    The names are held as one string and end offsets (~40 B per name less than a list of
    str objects), since they live through the whole merge."""

    def __init__(self, names: List[str], method: str, params_for: Callable[[str], Dict[str, Any]],
                 n_paths: int, has_base: bool, dtype: Optional[str]):
        self._blob = "".join(names)
        self._ends = array.array("Q", itertools.accumulate(len(n) for n in names))
        self.method, self.params_for = method, params_for
        self.n_paths, self.has_base, self.dtype = n_paths, has_base, dtype

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # negative indices; IndexError past the end
        name = self._blob[self._ends[i - 1] if i else 0:self._ends[i]]
        src: List[Source] = [tensor(k) for k in range(self.n_paths)]  # same name: implied
        first = 1 if self.has_base else 0
        return TensorPlan(name=name, method=self.method, params=self.params_for(name),
                          base=src[0] if self.has_base else None, inputs=src[first:], dtype=self.dtype)


# ---------------------------------------------------------------- serialization and run
def plain(x: Any) -> Any:
    """Numpy scalars (``np.float32(0.5)``, ``np.int64(3)``) as Python numbers, in nested
    dicts and lists too: they are accepted wherever a number is."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if type(x).__module__ == "numpy" and hasattr(x, "item") and getattr(x, "ndim", None) == 0:
        return x.item()
    return x


def _non_finite(x: Any, path: str) -> Optional[str]:
    if isinstance(x, float) and not math.isfinite(x):
        return path
    if isinstance(x, dict):
        return next((p for k, v in x.items() if (p := _non_finite(v, k if not path else f"{path}.{k}"))), None)
    if isinstance(x, (list, tuple)):
        return next((p for i, v in enumerate(x) if (p := _non_finite(v, f"{path}[{i}]"))), None)
    return None


def plan_json(obj: Any) -> str:
    """JSON for the engine; a NaN or infinite parameter is a ConfigError naming it (JSON has
    no such numbers, and no merge parameter may be one)."""
    obj = plain(obj)
    bad = _non_finite(obj, "")
    if bad is not None:
        raise config_error(f"parameter '{bad.split('.')[-1]}' must be a finite number ({bad})")
    # compact: on 200k-tensor models the plan text is held during the whole merge
    return json.dumps(obj, allow_nan=False, separators=(",", ":"))


def plan_text(paths: Sequence[str], plans: Iterable[TensorPlan], *, seed: int, max_shard_size: int,
              recipe: Dict[str, Any], direct_io: bool = False) -> str:
    """The plan as the core reads it (plan.rs ``PlanSpec``). `direct_io`: write the output
    around the page cache (for an output that is fsynced before use)."""
    plan = {
        "inputs": list(paths),
        "seed": int(seed),
        "max_shard_size": max_shard_size,
        "direct_io": bool(direct_io),
        "metadata": {"merge_fast": json.dumps(plain(recipe), sort_keys=True)},
    }
    # The tensor list is serialized one tensor at a time (no list of per-tensor dicts), and
    # parameter sets are shared by reference: both matter on 100k-tensor models. What the
    # first tensor has (method, parameter set, sources) becomes the plan's default, written
    # once: a same-name merge then lists little more than names.
    param_ids: Dict[str, int] = {}
    defaults: Dict[str, Any] = {}

    def tensor_json(t: TensorPlan) -> str:
        d = t.to_json()
        p = plan_json(d.pop("params"))
        d["params_id"] = param_ids.setdefault(p, len(param_ids))
        src = {"base": d.pop("base", None), "inputs": d.pop("inputs")}
        if not defaults:
            defaults.update(method=d["method"], params_id=d["params_id"], sources=plan_json(src), src=src)
        if d["method"] == defaults["method"]:
            del d["method"]
        if d["params_id"] == defaults["params_id"]:
            del d["params_id"]
        if plan_json(src) != defaults["sources"]:
            # "inputs" always (even empty): only a tensor without it takes the default sources
            d["inputs"] = src["inputs"]
            if src["base"] is not None:
                d["base"] = src["base"]
        return plan_json(d)

    # Appended to one buffer: a list of per-tensor strings (what `join` builds) would cost
    # ~200 B per tensor on top of the text.
    buf = bytearray()
    for i, t in enumerate(plans):
        buf += (tensor_json(t) if i == 0 else "," + tensor_json(t)).encode()
    sets = ",".join(param_ids)  # insertion order = id order
    if defaults:
        src = defaults["src"]
        plan.update(default_method=defaults["method"], default_params_id=defaults["params_id"],
                    default_inputs=src["inputs"])
        if src["base"] is not None:
            plan["default_base"] = src["base"]
    return plan_json(plan)[:-1] + f',"param_sets":[{sets}],"tensors":[{buf.decode()}]}}'


def execute(
    paths: Sequence[str],
    plans: Sequence[TensorPlan],
    out: PathLike,
    *,
    recipe: Dict[str, Any],
    side_files_from: PathLike,
    out_dtype: Optional[str] = None,
    threads: Optional[int] = None,
    max_shard_size: Union[int, str] = "5GB",
    progress: ProgressArg = False,
    seed: int = 0,
    extra_files: Optional[Callable[[Path], None]] = None,
    overwrite: bool = False,
    inputs: Sequence[Optional[PathLike]] = (),
    fsync: bool = True,
) -> MergeResult:
    """Runs planned tensors into `out` atomically and returns what was written (fsynced
    before the final rename unless ``fsync=False``, for scratch merges). `inputs`: folders
    read besides `paths` (model folders of adapters, tokenizer sources), which the output
    must not touch either."""
    protected = [*paths, side_files_from, *inputs]
    check_output(out, protected, overwrite=overwrite)
    threads = check_threads(threads)
    # A durable output goes to the disk before the merge returns anyway: written around the
    # page cache, it is not also copied into fresh cache pages and written back by the fsync.
    text = plan_text(paths, plans, seed=seed, max_shard_size=shard_size(max_shard_size), recipe=recipe,
                     direct_io=fsync)
    return run(text, out, protected, side_files_from=side_files_from, out_dtype=out_dtype, threads=threads,
               progress=progress, extra_files=extra_files, overwrite=overwrite, fsync=fsync)
