"""SVD-based data-free merges: TSV-M (Gargiulo et al. 2025), Iso-C and Iso-CTS (Marczak et
al. 2025), with FusionBench's parameter names and defaults.

Each works on whole 2-D tensors with exact thin SVDs (f32, one tensor at a time, the same
result for any thread count); tensors that are not 2-D (norms, biases) get the mean task
vector ``θ_base + α · mean_i Δ_i``, as FusionBench does. ``Δ_i = θ_i − θ_base``,
``r = min(rows, cols)``, ``T`` = number of models.

Arrays in, array out; folders in with ``out=PATH``, folder out; the usual engine options
(``out``, ``dtype``, ``out_dtype``, ``threads``, ``max_shard_size``, ``progress``) as
keywords. In configs: ``merge_method: tsv_merge`` / ``iso_c`` / ``iso_cts`` with a
``base_model`` and the parameters below.
"""
from __future__ import annotations

from typing import Any, overload, Sequence, Union

from .._folders import MergeResult
from ._dispatch import Array, Model, PathLike, as_list, merge

__all__ = ["tsv_merge", "iso_c", "iso_cts"]


@overload
def tsv_merge(
    base: Array,
    models: Sequence[Array],
    *,
    alpha: Union[float, Sequence[float]] = 1.0,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def tsv_merge(
    base: PathLike,
    models: Sequence[PathLike],
    *,
    alpha: Union[float, Sequence[float]] = 1.0,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
def tsv_merge(base: Model, models: Sequence[Model], *, alpha: Union[float, Sequence[float]] = 1.0, **options: Any):
    """TSV-M: for each 2-D tensor, the top ``k = ⌊r/T⌋`` singular triplets of every ``Δ_i``
    are stacked (``U``: rows × Tk, ``s``, ``V``: cols × Tk); each stack is replaced by its
    polar factor (``P Qᵀ`` of its SVD ``P S Qᵀ``, i.e. orthogonal Procrustes), and
    ``θ = θ_base + alpha · U⊥ diag(s) V⊥ᵀ``. With more models than ``r`` (``k = 0``) the
    tensor keeps the base, as in FusionBench. ``alpha`` may also be one value per model:
    each ``Δ_i`` is scaled by ``alpha_i`` first (FusionBench's list form; a scalar equals
    the same value for every model, since TSV-M is homogeneous in the task vectors)."""
    a = alpha if isinstance(alpha, (int, float)) else as_list(alpha)
    return merge("tsv_merge", models, base=base, params={"alpha": a}, **options)


@overload
def iso_c(
    base: Array,
    models: Sequence[Array],
    *,
    scaling_factor: float = 1.0,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def iso_c(
    base: PathLike,
    models: Sequence[PathLike],
    *,
    scaling_factor: float = 1.0,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
def iso_c(base: Model, models: Sequence[Model], *, scaling_factor: float = 1.0, **options: Any):
    """Iso-C: ``U S Vᵀ = svd(Σ_i Δ_i)`` and ``θ = θ_base + scaling_factor · mean(S) · U Vᵀ``
    (the spectrum of the summed task matrix flattened to its mean, over all ``r``
    components)."""
    return merge("iso_c", models, base=base, params={"scaling_factor": scaling_factor}, **options)


@overload
def iso_cts(
    base: Array,
    models: Sequence[Array],
    *,
    scaling_factor: float = 1.0,
    common_space_fraction: float = 0.8,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def iso_cts(
    base: PathLike,
    models: Sequence[PathLike],
    *,
    scaling_factor: float = 1.0,
    common_space_fraction: float = 0.8,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
def iso_cts(
    base: Model,
    models: Sequence[Model],
    *,
    scaling_factor: float = 1.0,
    common_space_fraction: float = 0.8,
    **options: Any,
):
    """Iso-CTS: the ``c`` leading directions of ``svd(Σ_i Δ_i)`` (the common subspace ``U_c``)
    plus, per task, the ``k`` leading directions of ``Δ_i − U_c U_cᵀ Δ_i``, where
    ``k = round((r − ⌊r · common_space_fraction⌋) / T)`` (half to even, as Python's round;
    lowered by one if it would overfill) and ``c = r − T·k``. The ``r`` gathered left and
    right vectors are each orthogonalised by their polar factor and the spectrum set to the
    mean ``s̄`` of the ``r`` gathered singular values:
    ``θ = θ_base + scaling_factor · s̄ · U⊥ V⊥ᵀ``."""
    params = {"scaling_factor": scaling_factor, "common_space_fraction": common_space_fraction}
    return merge("iso_cts", models, base=base, params=params, **options)
