"""Mergeable partial merges: weighted-sum merges as states that combine like a replicated
counter (a join-semilattice), so sites can merge their own fine-tunes and combine later.

A *state* is a folder with ``state.safetensors``: for every output tensor a float64
numerator ``num.NAME`` and denominator ``den.NAME``, plus, in the header metadata, the
method, its parameters, the base's identity and the set of contributing inputs (resolved
identity: real path, or ``repo@commit`` for a hub cache snapshot; with weight and, for
Fisher-weighted, the Fisher's identity), and the side files (config, tokenizer) of one input.

=================  ==============================  ================================
method             numerator                       denominator
=================  ==============================  ================================
linear             Σ w_i θ_i                       Σ w_i (0-d)
task_arithmetic    Σ w_i (θ_i − θ_base)            Σ w_i (0-d)
fisher_weighted    Σ w_i (s_i F_i + ε) θ_i          Σ w_i (s_i F_i + ε)
regmean            Σ w_i W_i G̃_i                   Σ w_i G̃_i ([in, in])
=================  ==============================  ================================

RegMean states also hold ``lin.NAME`` = ``Σ w_i W_i`` for every tensor with a Gram (the
ridge pulls unexcited directions toward the weighted mean, as the one-shot kernel does), and
the linear numerator/denominator for tensors without one. ``G̃_i`` is local to input ``i``
(its off-diagonals scaled by α), so RegMean states combine like the others.

(``s_i`` is 1, or ``1/mean(F_i)`` per tensor with ``fisher_normalize="mean"``, which is local
to input ``i``.) :func:`combine` joins states: states whose inputs are a subset of another
state's are dropped (so a state joined with itself or with a part of itself is unchanged),
the remaining states must have disjoint inputs (else :class:`ConfigError` naming the shared
ones: a sum cannot be split) and are summed in a canonical order (sorted by their inputs),
so the result does not depend on the order of the arguments. :func:`finalize` divides
(linear with ``normalize``, fisher_weighted), adds the base (task arithmetic) and writes a
model folder, each tensor cast to its inputs' dtype unless ``out_dtype`` is given.

Arithmetic is numpy float64, one tensor at a time (inputs are read one tensor at a time by
the engine's reader, states through ``np.memmap``), so memory is bounded by a few copies of
the largest tensor. :func:`finalize` rounds to float32 into a staging file and lets the Rust
engine cast and shard it (the same rounding as a one-shot merge's float32 result).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from ._errors import InvalidCheckpoint, TensorMismatch, config_error
from ._folders import SIDE_FILES
from .distributed import with_executor
from .plan import check_output, execute, open_checkpoint, out_dtype_code, same_tensor_plan
from ._output import check_output_dir, staged_dir

PathLike = Union[str, "os.PathLike[str]"]
STATE_FILE = "state.safetensors"
FORMAT = "merge_fast.partial/1"
METHODS = ("linear", "task_arithmetic", "fisher_weighted", "regmean")
_HUB = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{6,64})(?:/|$)")

__all__ = ["partial", "combine", "finalize", "read_state_info", "identity"]


def identity(path: PathLike) -> str:
    """A model's resolved identity: ``org/name@commit`` for a hub cache snapshot, else its
    real path."""
    real = os.path.realpath(os.fspath(path))
    m = _HUB.search(os.fspath(path)) or _HUB.search(real)
    if m:
        return f"{m['org']}/{m['name']}@{m['commit']}"
    return real


def _params(method: str, params: Dict[str, Any]) -> Dict[str, Any]:
    """The parameters that decide the finished merge, with defaults filled in (states with
    different parameters cannot be combined)."""
    p = dict(params)
    defaults: Dict[str, Dict[str, Any]] = {
        "linear": {"normalize": True},
        "task_arithmetic": {"lambda": 1.0, "normalize": False},
        "fisher_weighted": {"epsilon": 1e-8, "fisher_normalize": "none"},
        "regmean": {"reduce_non_diagonal_ratio": 0.9, "ridge": 1e-6}}
    known = defaults[method]
    if method == "task_arithmetic" and "lam" in p:
        p["lambda"] = p.pop("lam")
    if method == "regmean" and "alpha" in p:
        if "reduce_non_diagonal_ratio" in p and p["reduce_non_diagonal_ratio"] != p["alpha"]:
            raise config_error("regmean: give reduce_non_diagonal_ratio or its alias alpha, not both")
        p["reduce_non_diagonal_ratio"] = p.pop("alpha")
    extra = sorted(set(p) - set(known))
    if extra:
        raise config_error(f"partial {method}: unknown parameter(s) {extra} (known: {sorted(known)})")
    out = {**known, **p}
    if method == "fisher_weighted":
        if out["fisher_normalize"] not in ("none", "mean"):
            raise config_error(f"fisher_normalize must be 'none' or 'mean', got {out['fisher_normalize']!r}")
        if not float(out["epsilon"]) >= 0:
            raise config_error(f"epsilon must be >= 0, got {out['epsilon']!r}")
    if method == "regmean":
        if not 0 <= float(out["reduce_non_diagonal_ratio"]) <= 1 or not float(out["ridge"]) >= 0:
            raise config_error("regmean: reduce_non_diagonal_ratio must be in [0, 1] and ridge >= 0")
    return out


# ----------------------------------------------------------------------------- state files


def _write_safetensors(path: Path, entries: List[Tuple[str, str, List[int]]], metadata: Dict[str, str],
                       arrays: Iterator[np.ndarray]) -> None:
    """Streams a safetensors file: the header (names, dtypes, shapes) first, then each array
    of `arrays` in the order of `entries`, one at a time."""
    sizes = {"F64": 8, "F32": 4}
    header: Dict[str, Any] = {"__metadata__": metadata}
    off = 0
    for name, dt, shape in entries:
        n = int(np.prod(shape, dtype=np.int64)) * sizes[dt]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for (name, dt, shape), a in zip(entries, arrays):
            want = np.dtype("<f8" if dt == "F64" else "<f4")
            a = np.asarray(a, dtype=want)  # tobytes() is C order; ascontiguousarray makes 0-d 1-d
            if list(a.shape) != list(shape):
                raise TensorMismatch(f"tensor mismatch for '{name}': shape {list(a.shape)}, expected {list(shape)}")
            f.write(a.tobytes())


class _State:
    """A state folder, read lazily: tensors are memory-mapped one at a time."""

    def __init__(self, folder: PathLike):
        self.folder = Path(folder)
        f = self.folder / STATE_FILE
        if not f.is_file():
            raise InvalidCheckpoint(f"invalid checkpoint {self.folder}: not a merge state (no {STATE_FILE})")
        self.file = f
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        self.data_start = 8 + n
        meta = header.pop("__metadata__", {}) or {}
        if meta.get("format") != FORMAT:
            raise InvalidCheckpoint(f"invalid checkpoint {f}: not a merge state (format {meta.get('format')!r})")
        self.info: Dict[str, Any] = json.loads(meta["state"])
        self.header = header

    @property
    def keys(self) -> frozenset:
        return frozenset(_input_key(i) for i in self.info["inputs"])

    def array(self, name: str) -> np.ndarray:
        h = self.header[name]
        a, b = h["data_offsets"]
        if b == a:
            return np.zeros(h["shape"], dtype=np.float64)
        m = np.memmap(self.file, dtype="<f8", mode="r", offset=self.data_start + a, shape=((b - a) // 8,))
        return m.reshape(h["shape"])  # via a flat map: memmap turns shape () into (1,)


def _input_key(i: Dict[str, Any]) -> Tuple:
    return (i["id"], i.get("fisher") or i.get("gram"), float(i["weight"]))


def read_state_info(state: PathLike) -> Dict[str, Any]:
    """The metadata of a state: method, params, base, inputs, tensors (name -> dtype, shape)."""
    return _State(state).info


def _parts(t: Dict[str, Any]) -> List[Tuple[str, List[int]]]:
    """The stored arrays of one tensor: num, den, and RegMean's lin (Σ w_i W_i) when it has a Gram."""
    out = [("num", t["shape"]), ("den", t["den_shape"])]
    if t.get("gram"):
        out.append(("lin", t["shape"]))
    return out


