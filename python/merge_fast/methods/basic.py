"""Linear, task arithmetic and slerp."""
from __future__ import annotations

from typing import Any, Optional, overload, Sequence

from .._folders import MergeResult
from ._dispatch import Array, Model, PathLike, as_list, merge

__all__ = ["linear", "task_arithmetic", "slerp"]


@overload
def linear(
    models: Sequence[Array],
    weights: Optional[Sequence[float]] = None,
    *,
    normalize: bool = True,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def linear(
    models: Sequence[PathLike],
    weights: Optional[Sequence[float]] = None,
    *,
    normalize: bool = True,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
def linear(models: Sequence[Model], weights: Optional[Sequence[float]] = None, *, normalize: bool = True, **options: Any):
    """Weighted average ``Σ w_i θ_i / Σ w_i`` (``normalize=False``: the plain weighted sum).
    Weights default to 1 for every model."""
    return merge("linear", models, params={"weight": as_list(weights), "normalize": normalize}, **options)


@overload
def task_arithmetic(
    base: Array,
    models: Sequence[Array],
    weights: Optional[Sequence[float]] = None,
    *,
    lam: float = 1.0,
    normalize: bool = False,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def task_arithmetic(
    base: PathLike,
    models: Sequence[PathLike],
    weights: Optional[Sequence[float]] = None,
    *,
    lam: float = 1.0,
    normalize: bool = False,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
def task_arithmetic(
    base: Model,
    models: Sequence[Model],
    weights: Optional[Sequence[float]] = None,
    *,
    lam: float = 1.0,
    normalize: bool = False,
    **options: Any,
):
    """Task arithmetic: ``θ_base + λ Σ w_i (θ_i − θ_base)``."""
    params = {"weight": as_list(weights), "lambda": lam, "normalize": normalize}
    return merge("task_arithmetic", models, base=base, params=params, **options)


@overload
def slerp(
    a: Array,
    b: Array,
    t: float,
    *,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def slerp(
    a: PathLike,
    b: PathLike,
    t: float,
    *,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
def slerp(a: Model, b: Model, t: float, **options: Any):
    """Spherical interpolation from ``a`` (t = 0, the base) to ``b`` (t = 1), mergekit's
    semantics; nearly colinear tensors (|cos| > 0.9995) and zero tensors are lerped."""
    return merge("slerp", [b], base=a, params={"t": t}, **options)
