"""PEFT LoRA adapters as merge inputs.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) applied to a
base model is read as the weights ``W + scale · B·A`` (scale = ``lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with ``use_rslora``), computed by the Rust reader element range
by element range: the full delta is never materialized, the merged model never written
unless asked for. Use it in configs as ``model: base+adapter`` or
``model: {model: base, lora: adapter}``, or directly::

    merge_fast.lora.apply("base", "adapter", out="merged")   # like peft's merge_and_unload

Supported: ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``,
``fan_in_fan_out`` (GPT-2 Conv1D weights), embedding adapters (``lora_embedding_A/B``), and
whole tensors saved in the adapter (``modules_to_save``, trained biases), which replace the
base's. Not supported (clear error): DoRA (``use_dora``), conv LoRA, non-LoRA PEFT types.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from ._errors import config_error
from . import plan as _plan
from .distributed import with_executor

PathLike = Union[str, Path]
_PREFIX = "base_model.model."
_ADAPTER_FILES = ("adapter_model.safetensors",)


@dataclasses.dataclass
class LoraModule:
    """One adapted weight: base tensor name, factor names in the adapter file, its scale."""

    target: str  # base tensor name, e.g. model.layers.0.self_attn.q_proj.weight
    a: str
    b: str
    rank: int
    scale: float
    transpose: bool
    a_shape: Tuple[int, ...]
    b_shape: Tuple[int, ...]


@dataclasses.dataclass
class Adapter:
    path: Path
    file: Path
    config: Dict[str, Any]
    modules: Dict[str, LoraModule]  # by target tensor name
    replacements: Dict[str, Tuple[str, Tuple[int, ...]]]  # base tensor name -> (adapter tensor, shape)

    def sources(self, base_input: int, adapter_input: int,
                base_source: Optional[Callable[[str], _plan.Source]] = None) -> Dict[str, _plan.Source]:
        """Plan sources for every base tensor this adapter changes (the base tensor itself:
        `base_source`, by default the same name in input `base_input`)."""
        base_of = base_source or (lambda n: _plan.tensor(base_input, n))
        out: Dict[str, _plan.Source] = {}
        for name, m in self.modules.items():
            out[name] = _plan.lora(base_of(name), {"input": adapter_input, "tensor": m.a},
                                   {"input": adapter_input, "tensor": m.b}, m.scale, m.transpose)
        for name, (t, _) in self.replacements.items():
            if name not in self.modules:  # a saved copy of an adapted layer's base weight
                out[name] = _plan.tensor(adapter_input, t)
        return out


def _err(path: Path, msg: str):
    return config_error(f"LoRA adapter {path}: {msg}")


def _pattern_value(patterns: Dict[str, Any], module: str, default: Any) -> Any:
    # PEFT matches pattern keys against the end of the module name (regex allowed).
    for key, v in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return v
    return default


def read_adapter(path: PathLike, base_shapes: Optional[Dict[str, Tuple[int, ...]]] = None) -> Adapter:
    """Reads and validates a PEFT LoRA adapter folder. With `base_shapes` (the base model's
    tensor name -> shape) it also checks that every target exists in the base and fits."""
    from . import _core

    p = Path(path)
    if not p.is_dir():
        raise _err(p, "no such folder")
    cfg_file = p / "adapter_config.json"
    if not cfg_file.is_file():
        raise _err(p, "adapter_config.json is missing (is this a PEFT adapter folder?)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise _err(p, f"cannot read adapter_config.json: {e}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _err(p, f"peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    if cfg.get("use_dora"):
        raise _err(p, "DoRA adapters (use_dora: true) are not supported")
    r_cfg = cfg.get("r")
    alpha_cfg = cfg.get("lora_alpha")
    if not isinstance(r_cfg, int) or r_cfg <= 0:
        raise _err(p, f"adapter_config.json: r must be a positive integer, got {r_cfg!r}")
    if not isinstance(alpha_cfg, (int, float)) or isinstance(alpha_cfg, bool):
        raise _err(p, f"adapter_config.json: lora_alpha must be a number, got {alpha_cfg!r}")
    rslora = bool(cfg.get("use_rslora", False))
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    file = next((p / f for f in _ADAPTER_FILES if (p / f).is_file()), None)
    if file is None:
        if (p / "adapter_model.bin").is_file():
            raise _err(p, "adapter_model.bin (pickle) is not supported; save the adapter with safe_serialization")
        raise _err(p, "adapter_model.safetensors is missing")
    ck = _core.Checkpoint(str(file))
    tensors = {n: (dt, tuple(shape)) for n, dt, shape in ck.tensors()}

    factors: Dict[str, Dict[str, Tuple[str, Tuple[int, ...]]]] = {}
    kinds: Dict[str, bool] = {}
    replacements: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
    pat = re.compile(r"^(?P<mod>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$")
    for name, (_dt, shape) in tensors.items():
        bare = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
        m = pat.match(bare)
        if m is None:
            if ".lora_" in bare:
                raise _err(p, f"cannot interpret tensor {name!r}")
            target = bare.replace(".modules_to_save.default.", ".").replace(".original_module.", ".").replace(".base_layer.", ".")
            replacements[target] = (name, shape)
            continue
        mod = m.group("mod")
        factors.setdefault(mod, {})[m.group("ab")] = (name, shape)
        kinds[mod] = m.group("emb") is not None
    modules: Dict[str, LoraModule] = {}
    for mod, ab in sorted(factors.items()):
        if "A" not in ab or "B" not in ab:
            missing = "A" if "A" not in ab else "B"
            raise _err(p, f"module {mod!r} has lora_{'BA'[missing == 'B']} but no lora_{missing}")
        (a, ash), (b, bsh) = ab["A"], ab["B"]
        if len(ash) != 2 or len(bsh) != 2:
            raise _err(p, f"module {mod!r}: only 2-D (linear/embedding) LoRA factors are supported, got A {list(ash)}, B {list(bsh)}")
        emb = kinds[mod]
        rank = ash[0] if not emb else ash[0]
        if bsh[1] != rank:
            raise _err(p, f"module {mod!r}: rank mismatch, lora_A {list(ash)} has rank {rank} but lora_B {list(bsh)} has rank {bsh[1]}")
        want_r = _pattern_value(cfg.get("rank_pattern") or {}, mod, r_cfg)
        if rank != want_r:
            raise _err(p, f"module {mod!r}: factors have rank {rank} but adapter_config.json says r = {want_r}")
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, mod, alpha_cfg)
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        target = mod + ".weight"
        modules[target] = LoraModule(target, a, b, rank, float(scale), emb or fan_in_fan_out, ash, bsh)
    if not modules and not replacements:
        raise _err(p, f"{file.name} holds no LoRA tensors")
    ad = Adapter(p, file, cfg, modules, replacements)
    if base_shapes is not None:
        check_against_base(ad, base_shapes)
    return ad


def _align(name: str, base_shapes: Dict[str, Tuple[int, ...]]) -> str:
    """The base's name for an adapter target: PEFT prefixes differ when the adapter was
    trained on the bare backbone (``layers.0...``) rather than the LM (``model.layers.0...``)."""
    if name in base_shapes:
        return name
    for cand in ("model." + name, name.removeprefix("model.")):
        if cand in base_shapes:
            return cand
    return name


def check_against_base(ad: Adapter, base_shapes: Dict[str, Tuple[int, ...]]) -> None:
    p = ad.path
    ad.modules = {_align(t, base_shapes): dataclasses.replace(m, target=_align(t, base_shapes)) for t, m in ad.modules.items()}
    ad.replacements = {_align(t, base_shapes): v for t, v in ad.replacements.items()}
    for target, m in ad.modules.items():
        if target not in base_shapes:
            raise _err(p, f"target module {target[:-len('.weight')]!r} is not in the base model (no tensor {target!r})")
        shape = tuple(base_shapes[target])
        if len(shape) != 2:
            raise _err(p, f"target {target!r} has shape {list(shape)}; only 2-D weights can take a LoRA")
        rows, cols = shape
        if m.transpose:
            ok = m.a_shape[1] == rows and m.b_shape[0] == cols
        else:
            ok = m.b_shape[0] == rows and m.a_shape[1] == cols
        if not ok:
            raise _err(p, f"module {target!r}: lora_A {list(m.a_shape)} and lora_B {list(m.b_shape)} do not fit the base weight {list(shape)}")
    for target, (name, shape) in ad.replacements.items():
        if target not in base_shapes:
            raise _err(p, f"tensor {name!r} replaces {target!r}, which is not in the base model")
        if tuple(base_shapes[target]) != tuple(shape):
            raise _err(p, f"tensor {name!r} has shape {list(shape)}, base {target!r} has {list(base_shapes[target])}")
    targets = ad.config.get("target_modules")
    if isinstance(targets, list):
        mods = {t.rsplit(".", 1)[0] for t in base_shapes}
        for t in targets:
            if not any(m == t or m.endswith("." + t) for m in mods):
                raise _err(p, f"target module {t!r} (adapter_config.json target_modules) is not in the base model")


@with_executor
def apply(
    base: PathLike,
    adapter: PathLike,
    out: PathLike,
    *,
    out_dtype: Optional[str] = None,
    threads: Optional[int] = None,
    max_shard_size: Union[int, str] = "5GB",
    progress: Any = False,
    overwrite: bool = False,
    cache_dir: Optional[PathLike] = None,
) -> "Any":
    """Writes ``base`` with the adapter merged in (what peft's ``merge_and_unload`` gives),
    streaming tensor by tensor. Either may be a hub repo id (``org/name[@revision]``).
    ``out`` must not touch ``base`` or ``adapter``; an existing previous output is replaced
    only with ``overwrite``."""
    import yaml

    from ._output import check_threads
    from .hub import Request, resolve

    # Written as the one-model passthrough config it is (`model: {model, lora}`): the same
    # recipe, tensor order and files as `merge-fast run` on that config.
    cfg: Dict[str, Any] = {"merge_method": "passthrough", "models": [{"model": {"model": str(base), "lora": str(adapter)}}]}
    if out_dtype:
        cfg["out_dtype"] = out_dtype
    _plan.check_output(out, [base, adapter], overwrite=overwrite)
    threads = check_threads(threads)
    shard = _plan.shard_size(max_shard_size, "max_shard_size")
    code = _plan.out_dtype_code("float32", out_dtype)
    reqs = [Request(str(base), None, "model"), Request(str(adapter), None, "adapter")]
    done = resolve(reqs, cache_dir=cache_dir, progress=progress is True)
    folder, ad_folder = (str(done[r].path) for r in reqs)
    hub_inputs = list(dict.fromkeys(r.hub for r in done.values() if r.hub is not None))
    _plan.check_output(out, [folder, ad_folder], overwrite=overwrite)
    tensors = _plan.open_checkpoint(folder).tensors()
    ad = read_adapter(ad_folder, {n: tuple(sh) for n, _, sh in tensors})
    inputs = _plan.Inputs()
    base_in, ad_in = inputs(folder), inputs(ad.file)
    changed = ad.sources(base_in, ad_in)
    layers, _, pre, post = _plan.layer_structure([n for n, _, _ in tensors])
    order = [*pre, *(n for i in sorted(layers) for _, n in layers[i]), *post]
    params: Dict[str, Any] = {}  # passthrough: a copy of the one input
    plans = [_plan.TensorPlan(n, "passthrough", params, None, [changed.get(n) or _plan.tensor(base_in, n)], code)
             for n in order]
    recipe: Dict[str, Any] = {"merge_fast_version": _plan._core.__version__, "method": "passthrough",
                              "config": yaml.safe_dump(cfg, sort_keys=False)}
    if hub_inputs:
        recipe["hub_inputs"] = [h.to_json() for h in hub_inputs]

    def config_json(tmp: Path) -> None:  # rewritten as a config merge writes it
        f = tmp / "config.json"
        if f.is_file():
            f.write_text(json.dumps(json.loads(f.read_text()), indent=2) + "\n")

    return _plan.execute(inputs.paths, plans, out, recipe=recipe, side_files_from=folder, out_dtype=code,
                         threads=threads, max_shard_size=shard, progress=progress, overwrite=overwrite,
                         extra_files=config_json, inputs=[ad_folder])


def merged_adapter(model: str, adapter: str, cache_dir: Optional[PathLike]) -> Path:
    """A cached copy of `model` with `adapter` merged in (:func:`apply`), kept in
    ``<cache>/../merge_fast/lora-cache`` and reused while neither input changes."""
    import hashlib

    from .hub import hub_cache_dir

    h = hashlib.sha256()
    for folder in (model, adapter):  # paths and file stamps: a changed input is a new entry
        root = Path(folder).resolve()
        h.update(str(root).encode() + b"\0")
        for f in sorted(root.iterdir()) if root.is_dir() else [root]:
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    out = hub_cache_dir(cache_dir).parent / "merge_fast" / "lora-cache" / h.hexdigest()[:24]
    if not (out / "config.json").is_file():  # outputs are written atomically: present is complete
        out.parent.mkdir(parents=True, exist_ok=True)
        apply(model, adapter, out)
    return out


def local_models(models: Sequence[PathLike], *, cache_dir: Optional[PathLike] = None) -> List[str]:
    """Local folders for model references (hub ids downloaded). A ``model+adapter`` is read
    through a copy with the adapter merged in (:func:`merged_adapter`)."""
    from .hub import resolve_paths

    local, _ = resolve_paths(models, cache_dir=cache_dir)
    return [p if a is None else str(merged_adapter(p, a, cache_dir)) for p, a in local]


__all__ = ["Adapter", "LoraModule", "read_adapter", "check_against_base", "apply", "merged_adapter", "local_models"]