def _write_state(out: PathLike, info: Dict[str, Any], tensors: Iterator[Tuple[np.ndarray, ...]],
                 side_from: Optional[Path], protected: Sequence[Optional[PathLike]], overwrite: bool) -> Path:
    entries = []
    for name, t in info["tensors"].items():
        entries += [(f"{k}.{name}", "F64", shape) for k, shape in _parts(t)]

    def arrays():
        for parts in tensors:
            yield from parts

    meta = {"format": FORMAT, "state": json.dumps(info, sort_keys=True)}
    check_output_dir(out, protected, overwrite=overwrite)
    with staged_dir(out, protected, overwrite=overwrite) as tmp:
        _write_safetensors(tmp / STATE_FILE, entries, meta, arrays())
        if side_from is not None:
            for name in SIDE_FILES:
                if (side_from / name).is_file():
                    shutil.copy2(side_from / name, tmp / name)
    return Path(out)


# ----------------------------------------------------------------------------- API


def partial(
    models: Sequence[PathLike],
    *,
    out: PathLike,
    method: str = "linear",
    weights: Optional[Sequence[float]] = None,
    base: Optional[PathLike] = None,
    fishers: Optional[Sequence[PathLike]] = None,
    grams: Optional[Sequence[PathLike]] = None,
    params: Optional[Dict[str, Any]] = None,
    overwrite: bool = False,
) -> Path:
    """Writes the merge state of `models` (folders) to the folder `out`; see the module doc.
    ``method``: linear, task_arithmetic (needs ``base``) or fisher_weighted (needs one Fisher
    per model) or regmean (needs one Gram file per model, from ``merge_fast.torch.estimate_gram``).
    ``params``: linear ``normalize``; task_arithmetic ``lambda``, ``normalize``;
    fisher_weighted ``epsilon``, ``fisher_normalize``; regmean ``reduce_non_diagonal_ratio``
    (alias ``alpha``), ``ridge``."""
    if method not in METHODS:
        raise config_error(f"partial merges support {', '.join(METHODS)}, not {method!r}")
    models = [Path(m) for m in models]
    if not models:
        raise config_error("partial needs at least one model")
    w = [1.0] * len(models) if weights is None else [float(x) for x in weights]
    if len(w) != len(models):
        raise config_error(f"{len(models)} models but {len(w)} weights")
    if any(not np.isfinite(x) for x in w):
        raise config_error("weights must be finite numbers")
    p = _params(method, params or {})
    if (method == "task_arithmetic") != (base is not None):
        raise config_error(f"{method} {'needs' if base is None else 'takes no'} base model")
    fishers = [Path(f) for f in (fishers or [])]
    if (method == "fisher_weighted") != bool(fishers) or (fishers and len(fishers) != len(models)):
        raise config_error(f"fisher_weighted needs one Fisher per model ({len(models)} models, "
                          f"{len(fishers)} Fishers); other methods take none")
    grams = [Path(g) for g in (grams or [])]
    if (method == "regmean") != bool(grams) or (grams and len(grams) != len(models)):
        raise config_error(f"regmean needs one Gram file per model ({len(models)} models, "
                          f"{len(grams)} Gram files); other methods take none")
    ids = [identity(m) for m in models]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise config_error(f"input(s) given twice: {dup}")
    # Validates names and shapes of every input (and the base) before any write.
    paths, plans = same_tensor_plan("linear", base, models, lambda _n: {}, None)
    ckpts = [open_checkpoint(x) for x in paths]
    fck = [open_checkpoint(f) for f in fishers]
    gck = [open_checkpoint(g) for g in grams]
    ref = ckpts[0]
    meta_of = {n: (dt, shape) for n, dt, shape in ref.tensors()}
    fifo: Dict[str, bool] = {}
    if grams:
        from .methods.data_aware import _gram_plan

        names = [t.name for t in plans]
        fifo = _gram_plan([str(g) for g in grams], gck, names, {n: tuple(meta_of[n][1]) for n in names})
    for f, c in zip(fishers, fck):
        missing = [t.name for t in plans if t.name not in c]
        if missing:
            raise TensorMismatch(f"tensor mismatch for '{missing[0]}': not in Fisher {f}")
    first = 1 if base is not None else 0
    def den_shape(n: str) -> List[int]:
        shape = list(meta_of[n][1])
        if method == "fisher_weighted":
            return shape
        if n in fifo:  # the summed Gram, [in, in]
            d = shape[0] if fifo[n] else shape[1]
            return [d, d]
        return []

    tensors: Dict[str, Dict[str, Any]] = {t.name: {"dtype": meta_of[t.name][0], "shape": list(meta_of[t.name][1]), "den_shape": den_shape(t.name),
                        **({"gram": True, "fan_in_fan_out": fifo[t.name]} if t.name in fifo else {})}
               for t in plans}
    info = {
        "method": method,
        "params": p,
        "base": identity(base) if base is not None else None,
        "inputs": [{"id": i, "weight": x, **({"fisher": identity(fishers[k])} if fishers else {}),
                    **({"gram": identity(grams[k])} if grams else {})}
                   for k, (i, x) in enumerate(zip(ids, w))],
        "tensors": tensors,
        "side_files_from": ids[0] if base is None else identity(base),
    }

    def gen():
        for t in plans:
            num = np.zeros(tensors[t.name]["shape"], dtype=np.float64)
            den: Any = np.zeros(tensors[t.name]["den_shape"], dtype=np.float64)
            b = ckpts[0].read_f32(t.name).astype(np.float64).reshape(num.shape) if base is not None else None
            if tensors[t.name].get("gram"):
                yield _regmean_part(t.name, tensors[t.name], w, [c.read_f32(t.name) for c in ckpts],
                                    gck, grams, float(p["reduce_non_diagonal_ratio"]))
                continue
            for k in range(len(models)):
                x = ckpts[first + k].read_f32(t.name).astype(np.float64).reshape(num.shape)
                if method == "fisher_weighted":
                    fi = fck[k].read_f32(t.name).astype(np.float64).reshape(num.shape)
                    if (fi < 0).any():
                        from ._errors import NumericalError
                        raise NumericalError(f"numerical error in '{t.name}': Fisher {fishers[k]} is negative")
                    s = 1.0
                    if p["fisher_normalize"] == "mean":
                        mean = fi.mean() if fi.size else 0.0
                        s = 1.0 / mean if mean > 0 else 1.0
                    c = w[k] * (fi * s + float(p["epsilon"]))
                    num += c * x
                    den += c
                else:
                    num += w[k] * (x - b if b is not None else x)
                    den += w[k]
            yield num, den

    side = Path(paths[0])
    return _write_state(out, info, gen(), side if side.is_dir() else side.parent,
                        [*models, *fishers, *grams, base], overwrite)


