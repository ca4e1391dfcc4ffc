"""Fisher-weighted averaging, Fisher-dampened deltas and RegMean.

Fishers are diagonal (one value per weight), stored as safetensors with the model's own
tensor names: :func:`merge_fast.torch.estimate_fisher` and ``merge-fast fisher`` write them.
RegMean's Gram matrices (``[in, in]`` per linear weight, under the weight's name) come from
:func:`merge_fast.torch.estimate_gram` and ``merge-fast gram``.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, overload, Sequence, Union, cast

from .._errors import TensorMismatch, config_error
from .._folders import MergeResult
from .. import plan as _plan
from ..distributed import with_executor
from ..plan import TensorPlan, open_checkpoint
from ._dispatch import Array, Model, PathLike, _is_path, as_list, merge

__all__ = ["fisher_weighted", "fisher_dampened", "regmean", "layer_importance", "layer_of"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_of(name: str) -> Optional[int]:
    """The layer index in a tensor name (``model.layers.7.mlp...`` -> 7), or None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def layer_importance(fisher: PathLike, names: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """F̂_layer for every tensor: each layer's mean Fisher (over all its tensors' entries),
    min-max normalized across layers. A tensor outside numbered layers gets its own mean
    Fisher on the same scale, clipped to [0, 1]. With a single layer (or equal means) every
    value is 0: nothing to rank, so nothing is dampened at the layer level."""
    ck = open_checkpoint(fisher)
    names = list(names) if names is not None else ck.names()
    sizes = {n: math.prod(shape) for n, _, shape in ck.tensors()}
    sums: Dict[Optional[int], List[float]] = {}
    tensor_mean: Dict[str, float] = {}
    for n in names:
        total = ck.sum(n)  # float64, in parallel; a missing tensor raises naming it and the file
        size = sizes[n]
        tensor_mean[n] = total / size if size else 0.0
        acc = sums.setdefault(layer_of(n), [0.0, 0.0])
        acc[0] += total
        acc[1] += size
    layer_mean = {k: s / max(c, 1) for k, (s, c) in sums.items() if k is not None}
    if not layer_mean:
        return {n: 0.0 for n in names}
    lo, hi = min(layer_mean.values()), max(layer_mean.values())
    span = hi - lo

    def norm(v: float) -> float:
        return 0.0 if span <= 0 else float(min(max((v - lo) / span, 0.0), 1.0))

    return {n: norm(layer_mean[li] if (li := layer_of(n)) is not None else tensor_mean[n]) for n in names}


@overload
def fisher_weighted(
    models: Sequence[Array],
    fishers: Sequence[Array],
    weights: Optional[Sequence[float]] = None,
    *,
    epsilon: float = 1e-08,
    fisher_normalize: str = 'none',
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def fisher_weighted(
    models: Sequence[PathLike],
    fishers: Sequence[PathLike],
    weights: Optional[Sequence[float]] = None,
    *,
    epsilon: float = 1e-08,
    fisher_normalize: str = 'none',
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
@with_executor
def fisher_weighted(
    models: Sequence[Model],
    fishers: Sequence[Model],
    weights: Optional[Sequence[float]] = None,
    *,
    epsilon: float = 1e-8,
    fisher_normalize: str = "none",
    **options: Any,
):
    """Fisher-weighted average (Matena & Raffel 2022): ``Σ λ_i (F_i+ε) θ_i / Σ λ_i (F_i+ε)``.

    ``fishers[i]`` is the diagonal Fisher of ``models[i]``: an array of the same shape, or a
    safetensors file/folder with the same tensor names. ``weights`` are the λ_i.
    ``fisher_normalize="mean"`` divides each F_i by its mean over the tensor first.
    """
    if len(fishers) != len(models):
        raise config_error(f"{len(models)} models but {len(fishers)} Fishers")
    params = {"weight": as_list(weights), "epsilon": epsilon, "fisher_normalize": fisher_normalize}
    if not all(_is_path(m) for m in list(models) + list(fishers)):
        return merge("fisher_weighted", list(models) + list(fishers), params=params, **options)
    return _fisher_folders("fisher_weighted", None, cast(List[PathLike], list(models)), cast(List[PathLike], list(fishers)),
                           params, **options)


@overload
def fisher_dampened(
    base: Array,
    models: Sequence[Array],
    fisher: Array,
    *,
    scale: float = 1.0,
    weights: Optional[Sequence[float]] = None,
    normalization: str = 'log',
    layer_importance: Optional[float] = None,
    out: None = None,
    **options: Any,
) -> Array: ...
@overload
def fisher_dampened(
    base: PathLike,
    models: Sequence[PathLike],
    fisher: PathLike,
    *,
    scale: float = 1.0,
    weights: Optional[Sequence[float]] = None,
    normalization: str = 'log',
    layer_importance: Optional[float] = None,
    out: PathLike,
    **options: Any,
) -> MergeResult: ...
@with_executor
def fisher_dampened(
    base: Model,
    models: Sequence[Model],
    fisher: Model,
    *,
    scale: float = 1.0,
    weights: Optional[Sequence[float]] = None,
    normalization: str = "log",
    layer_importance: Optional[float] = None,
    **options: Any,
):
    """Fisher-dampened delta: ``θ_IT + s · (1 − F̂_param) · (1 − F̂_layer) · Δ_avg``.

    ``base`` is θ_IT, ``Δ_avg`` the (weighted) average of ``models[i] − base`` and
    ``fisher`` the Fisher of θ_IT. On folders a model may be ``folder+adapter`` (a PEFT
    LoRA): ``f"{it}+{adapter}"`` makes that delta ``B·A·α/r``, streamed chunk by chunk. F̂_param normalizes the Fisher within each tensor
    (``normalization``: "log" (default; min-max of ln F, robust to the many orders of
    magnitude raw Fishers span), "minmax" or "rank"). On folders F̂_layer comes from
    :func:`layer_importance`; on arrays pass ``layer_importance`` (default 0).
    """
    params = {"weight": as_list(weights), "scale": scale, "normalization": normalization}
    if not all(_is_path(m) for m in [base, fisher, *models]):
        params["layer_importance"] = layer_importance or 0.0
        return merge("fisher_dampened", list(models) + [fisher], base=base, params=params, **options)
    if layer_importance is not None:
        raise config_error("layer_importance is computed from the Fisher on folder merges")
    return _fisher_folders("fisher_dampened", cast(PathLike, base), cast(List[PathLike], list(models)), [cast(PathLike, fisher)],
                           params, **options)


@with_executor
def regmean(
    models: Sequence[Model],
    grams: Sequence[Model],
    weights: Optional[Sequence[float]] = None,
    *,
    reduce_non_diagonal_ratio: Optional[float] = None,
    alpha: Optional[float] = None,
    ridge: float = 1e-6,
    fan_in_fan_out: bool = False,
    **options: Any,
):
    """RegMean (Jin et al. 2023): per linear weight ``W_i`` (``[out, in]``) with the Gram
    matrix ``G_i = X_iᵀX_i`` (``[in, in]``) of its inputs on task i's data,

        ``W* = (Σ_i w_i W_i G̃_i)(Σ_i w_i G̃_i)⁻¹``,  ``G̃_i = α G_i + (1 − α) diag(G_i)``,

    solved in Rust (float64 Cholesky with a ridge ``λ = ridge · mean(diag Σ w_i G̃_i)`` that
    pulls directions no data excites toward the weighted mean). ``α`` is
    ``reduce_non_diagonal_ratio`` (FusionBench's name; ``alpha`` is accepted as the paper's
    symbol), default 0.9. ``weights`` are the ``w_i`` (default 1).

    Arrays: ``models`` are 2-D weights and ``grams`` their ``[in, in]`` Grams
    (``fan_in_fan_out=True`` for weights stored ``[in, out]``). Folders: ``grams[i]`` is a
    safetensors file from :func:`merge_fast.torch.estimate_gram` (keys = weight names). Every
    tensor with a Gram in every file is merged by RegMean (``Conv1D`` weights, listed in the
    files' ``fan_in_fan_out`` metadata, the right way round); every other tensor (biases,
    norms, embeddings, a tied ``lm_head``) gets the weighted average ``Σ w_i θ_i / Σ w_i``
    (the plain mean without ``weights``). A Gram present in some files but not all, or one
    naming a tensor the model lacks, is an error naming the file.
    """
    if len(grams) != len(models):
        raise config_error(f"{len(models)} models but {len(grams)} Gram files/arrays")
    if alpha is not None and reduce_non_diagonal_ratio is not None and float(alpha) != float(reduce_non_diagonal_ratio):
        raise config_error("regmean: give reduce_non_diagonal_ratio or its alias alpha, not both")
    ratio = float(reduce_non_diagonal_ratio if reduce_non_diagonal_ratio is not None else alpha if alpha is not None else 0.9)
    params = {"weight": as_list(weights), "reduce_non_diagonal_ratio": ratio, "ridge": ridge}
    if not all(_is_path(m) for m in list(models) + list(grams)):
        if any(_is_path(m) for m in list(models) + list(grams)):
            raise config_error("pass either all arrays/tensors or all paths, not a mix")
        return _regmean_arrays(list(models), list(grams), dict(params, fan_in_fan_out=bool(fan_in_fan_out)), **options)
    if fan_in_fan_out:
        raise config_error("fan_in_fan_out comes from the Gram files on folder merges")
    return _fisher_folders("regmean", None, cast(List[PathLike], list(models)), cast(List[PathLike], list(grams)), params, **options)


def _regmean_arrays(models: List[Any], grams: List[Any], params: Dict[str, Any], *, seed: int = 0,
                    threads: Optional[int] = None, out: Any = None, **rest: Any):
    from .._arrays import merge_arrays

    if out is not None:
        raise config_error("out= is for folder merges; array merges return the result")
    if rest:
        raise config_error(f"unknown option(s) for an array merge: {', '.join(sorted(rest))}")
    for i, (m, g) in enumerate(zip(models, grams)):
        ms, gs = tuple(m.shape), tuple(g.shape)
        d = (ms[0] if params.get("fan_in_fan_out") else ms[1]) if len(ms) == 2 else None
        if d is None or gs != (d, d):
            raise TensorMismatch(f"tensor mismatch for 'array': regmean needs 2-D weights and [in, in] Grams; model #{i} "
                                 f"has shape {ms} and its Gram {gs}" + (f" (expected ({d}, {d}))" if d else ""))
    return merge_arrays("regmean", None, models, {k: v for k, v in params.items() if v is not None},
                        seed=seed, threads=threads, aux=grams)


def _gram_plan(grams: List[str], gram_ckpts: List[Any], names: Sequence[str], shapes: Dict[str, tuple]) -> Dict[str, bool]:
    """Tensor name -> fan_in_fan_out for every tensor RegMean merges, after checking the files:
    each Gram names a tensor of the model, is square and matches the weight, and every file
    covers the same tensors."""
    known = set(names)
    per_file = []
    fifo: Dict[str, bool] = {}
    for path, ck in zip(grams, gram_ckpts):
        import json as _json

        meta = ck.metadata()
        try:
            conv = set(_json.loads(meta.get("fan_in_fan_out", "[]")))
        except ValueError:
            raise config_error(f"Gram file {path}: metadata 'fan_in_fan_out' is not a JSON list") from None
        have = {}
        for n, _, shape in ck.tensors():
            if n not in known:
                raise TensorMismatch(f"tensor mismatch for '{n}': Gram file {path} has a Gram for a tensor the models "
                                     f"do not have (Grams are keyed by the weight's checkpoint name)")
            ws = shapes[n]
            d = (ws[0] if n in conv else ws[1]) if len(ws) == 2 else None
            if d is None or tuple(shape) != (d, d):
                how = "stored [in, out]" if n in conv else "[out, in]"
                raise TensorMismatch(f"tensor mismatch for '{n}': Gram in {path} has shape {list(shape)}, but the "
                                     f"weight {how} has shape {list(ws)}: a Gram must be [in, in]"
                                     + (f" = [{d}, {d}]" if d else ""))
            have[n] = n in conv
        per_file.append(have)
    first = per_file[0]
    for path, have in zip(grams, per_file):
        diff = sorted(set(first) ^ set(have))
        if diff:
            where = grams[0] if diff[0] in first else path
            raise TensorMismatch(f"tensor mismatch for '{diff[0]}': {len(diff)} tensor(s) have a Gram in some files "
                                 f"but not in others (e.g. only in {where}); estimate every model's Grams on the same layers")
        for n, c in have.items():
            if c != first[n]:
                raise TensorMismatch(f"tensor mismatch for '{n}': Gram files {grams[0]} and {path} disagree on its "
                                     f"orientation (fan_in_fan_out)")
    fifo.update(first)
    if not fifo:
        raise TensorMismatch(f"tensor mismatch: the Gram files ({grams[0]}, ...) hold no tensor of the models")
    return fifo


def _fisher_folders(
    method: str,
    base: Optional[PathLike],
    models: Sequence[PathLike],
    fishers: Sequence[PathLike],
    params: Dict[str, Any],
    *,
    out: Optional[Union[str, Path]] = None,
    dtype: str = "float32",
    out_dtype: Optional[str] = None,
    seed: int = 0,
    cache_dir: Optional[Union[str, Path]] = None,
    **run_options: Any,
) -> MergeResult:
    from ..hub import resolve_paths
    from ..lora import read_adapter

    if out is None:
        raise config_error("folder merges need out=PATH")
    code = _plan.out_dtype_code(dtype, out_dtype)
    # Local folders for hub ids, `model+adapter` (mergekit's form) split; Fishers are files
    # (a local path or ORG/REPO/FILE on the hub).
    progress = run_options.get("progress") is True
    refs, hub_inputs = resolve_paths(([base] if base is not None else []) + list(models), cache_dir=cache_dir,
                                     progress=progress)
    fisher_refs, hub_fishers = resolve_paths(fishers, cache_dir=cache_dir, progress=progress, kind="file")
    fishers = [f for f, _ in fisher_refs]
    hub_inputs += hub_fishers
    protected = [r for ref in refs for r in ref if r is not None] + [str(f) for f in fishers]
    _plan.check_output(out, protected, overwrite=run_options.get("overwrite", False))
    input_of = _plan.Inputs()  # one input per distinct folder or adapter, in first-seen order
    ckpts = {}
    for path, _ in refs:
        if path not in ckpts:
            ckpts[path] = open_checkpoint(path)
            input_of(path)
    names = ckpts[refs[0][0]].names()
    for path, c in ckpts.items():
        _plan.require_tensors(names, c, path)
    shapes = {n: tuple(s) for n, _, s in ckpts[refs[0][0]].tensors()}
    # Each model's source per tensor: the stored tensor, or base + B·A·scale for a LoRA.
    per_model = []
    for path, adapter in refs:
        by_name: Dict[str, _plan.Source] = {n: _plan.tensor(input_of(path), n) for n in names}
        if adapter is not None:
            ad = read_adapter(adapter, shapes)
            by_name.update(ad.sources(input_of(path), input_of(str(ad.file))))
        per_model.append(by_name)
    fisher_ckpts = [open_checkpoint(f) for f in fishers]
    if method == "regmean":
        regmean_of = _gram_plan([str(f) for f in fishers], fisher_ckpts, names, shapes)
    else:
        regmean_of = {}
        for f, fc in zip(fishers, fisher_ckpts):
            _plan.require_tensors(names, fc, f, what="have no Fisher in",
                                  hint=" (estimate the Fisher for every merged parameter)")
    fisher_inputs = [input_of(str(f)) for f in fishers]
    importance = layer_importance(fishers[0], names) if method == "fisher_dampened" else {}
    plans = []
    for name in names:
        srcs = [pm[name] for pm in per_model] + [_plan.tensor(i, name) for i in fisher_inputs]
        p = {k: v for k, v in params.items() if v is not None}
        if method == "regmean":
            if name in regmean_of:
                p["fan_in_fan_out"] = regmean_of[name]
                plans.append(TensorPlan(name, method, p, None, srcs, code))
            else:  # no Gram (bias, norm, embedding): the (weighted) average
                lin = {"weight": p["weight"]} if "weight" in p else {}
                plans.append(TensorPlan(name, "linear", lin, None, srcs[:len(per_model)], code))
            continue
        if method == "fisher_dampened":
            p["layer_importance"] = importance[name]
            plans.append(TensorPlan(name, method, p, srcs[0], srcs[1:], code))
        else:
            plans.append(TensorPlan(name, method, p, None, srcs, code))  # models, then Fishers
    recipe: Dict[str, Any] = {"method": method, "base_model": os.fspath(base) if base is not None else None,
              "models": [os.fspath(m) for m in models], ("grams" if method == "regmean" else "fishers"): [str(f) for f in fishers],
              "parameters": params}
    if hub_inputs:
        recipe["hub_inputs"] = [h.to_json() for h in hub_inputs]
    return _plan.execute(input_of.paths, plans, out, recipe=recipe, side_files_from=refs[0][0], out_dtype=code, seed=seed,
                   inputs=protected, **run_options)
