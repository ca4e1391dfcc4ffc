"""TIES, DARE, breadcrumbs, DELLA and SCE: sparsify the task vectors, then merge.

Every function follows mergekit 0.1.5 exactly (same parameter names, defaults and order of
operations) unless a documented option asks for the paper's form. With ``Δ_i = θ_i − θ_base``:

1. each ``Δ_i`` is sparsified by the method (``density`` is the fraction kept; ``density >= 1``
   leaves ``Δ_i`` untouched, ``density <= 0`` removes it);
2. ``rescale`` (mergekit: L1) multiplies the survivors by ``‖Δ_i‖₁ / ‖sparsified Δ_i‖₁`` so the
   delta keeps its L1 norm (skipped when either norm is < 1e-7);
   ``rescale_mode="density"`` multiplies by ``1/density`` (the DARE paper) instead, and
   ``"l2"``/``"linf"`` match those norms. Giving ``rescale_mode`` turns rescaling on (with an
   explicit ``rescale=False`` it is an error); ``rescale=None`` means the method's default;
3. ``Δ_i ← w_i Δ_i`` (``weights`` default to 1 for every model; mergekit requires them);
4. the ``*ties`` methods and ``della`` elect, per element, the sign of ``Σ w_i Δ_i`` (a zero sum
   counts as positive) and keep only the entries with that sign (zeros never count);
   ``normalize`` then divides by the *weights* of the agreeing models (mergekit's weighted
   disjoint mean; the TIES paper divides by their *number*: ``disjoint_mean="count"``).
   Without sign election, ``normalize`` divides by ``Σ w_i``;
5. ``θ = θ_base + λ · mixed`` (``lam``).

``int8_mask`` (mergekit's storage type for the sign mask) is accepted and changes nothing.
Per-model values (``weights``, ``density``, ``gamma``, ``epsilon``) are a number for every model
or a list with one value per model. The random methods (DARE, DELLA) draw from a counter-based
generator keyed on (``seed``, tensor name, model index, element index): the same ``seed`` gives
byte-identical output whatever the thread count; array merges use the tensor name ``"array"``.
mergekit's own random draws (torch.bernoulli) cannot be reproduced, only their statistics.
Ties in magnitude at a trimming threshold are resolved by index (lowest index first in the
sort direction), so exactly the requested count survives; mergekit leaves that order to
``torch.argsort``.
"""
from __future__ import annotations

from typing import Any, Optional, overload, Sequence, SupportsFloat, Union, cast

import numbers

from .._folders import MergeResult
from ._dispatch import Array, Model, PathLike, as_list, merge

__all__ = [
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "sce",
]

PerModel = Union[float, Sequence[float], None]


def _per_model(x: PerModel):
    """A number for every model (any numeric scalar) or one value per model."""
    if x is None:
        return None
    if isinstance(x, numbers.Number) or getattr(x, "ndim", None) == 0:  # numpy-free for scalars
        return float(cast(SupportsFloat, x))  # a numbers.Number (mypy's float is not one) or a 0-d array
    return as_list(cast(Sequence[float], x))


def _gta(method, base, models, weights, lam, normalize, rescale, rescale_mode, int8_mask, extra, options):
    params = {
        "weight": _per_model(weights),
        "lambda": lam,
        "normalize": normalize,
        "rescale": rescale,
        "rescale_mode": rescale_mode,
        "int8_mask": int8_mask,
        **{k: (_per_model(v) if k in ("density", "gamma", "epsilon") else v) for k, v in extra.items()},
    }
    return merge(method, models, base=base, params=params, **options)