def _regmean_part(name: str, t: Dict[str, Any], w: List[float], weights: List[np.ndarray], gck, grams,
                  alpha: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Σ w_i W_i G̃_i, Σ w_i G̃_i, Σ w_i W_i) in float64, in the weight's stored layout
    (``G̃_i W_i`` for a weight stored [in, out])."""
    shape = t["shape"]
    d = t["den_shape"][0]
    num = np.zeros(shape, np.float64)
    den = np.zeros((d, d), np.float64)
    lin = np.zeros(shape, np.float64)
    for k, (x, c) in enumerate(zip(weights, gck)):
        W = x.astype(np.float64).reshape(shape)
        G = c.read_f32(name).astype(np.float64).reshape(d, d)
        if (np.diag(G) < 0).any():
            from ._errors import NumericalError
            raise NumericalError(f"numerical error in '{name}': Gram {grams[k]} has a negative diagonal entry")
        Gt = alpha * G + (1 - alpha) * np.diag(np.diag(G))
        num += w[k] * (Gt @ W if t["fan_in_fan_out"] else W @ Gt)
        den += w[k] * Gt
        lin += w[k] * W
    return num, den, lin


def _same(infos: List[Tuple[Path, Dict[str, Any]]], key: str) -> None:
    (p0, i0), *rest = infos
    for p, i in rest:
        if i[key] != i0[key]:
            raise config_error(f"cannot combine merge states with different {key}: "
                              f"{p0} has {i0[key]!r}, {p} has {i[key]!r}")


def combine(states: Sequence[PathLike], *, out: PathLike, overwrite: bool = False) -> Path:
    """Joins merge states (any order and grouping; see the module doc) into the state `out`."""
    sts = [_State(s) for s in states]
    if not sts:
        raise config_error("combine needs at least one state")
    infos = [(s.folder, s.info) for s in sts]
    for key in ("method", "params", "base"):
        _same(infos, key)
    t0 = {n: (t["shape"], t["dtype"]) for n, t in sts[0].info["tensors"].items()}
    for s in sts[1:]:
        t = {n: (v["shape"], v["dtype"]) for n, v in s.info["tensors"].items()}
        if t != t0:
            diff = sorted(set(t) ^ set(t0)) or sorted(n for n in t if t[n] != t0[n])
            raise TensorMismatch(f"tensor mismatch for '{diff[0]}': {s.folder} and {sts[0].folder} "
                                 f"hold different tensors")
    # One input, one weight (and Fisher) everywhere.
    seen: Dict[str, Tuple] = {}
    for s in sts:
        for i in s.info["inputs"]:
            k = _input_key(i)
            if seen.setdefault(i["id"], k) != k:
                raise config_error(f"input {i['id']} appears with different weights or Fishers/Grams "
                                  f"({seen[i['id']][1:]} vs {k[1:]}; last seen in {s.folder})")
    # The join: drop states covered by another, keep one of equal ones (canonical choice).
    order = sorted(range(len(sts)), key=lambda k: (sorted(sts[k].keys), str(sts[k].folder)))
    kept: List[_State] = []
    for j in sorted(order, key=lambda j: -len(sts[j].keys)):
        if not any(sts[j].keys <= s.keys for s in kept):
            kept.append(sts[j])
    for a in range(len(kept)):
        for b in range(a + 1, len(kept)):
            shared = kept[a].keys & kept[b].keys
            if shared:
                names = sorted(x[0] for x in shared)
                raise config_error(f"states {kept[a].folder} and {kept[b].folder} share the inputs "
                                  f"{names} but not all of their inputs; a sum cannot be split, so they cannot "
                                  f"be combined (combine states with disjoint inputs)")
    kept.sort(key=lambda s: sorted(s.keys))  # canonical summation order
    info = dict(kept[0].info)
    info["inputs"] = sorted((i for s in kept for i in s.info["inputs"]), key=lambda i: i["id"])
    # Side files: those of the state holding the smallest input identity (order-free).
    side_state = min(kept, key=lambda s: min(s.keys))
    info["side_files_from"] = side_state.info["side_files_from"]

    def gen():
        for n, t in info["tensors"].items():
            parts = []
            for k, shape in _parts(t):
                acc = np.zeros(shape, dtype=np.float64)
                for s in kept:
                    acc += s.array(f"{k}.{n}")
                parts.append(acc)
            yield tuple(parts)

    return _write_state(out, info, gen(), side_state.folder, [s.folder for s in sts], overwrite)


@with_executor
def finalize(state: PathLike, *, out: PathLike, base: Optional[PathLike] = None, out_dtype: Optional[str] = None,
             max_shard_size: Union[int, str] = "5GB", threads: Optional[int] = None, overwrite: bool = False,
             progress: bool = False):
    """Finishes a state into the model folder `out` (side files from the state). For
    task_arithmetic, ``base`` is the base folder (default: the base path recorded in the
    state); its identity must match the state's. Returns a :class:`MergeResult`."""
    s = _State(state)
    info = s.info
    method, p = info["method"], info["params"]
    b_ckpt = None
    if method == "task_arithmetic":
        bpath = Path(base if base is not None else info["base"])
        if identity(bpath) != info["base"]:
            raise config_error(f"base {bpath} is not the state's base {info['base']}")
        b_ckpt = open_checkpoint(bpath)
    elif base is not None:
        raise config_error(f"{method} states take no base")
    code = out_dtype_code("float32", out_dtype)
    protected = [s.folder, *([base] if base is not None else [])]
    check_output(out, protected, overwrite=overwrite)
    out_abs = Path(out).absolute()
    # Named like a staging folder, so a later merge into `out` removes it if we are killed.
    stage = out_abs.parent / f".{out_abs.name}.merge-fast-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir(parents=True)
    try:
        entries = [(n, "F32", t["shape"]) for n, t in info["tensors"].items()]
        wsum = sum(float(i["weight"]) for i in info["inputs"])

        def values():
            with np.errstate(divide="ignore", invalid="ignore"):
                for n, t in info["tensors"].items():
                    num, den = s.array(f"num.{n}"), s.array(f"den.{n}")
                    if t.get("gram"):
                        v = _regmean_solve(n, t, num, den, s.array(f"lin.{n}"), wsum, float(p["ridge"]))
                    elif method == "regmean":
                        v = num / den
                    elif method == "fisher_weighted" or p.get("normalize"):
                        v = num / den
                    else:
                        v = np.asarray(num)
                    if b_ckpt is not None:  # task_arithmetic (the only method with a base)
                        v = b_ckpt.read_f32(n).astype(np.float64).reshape(v.shape) + float(p["lambda"]) * v
                    if not np.isfinite(v).all():
                        from ._errors import NumericalError
                        raise NumericalError(f"numerical error in '{n}': the finished merge is not finite "
                                             f"(do the weights sum to zero?)")
                    yield v.astype(np.float32)

        _write_safetensors(stage / "model.safetensors", entries, {"format": "pt"}, values())
        for name in SIDE_FILES:
            if (s.folder / name).is_file():
                shutil.copy2(s.folder / name, stage / name)
        # The engine casts (round-to-nearest-even, as a one-shot merge) and shards.
        paths, lazy = same_tensor_plan("linear", None, [stage], lambda _n: {"weight": [1.0]}, code)
        plans = list(lazy)  # built on access: set each tensor's output dtype on a real list
        for t in plans:
            t.dtype = code or info["tensors"][t.name]["dtype"]
        recipe = {"merge_fast_version": _core.__version__, "method": method, "parameters": p,
                  "base_model": info["base"], "models": info["inputs"], "finalized_from": "partial state"}
        return execute(paths, plans, out, recipe=recipe, side_files_from=stage, out_dtype=code,
                       threads=threads, max_shard_size=max_shard_size, progress=progress,
                       overwrite=overwrite, inputs=[s.folder])
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _regmean_solve(name: str, t: Dict[str, Any], num: np.ndarray, den: np.ndarray, lin: np.ndarray, wsum: float,
                   ridge: float) -> np.ndarray:
    """W* from a RegMean state, as the Rust kernel: ``(A + λI)`` with ``A = Σ w_i G̃_i`` and
    ``λ = ridge · mean(diag A)`` (1 when A is zero), right-hand side ``+ λ Σ w_i W_i / Σ w_i``."""
    d = den.shape[0]
    tr = float(np.trace(den)) / max(d, 1)
    lam = ridge * tr if tr > 0 else 1.0
    a = np.array(den, dtype=np.float64) + lam * np.eye(d)
    rhs = np.asarray(num) + (lam / wsum) * np.asarray(lin)
    try:
        c = np.linalg.cholesky(a)
    except np.linalg.LinAlgError:
        from ._errors import NumericalError
        raise NumericalError(f"numerical error in '{name}': Σ w_i G̃_i + λI is not positive definite "
                             f"(λ = {lam:e}); raise 'ridge'") from None
    solve = lambda b: np.linalg.solve(c.T, np.linalg.solve(c, b))  # noqa: E731
    return solve(rhs) if t["fan_in_fan_out"] else solve(rhs.T).T
