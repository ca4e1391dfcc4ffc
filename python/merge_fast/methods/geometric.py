"""model_stock, nuslerp, multislerp, karcher, nearswap, ram, ramplus_tl, arcee_fusion,
passthrough: mergekit 0.1.5's methods of the same names, with its parameters and defaults.

Every function takes numpy arrays / torch tensors (returns the merged array) or model
folders (with ``out=PATH``; returns a :class:`MergeResult`), and the usual engine options
(``out``, ``dtype``, ``out_dtype``, ``threads``, ``max_shard_size``, ``progress``, ``seed``)
as keywords. Per-model parameters (``weights``) have one value per model in ``models``,
the base excluded. All arithmetic is f32 with whole-tensor statistics in f64.

Deliberate departures from mergekit (each where mergekit degenerates):

* ``model_stock``: mergekit's formula by default (negative agreement extrapolates,
  ``t < 0``); only the pole ``|1 + (N-1)·cos| < 1e-6`` keeps the base, with a warning.
  ``clamp_cosine=True`` (opt-in) clamps the mean cosine to [0, 1].
* ``nuslerp``: a zero vector (e.g. a model identical to the base) is lerped; mergekit
  shrinks the other vector by ``sin(t·π/2)``.
* ``multislerp``: when the weighted mean direction vanishes with three or more models
  (e.g. every model equals the base) the weighted linear combination is returned;
  mergekit raises.
* ``arcee_fusion``: for tensors over 1,000,000 elements the quantile sample is drawn from
  the seeded counter RNG (mergekit's sample is unseeded, so not reproducible).
"""
from __future__ import annotations

from typing import Any, Optional, overload, Sequence

from .._folders import MergeResult
from ._dispatch import Array, Model, PathLike, as_list, merge

__all__ = [
    "model_stock",
    "nuslerp",
    "multislerp",
    "karcher",
    "nearswap",
    "ram",
    "ramplus_tl",
    "arcee_fusion",
    "passthrough",
]


