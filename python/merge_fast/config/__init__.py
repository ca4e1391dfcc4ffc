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
``path``, ``path+lora_adapter`` or ``{model: path, lora: adapter}``.
Every check (method, parameters, layer ranges, shapes, folders) runs before anything is
written; each error is a :class:`merge_fast.ConfigError` naming the config key and line.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Optional, Union

from .._errors import ConfigError
from .._folders import MergeResult, ProgressArg, execute
from ..distributed import with_executor
from .._output import check_output_dir, check_threads, parse_size
from . import output as _output
from ._source import load as _load
from .methods import MERGEKIT_METHODS
from .planner import Plan, Planner
from .schema import MergeConfig, parse as _parse

ConfigLike = Union[str, Path, Dict[str, Any]]

__all__ = ["run", "plan", "load", "parse_shard_size", "MergeConfig", "Plan", "MERGEKIT_METHODS"]


def load(config: ConfigLike) -> MergeConfig:
    """Parses and checks the structure of a config (no model is opened)."""
    return _parse(_load(config))


def parse_shard_size(size: Union[int, str]) -> int:
    """mergekit's sizes (``5B``, ``500M``, ``1000K``, a plain number: bytes, counted as
    mergekit's writer counts them) and ours (``5GB``, ``500MB``, ``1GiB``)."""
    if isinstance(size, int):
        return parse_size(size)
    s = str(size).strip()
    if s and s[-1] in "kKmMbB" and s[:-1].replace(".", "", 1).isdigit():
        mult = {"k": 10**3, "m": 10**6, "b": 10**9}[s[-1].lower()]
        return int(float(s[:-1]) * mult)
    return parse_size(s)


def plan(config: ConfigLike, *, allow_crimes: bool = False) -> Plan:
    """Validates `config` against the model folders and returns the tensor plan."""
    cfg = config if isinstance(config, MergeConfig) else load(config)
    return Planner(cfg, allow_crimes=allow_crimes).plan()


@with_executor
def run(
    config: ConfigLike,
    out: Union[str, Path],
    *,
    out_shard_size: Union[int, str] = "5B",
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
    executor: str = "local",
    ray_address: Optional[str] = None,
) -> MergeResult:
    """Runs a mergekit-style config into `out` (written atomically). An existing non-empty
    `out` is replaced only with ``overwrite`` and only if it holds a previous merge output.
    ``executor="ray"`` runs the merge as Ray tasks (``ray_address`` as ``ray.init``'s;
    see :mod:`merge_fast.distributed`); the output is byte-identical.

    ``lazy_unpickle`` and ``low_cpu_memory`` are accepted for mergekit compatibility and do
    nothing (inputs are always memory-mapped and streamed). ``cuda`` prints a notice:
    merge_fast computes on the CPU."""
    if cuda:
        print("merge-fast: --cuda ignored: merge_fast computes on the CPU (streamed, multi-threaded)", file=sys.stderr)
    del lazy_unpickle, low_cpu_memory, trust_remote_code
    cfg = config if isinstance(config, MergeConfig) else load(config)
    inputs = _inputs(cfg)
    check_output_dir(out, inputs, overwrite=overwrite)
    threads = check_threads(threads)
    try:
        shard = parse_shard_size(out_shard_size)
    except ValueError as e:
        raise ConfigError(f"config error: out_shard_size: {e}") from None
    if cfg.merge_method in _RECIPES:
        return _run_recipe(cfg, Path(out), shard=shard, threads=threads, progress=progress,
                           seed=random_seed or 0, write_model_card=write_model_card, overwrite=overwrite)
    p = plan(cfg, allow_crimes=allow_crimes)
    chat_template = _output.resolve_chat_template(cfg, cfg.src.error)
    out = Path(out)
    text = _output.config_text(cfg)
    vp = p.vocab
    tok_folder = (vp.tokenizer_folder if vp is not None else _output.model_folder(p.donor.ref)) if copy_tokenizer else None
    builder = vp.builder if (vp is not None and copy_tokenizer) else None

    def extra(tmp: Path) -> None:
        _output.fix_config_json(tmp, p, cfg, vp.size if vp is not None else None)
        _output.write_tokenizer(tmp, tok_folder, chat_template, builder)
        if write_model_card:
            (tmp / "README.md").write_text(_output.model_card(cfg, text, out.name, p.method), encoding="utf-8")
            (tmp / "mergekit_config.yml").write_text(text, encoding="utf-8")

    recipe = {
        "merge_fast_version": __import__("merge_fast")._core.__version__,
        "method": cfg.merge_method,
        "config": text,
    }
    try:
        return _execute(p, out, recipe, shard, threads, progress, random_seed, extra, overwrite, inputs)
    except ConfigError as e:
        raise _with_location(cfg, e) from None


