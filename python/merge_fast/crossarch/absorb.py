"""Cross-family merge ``procrustes_absorb``: donors aligned onto an anchor, their deltas
filtered and low-rank truncated, absorbed with blend β.

For each anchor tensor ``W_a`` and donor ``d`` (aligned onto the anchor's residual stream,
depth-mapped and width-projected by :mod:`.align`): ``Δ_d = W_d' − W_a``, then

* **low rank**: ``Δ_d`` is replaced by its top-``k`` singular components (randomized SVD,
  seeded; ``k = attn_rank`` for ``attn.q/k/v/o``, ``mlp_rank`` for ``mlp.gate/up/down``,
  ``embed_rank`` for ``embed``/``lm_head``; ``None`` keeps every component);
* **tolerance** (``attn_tol``, ``mlp_tol``, ``embed_tol``): a kept component ``i`` survives
  only when ``σ_i ≥ tol · σ_1(Δ_d)`` - components below that fraction of the delta's
  largest singular value are treated as noise and dropped (``tol = 0`` keeps all ``k``,
  ``tol = 1`` keeps only the leading one). Attention is usually filtered tighter (larger
  tol) than the MLP. For 1-D tensors (biases) entries with ``|Δ_i| < tol · max|Δ|`` are
  dropped;
* **rank 0** (``attn_rank=0`` etc.) absorbs nothing from that group: with all groups at 0 the
  output is the anchor's values bit for bit, written through the whole canonicalise ->
  align -> decanonicalise path (the card's ``r_max = 0`` round-trip check);
* **alignment** ``"residual"`` (default): one residual-stream rotation per donor, carried
  through every tensor with norm gains folded (function-preserving, :mod:`.align`);
  ``"per_tensor"``: each donor tensor rotated onto the anchor's by its own orthogonal
  Procrustes fit on its smaller side (the borg-merge card's alignment; lands closer to the
  anchor tensor by tensor, but the rotations of consecutive tensors need not agree);
* **blend**: ``θ = β·W_a + (1 − β)·(W_a + Σ_d w_d Δ̃_d) = W_a + (1 − β) Σ_d w_d Δ̃_d``.
  β is the weight of the anchor: **β = 1 returns the anchor byte for byte** (its weight files
  are copied verbatim), β = 0 adds the full filtered deltas. ``w_d`` (``weights``) default 1.

Norm gains are the anchor's (donor gains are folded into the donor's linears during
alignment), so norms get no delta; embeddings and ``lm_head`` are only absorbed with
``include_embeddings=True`` (their rows are matched by token); anchor roles a donor does not
have (e.g. ``mlp.gate`` of a plain-MLP GPT-NeoX or Phi donor, biases) get no delta from that
donor unless ``strict=True``, which raises :class:`TensorMismatch` naming the tensor.
Donors with a different layer count are mapped by relative depth
(:func:`.align.depth_map`), donors of another hidden size through a semi-orthogonal
projection (:mod:`.projection`). The output has the anchor's names, config and tokenizer.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from .._errors import TensorMismatch, config_error
from .._output import check_output_dir
from ..arch.roles import CanonicalKey
from ..linalg import svd
from ._model import FamilyArg, ModelView
from .. import plan as _plan
from ._engine import Planned, SideFiles, execute_canonical, new_side_dir, stored_source
from ._writer import copy_model_verbatim
from .align import DonorAligner, estimate_rotations

__all__ = ["AbsorbResult", "procrustes_absorb", "procrustes_absorb_params", "filter_delta"]

PathLike = Union[str, Path]


@dataclasses.dataclass
class AbsorbResult:
    """What :func:`procrustes_absorb` wrote."""

    path: Path
    tensors_written: int
    bytes_written: int
    seconds: float
    rotations: List[np.ndarray]
    alignment_methods: List[str]
    layer_maps: List[List[int]]
    absorbed: Dict[str, int]  # canonical key -> number of donors that contributed a delta
    missing: Dict[str, List[str]]  # donor path -> anchor keys it had no counterpart for
    files: List[Path] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        return f"wrote {self.tensors_written} tensors ({self.bytes_written / 1e6:.1f} MB) to {self.path} " \
               f"in {self.seconds:.2f} s"


def _group(role: str) -> Optional[str]:
    if role.startswith("attn.") and role not in ("attn.q_norm", "attn.k_norm"):
        return "attn"
    if role.startswith("mlp."):
        return "mlp"
    if role in ("embed", "lm_head"):
        return "embed"
    return None


def filter_delta(deltas: np.ndarray, rank: Optional[int], tol: float, *, oversample: int = 10,
                 power_iters: int = 2, seed: int = 0) -> np.ndarray:
    """Low-rank + tolerance filter of a stack of deltas ``(n, ...)`` (see module docstring);
    returns the filtered stack (float32)."""
    deltas = np.asarray(deltas, dtype=np.float32)
    if rank == 0:
        return np.zeros_like(deltas)
    if deltas.ndim == 2:  # stack of 1-D tensors
        if tol <= 0:
            return deltas
        m = np.abs(deltas).max(axis=1, keepdims=True)
        return np.where(np.abs(deltas) >= tol * m, deltas, 0.0).astype(np.float32)
    if deltas.ndim != 3:
        return deltas
    n, r, c = deltas.shape
    full = min(r, c)
    if (rank is None or rank >= full) and tol <= 0:
        return deltas
    U, S, Vt = svd(deltas, None if rank is None or rank >= full else rank,
                   oversample=oversample, power_iters=power_iters, seed=seed)
    if tol > 0:
        keep = S >= tol * S[:, :1]
        S = np.where(keep, S, 0.0).astype(np.float32)
    return np.ascontiguousarray(np.matmul(U * S[:, None, :], Vt), dtype=np.float32)


def _check_param(name: str, v: Any, lo: float, hi: Optional[float] = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not np.isfinite(v) \
            or v < lo or (hi is not None and v > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise config_error(f"parameter '{name}' must be a finite number {rng}, got {v!r}")
    return float(v)


def _check_rank(name: str, v: Any) -> Optional[int]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise config_error(f"parameter '{name}' must be an integer >= 0 or None, got {v!r}")
    return int(v)


def procrustes_absorb(
    anchor: PathLike,
    donors: Sequence[PathLike],
    *,
    out: PathLike,
    beta: float = 0.5,
    attn_rank: Optional[int] = 64,
    mlp_rank: Optional[int] = 128,
    embed_rank: Optional[int] = 64,
    attn_tol: float = 0.05,
    mlp_tol: float = 0.01,
    embed_tol: float = 0.01,
    weights: Optional[Sequence[float]] = None,
    include_embeddings: bool = False,
    strict: bool = False,
    anchor_family: FamilyArg = None,
    donor_families: Optional[Sequence[FamilyArg]] = None,
    out_dtype: Optional[str] = None,
    max_shard_size: Union[int, str] = "128MB",
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    overwrite: bool = False,
    cache_dir: Optional[PathLike] = None,
    alignment: str = "residual",
    cross_attention: str = "error",
    threads: Optional[int] = None,
    progress: bool = False,
    fsync: bool = True,
) -> AbsorbResult:
    """Absorb the Procrustes-aligned, filtered deltas of ``donors`` (any supported families)
    into ``anchor`` and write the result under the anchor's names to ``out``.

    See the module docstring for β, ranks, tolerances, depth mapping and projection. Models
    may be hub repo ids (``org/name[@revision]``, downloaded into ``cache_dir``).
    ``overwrite`` replaces an existing ``out`` holding a previous merge output.
    ``alignment``: ``"residual"`` or ``"per_tensor"`` (module docstring). ``cross_attention``:
    an encoder-decoder (T5) donor's cross-attention has no place in a decoder-only anchor:
    ``"error"`` (default) refuses, ``"skip"`` absorbs only its self-attention and MLP.
    ``threads``, ``progress``, ``fsync``: as for :func:`merge_fast.merge`.

    The merge is planned for the Rust engine: each absorbed tensor runs the
    ``absorb_filtered`` kernel (the filter and blend above) on the anchor's tensor and the
    donors' aligned tensors, which the core makes from the donors' files
    (:meth:`.align.DonorAligner.plan_source`): a rotated tensor ``S·R`` is not formed where
    the randomized SVD's products ``Δ X = S(R X) − W_a X`` cost less than forming it (a
    TinyLlama MLP tensor: 45 instead of 66 GFLOP). Tensors it cannot express (fused or
    transposed stored layouts, width projections) are computed with numpy.
    """
    if alignment not in ("residual", "per_tensor"):
        raise config_error(f"parameter 'alignment' must be 'residual' or 'per_tensor', got {alignment!r}")
    beta = _check_param("beta", beta, 0.0, 1.0)
    attn_rank, mlp_rank, embed_rank = (_check_rank(n, v) for n, v in
                                       (("attn_rank", attn_rank), ("mlp_rank", mlp_rank), ("embed_rank", embed_rank)))
    tols = {"attn": _check_param("attn_tol", attn_tol, 0.0), "mlp": _check_param("mlp_tol", mlp_tol, 0.0),
            "embed": _check_param("embed_tol", embed_tol, 0.0)}
    ranks = {"attn": attn_rank, "mlp": mlp_rank, "embed": embed_rank}
    if isinstance(donors, (str, Path)):
        donors = [donors]
    donors = list(donors)
    if not donors:
        raise config_error("procrustes_absorb needs at least one donor")
    w = [1.0] * len(donors) if weights is None else [float(x) for x in weights]
    if len(w) != len(donors):
        raise config_error(f"parameter 'weights' has {len(w)} values for {len(donors)} donors")
    for x in w:
        _check_param("weights", x, -np.inf)
    fams = list(donor_families) if donor_families is not None else [None] * len(donors)
    if len(fams) != len(donors):
        raise config_error(f"donor_families has {len(fams)} entries for {len(donors)} donors")
    check_output_dir(out, [anchor, *donors], overwrite=overwrite)
    t0 = time.perf_counter()
    from ..lora import local_models

    anchor, *donors = local_models([anchor, *donors], cache_dir=cache_dir)
    A = ModelView(anchor, anchor_family, is_anchor=True)
    views = [ModelView(d, f) for d, f in zip(donors, fams)]
    for v in views:
        DonorAligner.check(A, v, cross_attention)
    # The fits side by side (their residuals are not reported here: not computed).
    aligners = [DonorAligner(A, v, al, seed=seed, mode=alignment, cross_attention=cross_attention)
                for v, al in zip(views, estimate_rotations(A, views, seed=seed))]
    absorbed: Dict[str, int] = {}
    missing: Dict[str, List[str]] = {str(v.path): [] for v in views}
    if strict:
        for al in aligners:
            for key in A.keys:
                if al.donor.has(al.donor_key(key)) or CanonicalKey.parse(key).role in ("attn_norm", "mlp_norm",
                                                                                       "final_norm", "embed",
                                                                                       "lm_head"):
                    continue
                raise TensorMismatch(
                    f"tensor mismatch for '{A.family.from_canonical(key)}' (canonical '{key}'): donor "
                    f"{al.donor.path} ({al.donor.family.name}) has no '{al.donor_key(key)}' (strict=True)"
                )
    common: Dict[str, Any] = dict(
        rotations=[al.R for al in aligners], alignment_methods=[al.al.method for al in aligners],
        layer_maps=[al.layers for al in aligners], absorbed=absorbed, missing=missing,
    )
    if beta == 1.0:
        wr = copy_model_verbatim(A.folder, out, overwrite=overwrite)
        return AbsorbResult(wr.path, len(A.shapes), wr.bytes_written, time.perf_counter() - t0, files=wr.files,
                            **common)
    scale = np.float32(1.0 - beta)

    def value(key: str) -> np.ndarray:
        base = A.need(key)
        k = CanonicalKey.parse(key) if not key.startswith("passthrough.") else None
        group = _group(k.role) if k is not None else None
        if group is None or (group == "embed" and not include_embeddings) or ranks[group] == 0:
            return base
        deltas, wts = [], []
        for al, wd in zip(aligners, w):
            status, v = al.aligned(key)
            if status == "missing":
                missing[str(al.donor.path)].append(key)
                continue
            if status != "donor" or wd == 0.0 or v is None:
                continue
            if v.shape != base.shape:
                raise TensorMismatch(f"tensor mismatch for '{key}': aligned donor shape {v.shape} != {base.shape}")
            v -= base
            deltas.append(v)
            wts.append(wd)
        if not deltas:
            return base
        stack = filter_delta(np.stack(deltas), ranks[group], tols[group], oversample=oversample,
                             power_iters=power_iters, seed=seed)
        del deltas
        total = np.tensordot(np.asarray(wts, np.float32), stack, axes=1).astype(np.float32, copy=False)
        del stack
        absorbed[key] = len(wts)
        total *= scale
        out_v = np.add(base, total, out=total)
        if not np.all(np.isfinite(out_v)):
            from .._errors import NumericalError

            raise NumericalError(f"numerical error in tensor '{key}': procrustes_absorb produced NaN/inf")
        return out_v

    recipe = {
        "method": "procrustes_absorb", "anchor": str(anchor), "donors": [str(d) for d in donors], "beta": beta,
        "attn_rank": attn_rank, "mlp_rank": mlp_rank, "embed_rank": embed_rank, "attn_tol": attn_tol,
        "mlp_tol": mlp_tol, "embed_tol": embed_tol, "weights": w, "include_embeddings": include_embeddings,
        "seed": seed, "alignment": alignment,
    }
    inputs = _plan.Inputs()
    a_in = inputs(A.path)
    d_ins = [inputs(v.path) for v in views]
    with new_side_dir() as tmp:
        side = SideFiles(inputs, Path(tmp))

        def plan_for(name: str, key: str) -> Optional[Planned]:
            base = stored_source(A, key, a_in)
            if base is None:
                return None
            keep: Planned = ("passthrough", {}, None, [base])
            k = CanonicalKey.parse(key) if not key.startswith("passthrough.") else None
            group = _group(k.role) if k is not None else None
            if group is None or (group == "embed" and not include_embeddings) or ranks[group] == 0:
                return keep
            srcs: List[_plan.Source] = []
            wts: List[float] = []
            for j, (al, wd) in enumerate(zip(aligners, w)):
                status, src = al.plan_source(key, a_in, d_ins[j], side, f"d{j}")
                if status == "numpy":  # aligned with numpy, read by the kernel from a side file
                    status, v = al.aligned(key)
                    if status == "donor":
                        assert v is not None
                        if v.shape != A.shape(key):
                            raise TensorMismatch(f"tensor mismatch for '{key}': aligned donor shape {v.shape} != "
                                                 f"{A.shape(key)}")
                        got: np.ndarray = v
                        ref = side.ref(f"d{j}/out/{key}", lambda: got)
                        src = _plan.tensor(ref["input"], ref["tensor"])
                if status == "missing":
                    missing[str(al.donor.path)].append(key)
                    continue
                if status != "donor" or wd == 0.0 or src is None:
                    continue
                srcs.append(src)
                wts.append(wd)
            if not srcs:
                return keep
            absorbed[key] = len(srcs)
            params: Dict[str, Any] = {"beta": beta, "tol": tols[group], "weight": wts, "oversample": oversample,
                                      "power_iters": power_iters}
            if ranks[group] is not None:
                params["rank"] = ranks[group]
            return "absorb_filtered", params, base, srcs

        mr = execute_canonical(A, inputs, side, plan_for, value, out, recipe=recipe, out_dtype=out_dtype,
                               max_shard_size=max_shard_size, protected=[A.folder, *(v.folder for v in views)],
                               overwrite=overwrite, threads=threads, progress=progress, seed=seed,
                               fsync=fsync)
    return AbsorbResult(mr.path, mr.tensors_written, mr.bytes_written, time.perf_counter() - t0, files=mr.files,
                        **common)


_PARAMS = {
    "beta", "attn_rank", "mlp_rank", "embed_rank", "attn_tol", "mlp_tol", "embed_tol", "weights",
    "include_embeddings", "strict", "anchor_family", "donor_families", "out_dtype", "max_shard_size",
    "oversample", "power_iters", "seed", "overwrite", "alignment", "cross_attention",
}


def procrustes_absorb_params(params: Mapping[str, Any]) -> AbsorbResult:
    """Config entry point: ``{"anchor": path, "donors": [paths], "out": path, <parameters>}``
    (parameters as in :func:`procrustes_absorb`; ``models`` is accepted for ``donors`` and
    ``base_model`` for ``anchor``). Unknown keys are a ConfigError naming them."""
    p = dict(params)
    anchor = p.pop("anchor", None) or p.pop("base_model", None)
    donors = p.pop("donors", None) or p.pop("models", None)
    out = p.pop("out", None)
    nested = p.pop("parameters", None)
    if isinstance(nested, Mapping):
        p.update(nested)
    if anchor is None or not donors or out is None:
        raise config_error("procrustes_absorb needs 'anchor', 'donors' and 'out'")
    unknown = sorted(set(p) - _PARAMS)
    if unknown:
        raise config_error(f"unknown procrustes_absorb parameter(s) {unknown}")
    return procrustes_absorb(anchor, donors, out=out, **p)
