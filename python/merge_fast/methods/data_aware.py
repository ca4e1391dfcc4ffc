"""Fisher-weighted averaging and Fisher-dampened deltas.

Fishers are diagonal (one value per weight), stored as safetensors with the model's own
tensor names: :func:`merge_fast.torch.estimate_fisher` and ``merge-fast fisher`` write them.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional, overload, Sequence, Union

from .._errors import config_error
from .._folders import MergeResult
from .. import plan as _plan
from ..plan import TensorPlan, open_checkpoint
from ._dispatch import Array, Model, PathLike, _is_path, as_list, merge

__all__ = ["fisher_weighted", "fisher_dampened", "layer_importance", "layer_of"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_of(name: str) -> Optional[int]:
    """The layer index in a tensor name (``model.layers.7.mlp...`` -> 7), or None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def layer_importance(fisher: Union[str, Path], names: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """F̂_layer for every tensor: each layer's mean Fisher (over all its tensors' entries),
    min-max normalized across layers. A tensor outside numbered layers gets its own mean
    Fisher on the same scale, clipped to [0, 1]. With a single layer (or equal means) every
    value is 0: nothing to rank, so nothing is dampened at the layer level."""
    import numpy as np  # lazily: `import merge_fast` stays numpy-free

    ck = open_checkpoint(fisher)
    names = list(names) if names is not None else ck.names()
    sums: Dict[Optional[int], List[float]] = {}
    tensor_mean: Dict[str, float] = {}
    for n in names:
        f = ck.read_f32(n).astype(np.float64)
        tensor_mean[n] = float(f.mean()) if f.size else 0.0
        acc = sums.setdefault(layer_of(n), [0.0, 0.0])
        acc[0] += float(f.sum())
        acc[1] += f.size
    layer_mean = {k: s / max(c, 1) for k, (s, c) in sums.items() if k is not None}
    if not layer_mean:
        return {n: 0.0 for n in names}
    lo, hi = min(layer_mean.values()), max(layer_mean.values())
    span = hi - lo

    def norm(v: float) -> float:
        return 0.0 if span <= 0 else float(min(max((v - lo) / span, 0.0), 1.0))

    return {n: norm(layer_mean[layer_of(n)] if layer_of(n) is not None else tensor_mean[n]) for n in names}


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
    return _fisher_folders("fisher_weighted", None, list(models), list(fishers), params, **options)


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
    return _fisher_folders("fisher_dampened", base, list(models), [fisher], params, **options)


def _fisher_folders(
    method: str,
    base: Optional[Model],
    models: List[Model],
    fishers: List[Model],
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
    for f, fc in zip(fishers, fisher_ckpts):
        _plan.require_tensors(names, fc, f, what="have no Fisher in", hint=" (estimate the Fisher for every merged parameter)")
    fisher_inputs = [input_of(str(f)) for f in fishers]
    importance = layer_importance(fishers[0], names) if method == "fisher_dampened" else {}
    plans = []
    for name in names:
        srcs = [pm[name] for pm in per_model] + [_plan.tensor(i, name) for i in fisher_inputs]
        p = {k: v for k, v in params.items() if v is not None}
        if method == "fisher_dampened":
            p["layer_importance"] = importance[name]
            plans.append(TensorPlan(name, method, p, srcs[0], srcs[1:], code))
        else:
            plans.append(TensorPlan(name, method, p, None, srcs, code))  # models, then Fishers
    recipe = {"method": method, "base_model": str(base) if base is not None else None,
              "models": [str(m) for m in models], "fishers": [str(f) for f in fishers], "parameters": params}
    if hub_inputs:
        recipe["hub_inputs"] = [h.to_json() for h in hub_inputs]
    return _plan.execute(input_of.paths, plans, out, recipe=recipe, side_files_from=refs[0][0], out_dtype=code, seed=seed,
                   inputs=protected, **run_options)