@overload
def model_stock(
    base: Array,
    models: Sequence[Array],
    *,
    filter_wise: bool = False,
    clamp_cosine: bool = False,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def model_stock(
    base: PathLike,
    models: Sequence[PathLike],
    *,
    filter_wise: bool = False,
    clamp_cosine: bool = False,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
def model_stock(base: Model, models: Sequence[Model], *, filter_wise: bool = False, clamp_cosine: bool = False,
                **options: Any):
    """Model Stock (Jang et al. 2024): ``t·mean(θ_i) + (1 − t)·θ_base`` with
    ``t = N·c / (1 + (N − 1)·c)``, ``c`` the mean pairwise cosine of the task vectors
    ``θ_i − θ_base`` (each pair's cosine divides by ``max(|Δ_a||Δ_b|, 1e-6)``), over the
    flattened tensor, or per row along the last dimension with ``filter_wise=True``.
    Needs a base and at least 2 models.

    As in mergekit, a negative ``c`` gives ``t < 0`` (extrapolation), and at the pole
    (``|1 + (N − 1)·c| < 1e-6``) the base is kept, with a :class:`merge_fast.MergeWarning`.
    ``clamp_cosine=True`` (merge_fast's option) clamps ``c`` to [0, 1] first, so
    anti-correlated updates give the base."""
    return merge("model_stock", models, base=base, params={"filter_wise": filter_wise, "clamp_cosine": clamp_cosine},
                 **options)


@overload
def nuslerp(
    models: Sequence[Array],
    weights: Optional[Sequence[float]] = None,
    *,
    base: Optional[Array] = None,
    t: Optional[float] = None,
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def nuslerp(
    models: Sequence[PathLike],
    weights: Optional[Sequence[float]] = None,
    *,
    base: Optional[PathLike] = None,
    t: Optional[float] = None,
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
def nuslerp(
    models: Sequence[Model],
    weights: Optional[Sequence[float]] = None,
    *,
    base: Optional[Model] = None,
    t: Optional[float] = None,
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
    **options: Any,
):
    """NuSLERP of exactly two models with ``t = w_1 / (w_0 + w_1)`` (0.5 when the weights
    sum to ~0); ``weights`` is required as in mergekit, or pass ``t`` (weights ``[1 − t, t]``).
    With ``base``, the task vectors are interpolated and the base added back.

    ``nuslerp_flatten`` (default): one angle for the flattened tensor. Otherwise one per row
    along the last dimension, or with ``nuslerp_row_wise`` one per vector along dimension 0
    (mergekit's ``dim=0``). Norms are clamped at 1e-7; colinear pairs
    (``1 − cos² ≤ 1e-16``) are lerped.

    Departure: a zero vector (norm ≤ 1e-7) is lerped; mergekit returns ``sin(t·π/2)`` times
    the other one."""
    if t is not None:
        if weights is not None:
            raise TypeError("nuslerp: pass weights or t, not both")
        weights = [1.0 - t, t]
    params = {"weight": as_list(weights), "nuslerp_row_wise": nuslerp_row_wise, "nuslerp_flatten": nuslerp_flatten}
    return merge("nuslerp", models, base=base, params=params, **options)


@overload
def multislerp(
    models: Sequence[Array],
    weights: Optional[Sequence[float]] = None,
    *,
    base: Optional[Array] = None,
    normalize_weights: bool = True,
    eps: float = 1e-08,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def multislerp(
    models: Sequence[PathLike],
    weights: Optional[Sequence[float]] = None,
    *,
    base: Optional[PathLike] = None,
    normalize_weights: bool = True,
    eps: float = 1e-08,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
def multislerp(
    models: Sequence[Model],
    weights: Optional[Sequence[float]] = None,
    *,
    base: Optional[Model] = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
    **options: Any,
):
    """Multi-SLERP: barycentric interpolation on the hypersphere of N models (or, with
    ``base``, of their task vectors, the base added back). ``weights`` is required as in
    mergekit (normalized to sum 1 unless ``normalize_weights=False``). Result:
    ``(Σ w_i |x_i|) · m/|m|`` with ``m = Σ w_i x_i/(|x_i| + eps)`` on the flattened tensors;
    this is exactly what mergekit's tangent-space formulation reduces to (the weighted sum
    of its tangent vectors is identically zero). One model: returned unchanged.

    When ``|m| < eps``: two models are lerped (as mergekit). Departure: with three or more
    the weighted linear combination is returned (mergekit raises)."""
    params = {"weight": as_list(weights), "normalize_weights": normalize_weights, "eps": eps}
    return merge("multislerp", models, base=base, params=params, **options)


@overload
def karcher(
    models: Sequence[Array],
    *,
    base: Optional[Array] = None,
    max_iter: int = 10,
    tol: float = 1e-05,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def karcher(
    models: Sequence[PathLike],
    *,
    base: Optional[PathLike] = None,
    max_iter: int = 10,
    tol: float = 1e-05,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
def karcher(
    models: Sequence[Model],
    *,
    base: Optional[Model] = None,
    max_iter: int = 10,
    tol: float = 1e-5,
    **options: Any,
):
    """Karcher (Riemannian) mean on the unit hypersphere of the normalized inputs, equal
    weights, scaled by the mean of their norms; mergekit's iteration (``max_iter`` steps,
    stopping when the tangent norm is below ``tol``). As in mergekit the base has no special
    role: given, it is one more input (taken last). Inputs with norm ≤ ``tol`` are left out
    of the direction but count (as 0) in the mean norm. One input: returned unchanged.
    The iteration runs on N coefficients from the streamed Gram matrix (f64)."""
    return merge("karcher", models, base=base, params={"max_iter": max_iter, "tol": tol}, **options)


@overload
def nearswap(
    base: Array,
    model: Array,
    t: float,
    *,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def nearswap(
    base: PathLike,
    model: PathLike,
    t: float,
    *,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
def nearswap(base: Model, model: Model, t: float, **options: Any):
    """NearSwap: per element ``w = clamp(t / max(|base − model|, 1e-6), 0, 1)``,
    ``w·model + (1 − w)·base``: values within ``t`` of the base are swapped for the model's."""
    return merge("nearswap", [model], base=base, params={"t": t}, **options)


@overload
def ram(
    base: Array,
    models: Sequence[Array],
    *,
    epsilon: float = 1e-05,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def ram(
    base: PathLike,
    models: Sequence[PathLike],
    *,
    epsilon: float = 1e-05,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
def ram(base: Model, models: Sequence[Model], *, epsilon: float = 1e-5, **options: Any):
    """RAM (Reinforced Agent Merging): task-vector entries with ``|Δ| > epsilon`` contribute;
    entries contributed by one model are kept, by several averaged over the contributors;
    added to the base."""
    return merge("ram", models, base=base, params={"epsilon": epsilon}, **options)


@overload
def ramplus_tl(
    base: Array,
    models: Sequence[Array],
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-05,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def ramplus_tl(
    base: PathLike,
    models: Sequence[PathLike],
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-05,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
def ramplus_tl(
    base: Model,
    models: Sequence[Model],
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
    **options: Any,
):
    """RAM+ (tensor-local): as :func:`ram`, with each model's unique entries scaled by
    ``1 + r·clamp(shared_i / max(unique_i, epsilon), 0, alpha)``, where ``shared_i`` and
    ``unique_i`` count the model's contributing entries shared with others / unique to it
    in the tensor."""
    return merge("ramplus_tl", models, base=base, params={"r": r, "alpha": alpha, "epsilon": epsilon}, **options)


@overload
def arcee_fusion(
    base: Array,
    model: Array,
    *,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def arcee_fusion(
    base: PathLike,
    model: PathLike,
    *,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
def arcee_fusion(base: Model, model: Model, **options: Any):
    """Arcee Fusion: importance ``|model − base| · KL(softmax(model) ‖ softmax(base))`` (KL per
    row along the last dimension, probabilities + 1e-8); elements whose importance is at
    least ``median + 1.5·IQR`` take the model's value, the others keep the base.

    Departure: for tensors over 1,000,000 elements the quantiles come from 1,000,000
    samples drawn from the seeded RNG (``seed=``), so results are reproducible (mergekit's
    sample is unseeded)."""
    return merge("arcee_fusion", [model], base=base, params={}, **options)


@overload
def passthrough(
    model: Array,
    *,
    scale: Optional[float] = None,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def passthrough(
    model: PathLike,
    *,
    scale: Optional[float] = None,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
def passthrough(model: Model, *, scale: Optional[float] = None, **options: Any):
    """Passthrough: the single model copied exactly, or multiplied by ``scale``."""
    return merge("passthrough", [model], params={"scale": scale}, **options)
