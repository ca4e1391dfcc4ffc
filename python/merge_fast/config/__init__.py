"""mergekit-compatible YAML configs.

>>> import merge_fast as mf
>>> mf.run("merge.yml", out="merged")                 # or a dict, or YAML text
>>> plan = mf.config.plan("merge.yml")                # validate and plan only; writes nothing

Supported schema (mergekit's): ``merge_method``, ``base_model``, ``models`` (each
``model`` + ``parameters``) or ``slices`` (each ``sources`` with ``model``,
``layer_range`` and ``parameters``; ``base_model`` and ``parameters`` per slice),
``parameters`` (scalars, gradients, ``{filter, value}`` lists; merge_fast also takes
``{regex, value}``), ``dtype``, ``out_dtype``, ``tokenizer_source`` (``base``, ``union`` or
a model; embedding rows are permuted per model, see tokenizer.py), ``tokenizer: {source,
tokens}``, ``chat_template`` and model references of the form
``path``, ``path+lora_adapter`` or ``{model: path, lora: adapter, override_architecture: Cls}``
(the model's config is read, and for the base or first model written, with
``architectures: [Cls]``).
``modules`` (per-module models/slices/parameters, see modules.py) and multi-stage files
(several YAML documents with ``name``, as mergekit-multi writes them; see stages.py).
Every check (method, parameters, layer ranges, shapes, folders) runs before anything is
written; all problems of a config come in one :class:`merge_fast.ConfigError`, each naming
its key and line. Keys mergekit ignores are :class:`merge_fast.MergeWarning` warnings
(``strict=True`` refuses them).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .._errors import ConfigError, MergeWarning
from .._folders import MergeResult, ProgressArg
from ..distributed import with_executor
from .._output import check_threads, parse_size
from .. import plan as _plan
from . import output as _output
from ._source import load as _load, load_all as _load_all
from .methods import MERGEKIT_METHODS
from .planner import Plan, Planner
from .schema import MergeConfig, parse as _parse

ConfigLike = Union[str, Path, Dict[str, Any]]

__all__ = ["run", "plan", "load", "parse_shard_size", "MergeConfig", "Plan", "MERGEKIT_METHODS"]


def load(config: ConfigLike, *, strict: bool = False) -> MergeConfig:
    """Parses and checks the structure of a config (no model is opened). Keys mergekit
    ignores are :class:`merge_fast.MergeWarning` warnings, or errors with `strict`; every
    problem is reported in one :class:`merge_fast.ConfigError`."""
    return _parse(_load(config), strict=strict)


def parse_shard_size(size: Union[int, str]) -> int:
    """Deprecated name of :func:`merge_fast._output.parse_size` (``max_shard_size`` forms:
    mergekit's ``5B``, ``500M``, ``1000K`` and ``5GB``, ``500MB``, ``1GiB``, an int)."""
    return parse_size(size)


def plan(config: Union[ConfigLike, MergeConfig], *, allow_crimes: bool = False, strict: bool = False,
         cache_dir: Optional[Union[str, Path]] = None) -> Plan:
    """Validates `config` against the model folders and returns the tensor plan (hub
    references are downloaded into the cache first, see :mod:`merge_fast.hub`)."""
    cfg = config if isinstance(config, MergeConfig) else load(config, strict=strict)
    cfg, _ = _resolve_refs(cfg, cache_dir, False)
    return Planner(cfg, allow_crimes=allow_crimes).plan()


def _resolve_refs(cfg: MergeConfig, cache_dir, progress) -> tuple:
    """Local folders for every model reference (hub downloads, .bin conversions), before
    anything is written; also the pinned hub inputs for the card and the recipe."""
    from ..hub import resolve_config
    from .schema import ModelRef

    return resolve_config(cfg, ModelRef, cache_dir=cache_dir, progress=bool(progress) and not callable(progress))


@with_executor
def run(
    config: Union[ConfigLike, MergeConfig],
    out: Union[str, Path],
    *,
    max_shard_size: Union[int, str] = "5GB",
    copy_tokenizer: bool = True,
    allow_crimes: bool = False,
    random_seed: Optional[int] = None,
    write_model_card: bool = True,
    threads: Optional[int] = None,
    progress: ProgressArg = False,
    lazy_unpickle: bool = False,
    low_cpu_memory: bool = False,
    cuda: bool = False,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    cache_dir: Optional[Union[str, Path]] = None,
    strict: bool = False,
    stage: Optional[str] = None,
    fsync: bool = True,
    executor: str = "local",
    ray_address: Optional[str] = None,
    out_shard_size: Optional[Union[int, str]] = None,
) -> MergeResult:
    """Runs a mergekit-style config into `out` (written atomically, fsynced before the
    final rename unless ``fsync=False``). An existing non-empty `out` is replaced only with
    ``overwrite`` and only if it holds a previous merge output. ``executor="ray"`` runs the
    merge as Ray tasks (``ray_address`` as ``ray.init``'s; see :mod:`merge_fast.distributed`);
    the output is byte-identical.

    ``lazy_unpickle`` and ``low_cpu_memory`` are accepted for mergekit compatibility and do
    nothing (inputs are always memory-mapped and streamed). ``cuda`` prints a notice:
    merge_fast computes on the CPU. Hub references go to ``cache_dir`` (default: the
    standard Hugging Face cache). ``max_shard_size``: the largest output shard (an int,
    ``"5GB"``, ``"500MB"``, ``"1GiB"`` or mergekit's ``"5B"``); ``out_shard_size`` is its
    deprecated name (mergekit's)."""
    if out_shard_size is not None:
        warnings.warn("merge_fast.run: out_shard_size is deprecated; use max_shard_size", DeprecationWarning,
                      stacklevel=3)
        max_shard_size = out_shard_size
    if cuda:
        print("merge-fast: --cuda ignored: merge_fast computes on the CPU (streamed, multi-threaded)", file=sys.stderr)
    del lazy_unpickle, low_cpu_memory, trust_remote_code
    if isinstance(config, MergeConfig):
        cfg = config
    else:
        srcs = _load_all(config)
        if len(srcs) > 1 or stage is not None:
            from .stages import run_stages

            _plan.check_output(out, [], overwrite=overwrite)  # the final output, before any stage runs
            opts = dict(max_shard_size=max_shard_size, copy_tokenizer=copy_tokenizer, allow_crimes=allow_crimes,
                        random_seed=random_seed, write_model_card=write_model_card, threads=threads,
                        progress=progress, strict=strict, overwrite=overwrite, cache_dir=cache_dir, fsync=fsync)
            return run_stages(srcs, Path(out), stage, run, opts)
        cfg = _parse(srcs[0], strict=strict)
    _plan.check_output(out, _inputs(cfg), overwrite=overwrite)
    threads = check_threads(threads)
    shard = _plan.shard_size(max_shard_size, "max_shard_size")
    cfg, hub_inputs = _resolve_refs(cfg, cache_dir, progress)
    hub_inputs = list(dict.fromkeys([*cfg.earlier_hub_inputs, *hub_inputs]))
    if cfg.merge_method in _RECIPES:
        return _run_recipe(cfg, Path(out), shard=shard, threads=threads, progress=progress,
                           seed=random_seed or 0, write_model_card=write_model_card, overwrite=overwrite,
                           hub_inputs=hub_inputs, cache_dir=cache_dir, fsync=fsync)
    inputs = _inputs(cfg)  # the local folders the references resolved to
    _plan.check_output(out, inputs, overwrite=overwrite)
    p = Planner(cfg, allow_crimes=allow_crimes).plan()
    chat_template = _output.resolve_chat_template(cfg, cfg.src.error)
    out = Path(out)
    text = _output.config_text(cfg)
    vp = p.vocab
    # As mergekit: a tokenizer the config asks for (tokenizer_source / tokenizer) is always
    # written; --no-copy-tokenizer only stops the plain copy from the base, and a bare
    # chat_template then has no tokenizer to go with (mergekit warns and skips it too).
    if vp is not None:
        tok_folder, builder = vp.tokenizer_folder, vp.builder
    elif copy_tokenizer:
        tok_folder, builder = _output.model_folder(p.donor.ref), None
    else:
        tok_folder = builder = None
        if chat_template:
            warnings.warn("merge-fast: chat_template is set but --no-copy-tokenizer leaves the output without a "
                          "tokenizer; the chat template is not written (as mergekit)", MergeWarning, stacklevel=2)

    def extra(tmp: Path) -> None:
        _output.fix_config_json(tmp, p, cfg, vp.size if vp is not None else None)
        _output.write_tokenizer(tmp, tok_folder, chat_template, builder)
        if write_model_card:
            (tmp / "README.md").write_text(_output.model_card(cfg, text, out.name, p.method, hub_inputs),
                                           encoding="utf-8")
            (tmp / "mergekit_config.yml").write_text(text, encoding="utf-8")

    recipe = {
        "merge_fast_version": __import__("merge_fast")._core.__version__,
        "method": cfg.merge_method,
        "config": text,
    }
    if hub_inputs:
        recipe["hub_inputs"] = [h.to_json() for h in hub_inputs]
    try:
        return _execute(p, out, recipe, shard, threads, progress, random_seed, extra, overwrite, inputs, fsync)
    except ConfigError as e:
        raise _with_location(cfg, e) from None


def _inputs(cfg: MergeConfig) -> List[Union[str, Path]]:
    """Every path a config reads: models, adapters, tokenizer source, Fisher and Gram files."""
    paths: List[Union[str, Path]] = [p for m in cfg.referenced_models() for p in (m.path, m.lora) if p]
    for params in [cfg.parameters or {}] + [s.parameters or {} for s in cfg.models or []]:
        for key in ("fisher", "gram"):
            f = params.get(key) if isinstance(params, dict) else None
            if isinstance(f, (str, Path)):
                paths.append(f)
    return paths


# merge_fast's own methods whose inputs go beyond models (Fisher files, donors of other
# families): `models` only (no slices); allowed parameters (model-level, global-level).
_RECIPES = {
    "fisher_weighted": ({"weight", "fisher"}, {"epsilon", "fisher_normalize"}),
    "fisher_dampened": ({"weight"}, {"fisher", "scale", "normalization"}),
    "regmean": ({"weight", "gram"}, {"reduce_non_diagonal_ratio", "alpha", "ridge"}),
    "procrustes_absorb": ({"weight"}, {"beta", "attn_rank", "mlp_rank", "embed_rank", "attn_tol", "mlp_tol",
                                       "embed_tol", "include_embeddings", "strict", "oversample", "power_iters",
                                       "alignment", "cross_attention"}),
}


def _run_recipe(cfg: MergeConfig, out: Path, *, shard: int, threads, progress, seed: int,
                write_model_card: bool, overwrite: bool, hub_inputs=(), cache_dir=None, fsync: bool = True) -> Any:
    """Runs fisher_weighted, fisher_dampened, regmean or procrustes_absorb from a config:

    - fisher_weighted: ``models: [{model, parameters: {fisher: PATH, weight}}]``, global
      ``epsilon``, ``fisher_normalize``;
    - regmean: ``models: [{model, parameters: {gram: PATH, weight}}]``, global
      ``reduce_non_diagonal_ratio`` (alias ``alpha``), ``ridge``;
    - fisher_dampened: ``base_model`` (θ_IT), ``models`` (fine-tunes or ``base+adapter``
      LoRAs; their deltas are averaged, ``weight`` per model), global ``fisher: PATH``,
      ``scale``, ``normalization``;
    - procrustes_absorb: ``base_model`` is the anchor, ``models`` the donors (any family),
      global parameters as in :func:`merge_fast.procrustes_absorb`.
    """
    from ..methods.data_aware import fisher_dampened, fisher_weighted, regmean

    method, err = cfg.merge_method, cfg.src.error
    model_keys, global_keys = _RECIPES[method]
    if cfg.slices or not cfg.models:
        raise err(("merge_method",), f"{method} takes `models`, not `slices`")
    glob = dict(cfg.parameters or {})
    for k in glob:
        if k not in global_keys:
            raise err(("parameters", k), f"unknown parameter '{k}' for {method} (allowed: {', '.join(sorted(global_keys))})")
    per_model = []
    for s in cfg.models:
        p = dict(s.parameters or {})
        for k in p:
            if k not in model_keys:
                raise err(tuple(s.path) + ("parameters", k), f"unknown model parameter '{k}' for {method}")
        per_model.append(p)

    def ref(r) -> str:
        return r.path + (f"+{r.lora}" if r.lora else "")

    base = ref(cfg.base_model) if cfg.base_model is not None else None
    pairs = [(ref(s.model), p) for s, p in zip(cfg.models, per_model) if ref(s.model) != base]
    models = [m for m, _ in pairs]
    weights = [float(p.get("weight", 1.0)) for _, p in pairs]
    text = _output.config_text(cfg)

    def card(tmp: Path) -> None:
        if write_model_card:
            (tmp / "README.md").write_text(_output.model_card(cfg, text, out.name, method, hub_inputs), encoding="utf-8")
            (tmp / "mergekit_config.yml").write_text(text, encoding="utf-8")

    opts = dict(out=str(out), dtype=cfg.dtype or "float32", out_dtype=cfg.out_dtype or cfg.dtype, threads=threads,
                max_shard_size=shard, progress=progress, seed=seed, extra_files=card, overwrite=overwrite,
                cache_dir=cache_dir, fsync=fsync)
    if method == "fisher_weighted":
        if base is not None:
            raise err(("base_model",), "fisher_weighted takes no base_model")
        missing = [m for m, p in pairs if "fisher" not in p]
        if missing:
            raise err(("models",), f"fisher_weighted needs parameters.fisher for every model; missing for {missing}")
        return fisher_weighted(models, [p["fisher"] for _, p in pairs], weights=weights, **glob, **opts)
    if method == "regmean":
        if base is not None:
            raise err(("base_model",), "regmean takes no base_model")
        missing = [m for m, p in pairs if "gram" not in p]
        if missing:
            raise err(("models",), f"regmean needs parameters.gram (a Gram file from `merge-fast gram`) for every "
                                   f"model; missing for {missing}")
        return regmean(models, [p["gram"] for _, p in pairs], weights=weights, **glob, **opts)
    if base is None:
        raise err(("base_model",), f"{method} needs a base_model")
    if method == "fisher_dampened":
        if "fisher" not in glob:
            raise err(("parameters",), "fisher_dampened needs parameters.fisher (the Fisher of the base model)")
        fisher = glob.pop("fisher")
        return fisher_dampened(base, models, fisher, weights=weights, **glob, **opts)
    from ..crossarch import procrustes_absorb

    # Written by the engine; keeps its own default shard size (128MB).
    return procrustes_absorb(base, models, out=str(out), weights=weights, seed=seed, overwrite=overwrite, **glob)


def _with_location(cfg: MergeConfig, e: ConfigError) -> ConfigError:
    """A kernel's parameter complaint, pointed at the config key that set the parameter."""
    import re

    msg = str(e)
    m = re.search(r"parameter(?:\(s\))? '?([A-Za-z_][A-Za-z0-9_]*)", msg)
    if m is None:
        return e
    name = m.group(1)
    for path in cfg.src.lines:
        if len(path) >= 2 and path[-1] == name and path[-2] == "parameters":
            return ConfigError(f"{msg} (set at {cfg.src.where(path)})")
    return e


def _execute(p, out, recipe, shard, threads, progress, random_seed, extra, overwrite, inputs, fsync=True):
    return _plan.execute(
        p.paths,
        p.tensors,
        out,
        recipe=recipe,
        side_files_from=p.donor.ref.path,
        out_dtype=p.out_dtype,
        threads=threads,
        max_shard_size=shard,
        progress=progress,
        seed=0 if random_seed is None else int(random_seed),
        extra_files=extra,
        overwrite=overwrite,
        inputs=inputs,
        fsync=fsync,
    )