def _inputs(cfg: MergeConfig) -> list:
    """Every path a config reads: models, adapters, tokenizer source, Fisher files."""
    paths = [p for m in cfg.referenced_models() for p in (m.path, m.lora) if p]
    for params in [cfg.parameters or {}] + [s.parameters or {} for s in cfg.models or []]:
        f = params.get("fisher") if isinstance(params, dict) else None
        if isinstance(f, (str, Path)):
            paths.append(f)
    return paths


# merge_fast's own methods whose inputs go beyond models (Fisher files, donors of other
# families): `models` only (no slices); allowed parameters (model-level, global-level).
_RECIPES = {
    "fisher_weighted": ({"weight", "fisher"}, {"epsilon", "fisher_normalize"}),
    "fisher_dampened": ({"weight"}, {"fisher", "scale", "normalization"}),
    "procrustes_absorb": ({"weight"}, {"beta", "attn_rank", "mlp_rank", "embed_rank", "attn_tol", "mlp_tol",
                                       "embed_tol", "include_embeddings", "strict", "oversample", "power_iters"}),
}


def _run_recipe(cfg: MergeConfig, out: Path, *, shard: int, threads, progress, seed: int,
                write_model_card: bool, overwrite: bool) -> Any:
    """Runs fisher_weighted, fisher_dampened or procrustes_absorb from a config:

    - fisher_weighted: ``models: [{model, parameters: {fisher: PATH, weight}}]``, global
      ``epsilon``, ``fisher_normalize``;
    - fisher_dampened: ``base_model`` (θ_IT), ``models`` (fine-tunes or ``base+adapter``
      LoRAs; their deltas are averaged, ``weight`` per model), global ``fisher: PATH``,
      ``scale``, ``normalization``;
    - procrustes_absorb: ``base_model`` is the anchor, ``models`` the donors (any family),
      global parameters as in :func:`merge_fast.procrustes_absorb`.
    """
    from ..methods.data_aware import fisher_dampened, fisher_weighted

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
            (tmp / "README.md").write_text(_output.model_card(cfg, text, out.name, method), encoding="utf-8")
            (tmp / "mergekit_config.yml").write_text(text, encoding="utf-8")

    opts = dict(out=str(out), dtype=cfg.dtype or "float32", out_dtype=cfg.out_dtype, threads=threads,
                max_shard_size=shard, progress=progress, seed=seed, extra_files=card, overwrite=overwrite)
    if method == "fisher_weighted":
        if base is not None:
            raise err(("base_model",), "fisher_weighted takes no base_model")
        missing = [m for m, p in pairs if "fisher" not in p]
        if missing:
            raise err(("models",), f"fisher_weighted needs parameters.fisher for every model; missing for {missing}")
        return fisher_weighted(models, [p["fisher"] for _, p in pairs], weights=weights, **glob, **opts)
    if base is None:
        raise err(("base_model",), f"{method} needs a base_model")
    if method == "fisher_dampened":
        if "fisher" not in glob:
            raise err(("parameters",), "fisher_dampened needs parameters.fisher (the Fisher of the base model)")
        fisher = glob.pop("fisher")
        return fisher_dampened(base, models, fisher, weights=weights, **glob, **opts)
    from ..crossarch import procrustes_absorb

    # Its writer buffers one output shard, so it keeps its own (small) shard size.
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


def _execute(p, out, recipe, shard, threads, progress, random_seed, extra, overwrite, inputs):
    return execute(
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
    )