@overload
def ties(
    base: Array,
    models: Sequence[Array],
    weights: PerModel = None,
    density: PerModel = None,
    *,
    lam: float = 1.0,
    normalize: bool = True,
    rescale: Optional[bool] = None,
    rescale_mode: Optional[str] = None,
    disjoint_mean: Optional[str] = None,
    consensus: Optional[str] = None,
    int8_mask: bool = False,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def ties(
    base: PathLike,
    models: Sequence[PathLike],
    weights: PerModel = None,
    density: PerModel = None,
    *,
    lam: float = 1.0,
    normalize: bool = True,
    rescale: Optional[bool] = None,
    rescale_mode: Optional[str] = None,
    disjoint_mean: Optional[str] = None,
    consensus: Optional[str] = None,
    int8_mask: bool = False,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
def ties(
    base: Model,
    models: Sequence[Model],
    weights: PerModel = None,
    density: PerModel = None,
    *,
    lam: float = 1.0,
    normalize: bool = True,
    rescale: Optional[bool] = None,
    rescale_mode: Optional[str] = None,
    disjoint_mean: Optional[str] = None,
    consensus: Optional[str] = None,
    int8_mask: bool = False,
    **options: Any,
):
    """TIES-merging (Yadav et al. 2023), mergekit's ``ties``.

    Trim: keep the ``k = max(1, ⌊density·n⌋)`` entries of each ``Δ_i`` with the largest
    magnitude (density default 1: no trimming). Elect the sign of ``Σ w_i Δ_i``, keep the
    agreeing entries, and (``normalize=True``, the default) divide by the agreeing weights.
    ``rescale`` defaults to False. ``disjoint_mean="count"``: divide by the number of
    agreeing models (the paper's disjoint mean; mergekit divides by their weights).
    ``consensus="count"``: elect by the majority of signs instead of their weighted sum."""
    extra = {"density": density, "disjoint_mean": disjoint_mean, "consensus": consensus}
    return _gta("ties", base, models, weights, lam, normalize, rescale, rescale_mode, int8_mask, extra, options)


@overload
def dare_ties(
    base: Array,
    models: Sequence[Array],
    weights: PerModel = None,
    density: PerModel = None,
    *,
    lam: float = 1.0,
    normalize: bool = False,
    rescale: Optional[bool] = None,
    rescale_mode: Optional[str] = None,
    disjoint_mean: Optional[str] = None,
    consensus: Optional[str] = None,
    int8_mask: bool = False,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def dare_ties(
    base: PathLike,
    models: Sequence[PathLike],
    weights: PerModel = None,
    density: PerModel = None,
    *,
    lam: float = 1.0,
    normalize: bool = False,
    rescale: Optional[bool] = None,
    rescale_mode: Optional[str] = None,
    disjoint_mean: Optional[str] = None,
    consensus: Optional[str] = None,
    int8_mask: bool = False,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
def dare_ties(
    base: Model,
    models: Sequence[Model],
    weights: PerModel = None,
    density: PerModel = None,
    *,
    lam: float = 1.0,
    normalize: bool = False,
    rescale: Optional[bool] = None,
    rescale_mode: Optional[str] = None,
    disjoint_mean: Optional[str] = None,
    consensus: Optional[str] = None,
    int8_mask: bool = False,
    **options: Any,
):
    """DARE (Yu et al. 2024) with TIES sign election, mergekit's ``dare_ties``.

    Each entry of ``Δ_i`` survives with probability ``density`` (seeded, see the module doc).
    Rescale (on by default): mergekit 0.1.5 matches the L1 norm of the delta before dropping
    (``‖Δ‖₁/‖mask·Δ‖₁``), which is ``1/density`` only in expectation; the paper's exact
    ``1/density`` is ``rescale_mode="density"``. ``normalize`` defaults to False (mergekit)."""
    extra = {"density": density, "disjoint_mean": disjoint_mean, "consensus": consensus}
    return _gta("dare_ties", base, models, weights, lam, normalize, rescale, rescale_mode, int8_mask, extra, options)


@overload
def dare_linear(
    base: Array,
    models: Sequence[Array],
    weights: PerModel = None,
    density: PerModel = None,
    *,
    lam: float = 1.0,
    normalize: bool = False,
    rescale: Optional[bool] = None,
    rescale_mode: Optional[str] = None,
    int8_mask: bool = False,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def dare_linear(
    base: PathLike,
    models: Sequence[PathLike],
    weights: PerModel = None,
    density: PerModel = None,
    *,
    lam: float = 1.0,
    normalize: bool = False,
    rescale: Optional[bool] = None,
    rescale_mode: Optional[str] = None,
    int8_mask: bool = False,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
def dare_linear(
    base: Model,
    models: Sequence[Model],
    weights: PerModel = None,
    density: PerModel = None,
    *,
    lam: float = 1.0,
    normalize: bool = False,
    rescale: Optional[bool] = None,
    rescale_mode: Optional[str] = None,
    int8_mask: bool = False,
    **options: Any,
):
    """DARE without sign election, mergekit's ``dare_linear``: ``θ_base + λ Σ w_i DARE(Δ_i)``
    (divided by ``Σ w_i`` with ``normalize=True``). Rescale as in :func:`dare_ties`."""
    extra = {"density": density}
    return _gta("dare_linear", base, models, weights, lam, normalize, rescale, rescale_mode, int8_mask, extra, options)


@overload
def breadcrumbs(
    base: Array,
    models: Sequence[Array],
    weights: PerModel = None,
    density: PerModel = None,
    gamma: PerModel = None,
    *,
    lam: float = 1.0,
    normalize: bool = False,
    rescale: Optional[bool] = None,
    rescale_mode: Optional[str] = None,
    int8_mask: bool = False,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def breadcrumbs(
    base: PathLike,
    models: Sequence[PathLike],
    weights: PerModel = None,
    density: PerModel = None,
    gamma: PerModel = None,
    *,
    lam: float = 1.0,
    normalize: bool = False,
    rescale: Optional[bool] = None,
    rescale_mode: Optional[str] = None,
    int8_mask: bool = False,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
def breadcrumbs(
    base: Model,
    models: Sequence[Model],
    weights: PerModel = None,
    density: PerModel = None,
    gamma: PerModel = None,
    *,
    lam: float = 1.0,
    normalize: bool = False,
    rescale: Optional[bool] = None,
    rescale_mode: Optional[str] = None,
    int8_mask: bool = False,
    **options: Any,
):
    """Model Breadcrumbs (Davari & Belilovsky 2023), mergekit's ``breadcrumbs``.

    Per ``Δ_i`` of n entries ranked by magnitude: ``target = ⌊density·n⌋`` entries are kept,
    after removing the ``⌊gamma·n⌋`` largest (outliers, gamma default 0.01) and the smallest;
    when ``target + ⌊gamma·n⌋ > n`` fewer outliers are removed. No sign election; ``rescale``
    defaults to False. Older mergekit releases zeroed the whole delta when ``gamma·n < 1``
    (``n_top`` rounding to 0); here (as in mergekit 0.1.5) nothing is then removed from the top."""
    extra = {"density": density, "gamma": gamma}
    return _gta("breadcrumbs", base, models, weights, lam, normalize, rescale, rescale_mode, int8_mask, extra, options)


@overload
def breadcrumbs_ties(
    base: Array,
    models: Sequence[Array],
    weights: PerModel = None,
    density: PerModel = None,
    gamma: PerModel = None,
    *,
    lam: float = 1.0,
    normalize: bool = False,
    rescale: Optional[bool] = None,
    rescale_mode: Optional[str] = None,
    disjoint_mean: Optional[str] = None,
    consensus: Optional[str] = None,
    int8_mask: bool = False,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def breadcrumbs_ties(
    base: PathLike,
    models: Sequence[PathLike],
    weights: PerModel = None,
    density: PerModel = None,
    gamma: PerModel = None,
    *,
    lam: float = 1.0,
    normalize: bool = False,
    rescale: Optional[bool] = None,
    rescale_mode: Optional[str] = None,
    disjoint_mean: Optional[str] = None,
    consensus: Optional[str] = None,
    int8_mask: bool = False,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
def breadcrumbs_ties(
    base: Model,
    models: Sequence[Model],
    weights: PerModel = None,
    density: PerModel = None,
    gamma: PerModel = None,
    *,
    lam: float = 1.0,
    normalize: bool = False,
    rescale: Optional[bool] = None,
    rescale_mode: Optional[str] = None,
    disjoint_mean: Optional[str] = None,
    consensus: Optional[str] = None,
    int8_mask: bool = False,
    **options: Any,
):
    """Breadcrumbs sparsification (see :func:`breadcrumbs`) with TIES sign election,
    mergekit's ``breadcrumbs_ties`` (``normalize`` defaults to False, as in mergekit)."""
    extra = {"density": density, "gamma": gamma, "disjoint_mean": disjoint_mean, "consensus": consensus}
    return _gta("breadcrumbs_ties", base, models, weights, lam, normalize, rescale, rescale_mode, int8_mask, extra, options)


@overload
def della(
    base: Array,
    models: Sequence[Array],
    weights: PerModel = None,
    density: PerModel = None,
    epsilon: PerModel = None,
    *,
    lam: float = 1.0,
    normalize: bool = True,
    rescale: Optional[bool] = None,
    rescale_mode: Optional[str] = None,
    disjoint_mean: Optional[str] = None,
    consensus: Optional[str] = None,
    int8_mask: bool = False,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def della(
    base: PathLike,
    models: Sequence[PathLike],
    weights: PerModel = None,
    density: PerModel = None,
    epsilon: PerModel = None,
    *,
    lam: float = 1.0,
    normalize: bool = True,
    rescale: Optional[bool] = None,
    rescale_mode: Optional[str] = None,
    disjoint_mean: Optional[str] = None,
    consensus: Optional[str] = None,
    int8_mask: bool = False,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
def della(
    base: Model,
    models: Sequence[Model],
    weights: PerModel = None,
    density: PerModel = None,
    epsilon: PerModel = None,
    *,
    lam: float = 1.0,
    normalize: bool = True,
    rescale: Optional[bool] = None,
    rescale_mode: Optional[str] = None,
    disjoint_mean: Optional[str] = None,
    consensus: Optional[str] = None,
    int8_mask: bool = False,
    **options: Any,
):
    """DELLA (Deep et al. 2024) with sign election, mergekit's ``della``.

    MagPrune: within each row (last axis of a matrix; the whole tensor for vectors) entries are
    ranked by magnitude and kept with probability from ``density − epsilon`` (smallest) to
    ``density + epsilon`` (largest), linearly in rank (epsilon default 0.15; ``density ±
    epsilon`` must lie in (0, 1) when density < 1). Rescale (on by default) matches the L1 norm
    as mergekit does; ``rescale_mode="density"`` multiplies by ``1/density`` (the paper
    rescales each survivor by its own ``1/p``, which is not offered). ``normalize`` defaults
    to True. A row of one entry is kept with probability ``density``; tensors with more than
    two axes are ranked along their flattened trailing axes (mergekit: along axis 1)."""
    extra = {"density": density, "epsilon": epsilon, "disjoint_mean": disjoint_mean, "consensus": consensus}
    return _gta("della", base, models, weights, lam, normalize, rescale, rescale_mode, int8_mask, extra, options)


@overload
def della_linear(
    base: Array,
    models: Sequence[Array],
    weights: PerModel = None,
    density: PerModel = None,
    epsilon: PerModel = None,
    *,
    lam: float = 1.0,
    normalize: bool = False,
    rescale: Optional[bool] = None,
    rescale_mode: Optional[str] = None,
    int8_mask: bool = False,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def della_linear(
    base: PathLike,
    models: Sequence[PathLike],
    weights: PerModel = None,
    density: PerModel = None,
    epsilon: PerModel = None,
    *,
    lam: float = 1.0,
    normalize: bool = False,
    rescale: Optional[bool] = None,
    rescale_mode: Optional[str] = None,
    int8_mask: bool = False,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
def della_linear(
    base: Model,
    models: Sequence[Model],
    weights: PerModel = None,
    density: PerModel = None,
    epsilon: PerModel = None,
    *,
    lam: float = 1.0,
    normalize: bool = False,
    rescale: Optional[bool] = None,
    rescale_mode: Optional[str] = None,
    int8_mask: bool = False,
    **options: Any,
):
    """DELLA's MagPrune (see :func:`della`) without sign election, mergekit's
    ``della_linear`` (``normalize`` defaults to False)."""
    extra = {"density": density, "epsilon": epsilon}
    return _gta("della_linear", base, models, weights, lam, normalize, rescale, rescale_mode, int8_mask, extra, options)


@overload
def sce(
    base: Array,
    models: Sequence[Array],
    select_topk: float = 1.0,
    *,
    int8_mask: bool = False,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def sce(
    base: PathLike,
    models: Sequence[PathLike],
    select_topk: float = 1.0,
    *,
    int8_mask: bool = False,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
def sce(base: Model, models: Sequence[Model], select_topk: float = 1.0, *, int8_mask: bool = False, **options: Any):
    """SCE (Wan et al. 2024, FuseChat), mergekit's ``sce``: select the
    ``⌊nnz(var)·select_topk⌋`` elements with the largest variance of ``Δ_i`` across models
    (all when ``select_topk >= 1``), weight each model by its share of ``Σ_i mean(Δ_i²)``
    (uniform when that sum is < 1e-6), elect signs by ``Σ Δ_i``, and take the weighted mean of
    the agreeing entries. No per-model weights (as in mergekit)."""
    return merge("sce", models, base=base, params={"select_topk": select_topk, "int8_mask": int8_mask}, **options)
