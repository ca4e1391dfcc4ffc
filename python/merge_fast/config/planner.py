"""From a parsed config to the engine's plan: every output tensor with its sources and its
parameters, validated against the model folders before anything is written.

Layer structure is read from tensor names: ``<prefix>.<layers|h|layer|blocks>.<i>.<rest>``
is layer ``i``; other tensors are "pre" (embeddings) or "post" (final norm, LM head), as
mergekit's architecture tables have them. Pre tensors come from the first slice's models
and post tensors from the last slice's, both at gradient position t = 0.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .. import _core
from .._errors import ConfigError, MergeError, unprefixed
from .. import plan as _plan
from ..plan import TensorPlan, layer_structure as _classify, out_dtype_code
from ..lora import Adapter, check_against_base, read_adapter
from ._source import KeyPath
from .methods import NO_OP_PARAMS, MethodSpec, spec_for
from .params import interpolate_t, resolve
from .schema import MergeConfig, ModelRef, SliceDef, SourceDef
from .tokenizer import VocabPlan, prepare as prepare_vocab

_NUM_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
VOCAB_RE = re.compile(r"(embed_tokens|\bwte\b|embed_in|word_embeddings|lm_head|embed_out)")


@dataclasses.dataclass
class ModelInfo:
    ref: ModelRef
    where: KeyPath  # first config key referencing it
    input: int  # index of the folder in the plan inputs
    shapes: Dict[str, Tuple[int, ...]]
    dtypes: Dict[str, str]
    names: List[str]
    layers: Dict[int, List[Tuple[str, str]]]  # idx -> [(rest, full name)]
    prefix: Optional[str]
    pre: List[str]
    post: List[str]
    config: Dict[str, Any]
    num_layers: int
    num_layers_key: Optional[str]
    adapter: Optional[Adapter] = None
    lora_sources: Dict[str, _plan.Source] = dataclasses.field(default_factory=dict)

    def layer_name(self, idx: int, rest: str) -> str:
        return f"{self.prefix}.{idx}.{rest}"

    def source(self, name: str) -> _plan.Source:
        if name in self.lora_sources:
            return self.lora_sources[name]
        return _plan.tensor(self.input, name)


@dataclasses.dataclass
class Plan:
    paths: List[str]
    tensors: List[TensorPlan]
    donor: ModelInfo  # config.json / tokenizer default donor
    models: Dict[Tuple[str, Optional[str]], ModelInfo]
    out_layers: int
    layer_origin: List[Tuple[ModelInfo, int]]  # per output layer: (model, source layer)
    method: str  # kernel actually used
    out_dtype: Optional[str]  # safetensors code
    vocab: Optional[VocabPlan] = None  # tokenizer_source plan (see tokenizer.py)
    # modules configs: config.json key path -> layer count of that module
    module_layers: Dict[Tuple[str, ...], int] = dataclasses.field(default_factory=dict)


class Planner:
    def __init__(self, cfg: MergeConfig, *, allow_crimes: bool = False, paths: Optional[List[str]] = None,
                 keep=None, module_scope: Optional[Tuple[Optional[dict], KeyPath]] = None):
        self.cfg = cfg
        self.src = cfg.src
        self.allow_crimes = allow_crimes
        self.paths: List[str] = [] if paths is None else paths  # shared by the planners of one config's modules
        self.models: Dict[Tuple[str, Optional[str]], ModelInfo] = {}
        self.keep = keep  # a module's tensors only (modules.py)
        # parameter scopes above the slice's: the module's, then the config's
        self.outer = ([module_scope] if module_scope else []) + [(cfg.parameters, ("parameters",))]

    # ------------------------------------------------------------------ inputs
    def _input(self, path: str) -> int:
        return _plan.Inputs(self.paths)(path)

    def model(self, ref: ModelRef, where: KeyPath) -> ModelInfo:
        if ref.key in self.models:
            return self.models[ref.key]
        d = Path(ref.path)
        if not d.exists():
            raise self.src.error(where, f"model folder {ref.path} not found")
        try:
            ck = _core.Checkpoint(str(d))
        except MergeError as e:
            raise self.src.error(where, f"cannot open model {ref.path}: {e}") from None
        tensors = ck.tensors()
        if self.keep is not None:
            tensors = [t for t in tensors if self.keep(t[0])]
        shapes = {n: tuple(s) for n, _, s in tensors}
        dtypes = {n: dt for n, dt, _ in tensors}
        names = [n for n, _, _ in tensors]
        cfg_file = (d if d.is_dir() else d.parent) / "config.json"
        config: Dict[str, Any] = {}
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text())
            except ValueError as e:
                raise self.src.error(where, f"{cfg_file}: invalid JSON: {e}") from None
        if ref.override_architecture:
            config = {**config, "architectures": [ref.override_architecture]}
        layers, prefix, pre, post = _classify(names)
        key = next((k for k in _NUM_LAYER_KEYS if isinstance(config.get(k), int)), None) if self.keep is None else None
        n_layers = config[key] if key else (max(layers) + 1 if layers else 0)
        info = ModelInfo(ref, where, -1, shapes, dtypes, names, layers, prefix, pre, post, config, n_layers, key)
        # a folder used both bare and with an adapter is one input
        info.input = self._input(str(d))
        if ref.lora:
            try:
                ad = read_adapter(ref.lora)
                check_against_base(ad, shapes)
            except ConfigError as e:
                raise self.src.error(where, unprefixed(e)) from None
            info.adapter = ad
            info.lora_sources = ad.sources(info.input, self._input(str(ad.file)))
        self.models[ref.key] = info
        return info

    # ------------------------------------------------------------ structure
    def slices(self) -> List[SliceDef]:
        """`models:` becomes one slice over every model's full layer range (the base added
        when it is not listed), as mergekit does."""
        cfg = self.cfg
        if cfg.slices is not None:
            return cfg.slices
        assert cfg.models is not None  # parse() requires models, slices or modules (planned per module)
        sources: List[SourceDef] = []
        for s in cfg.models:
            info = self.model(s.model, s.path + ("model",))
            sources.append(SourceDef(s.model, (0, info.num_layers), s.parameters, s.path))
        if cfg.base_model is not None and not any(s.model.same(cfg.base_model) for s in sources):
            info = self.model(cfg.base_model, ("base_model",))
            sources.append(SourceDef(cfg.base_model, (0, info.num_layers), None, ("base_model",)))
        return [SliceDef(sources, None, None, ("models",))]

    def _check_architectures(self) -> None:
        archs: Dict[Tuple[str, ...], ModelInfo] = {}
        for info in self.models.values():
            a = tuple(info.config.get("architectures") or ())
            archs.setdefault(a, info)
        if len(archs) > 1 and not self.allow_crimes:
            desc = "; ".join(f"{i.ref} is {list(a) or 'unknown'}" for a, i in archs.items())
            first = list(archs.values())[1]
            raise self.src.error(first.where, f"models of different architectures ({desc}); pass --allow-crimes to merge anyway")
        self._check_multipliers()

    def _check_multipliers(self) -> None:
        """Granite-style scalar multipliers live in config.json, not in the weights: a
        parameter-space merge of models whose multipliers differ computes neither model's
        function (the output takes one config), so it is refused like a change of architecture."""
        from ..arch import ArchError, family_from_config

        seen: Dict[str, Tuple[Any, ModelInfo]] = {}
        for info in self.models.values():
            try:
                fam = family_from_config(info.config)
            except ArchError:
                fam = None
            if fam is None:
                continue
            mult = fam.attributes.get("multipliers")
            for key in (mult.values() if isinstance(mult, dict) else ()):
                v = info.config.get(key)
                if key in seen and seen[key][0] != v and not self.allow_crimes:
                    raise self.src.error(info.where, f"config key '{key}' is {v!r} in {info.ref} but {seen[key][0]!r} in "
                                                     f"{seen[key][1].ref}: {fam.name} applies it in the forward pass, so "
                                                     "averaging the weights would not merge the two models' functions; "
                                                     "pass --allow-crimes to merge anyway")
                seen.setdefault(key, (v, info))

    # ------------------------------------------------------------ parameters
    def _tensor_params(self, spec: Optional[MethodSpec], sl: SliceDef, inputs: List[Tuple[SourceDef, str]],
                       out_name: str, t: float) -> Dict[str, Any]:
        s_scope = (sl.parameters, sl.path + ("parameters",))
        # name -> (kind, per_model, required, default)
        table: Dict[str, Tuple[Optional[str], bool, bool, Any]]
        if spec is not None:
            table = {k: (p.kind, p.per_model, p.required, p.default) for k, p in spec.params.items()}
        else:
            # merge_fast's own methods: per-model when set per model, else shared.
            table = {}
            for params, per in [(self.cfg.parameters, False), (sl.parameters, False)] + [(s.parameters, True) for s, _ in inputs]:
                for k in params or {}:
                    table[k] = (None, per or table.get(k, (None, False))[1], False, None)
        out: Dict[str, Any] = {}
        for k, (kind, per_model, required, default) in table.items():
            if k in NO_OP_PARAMS:
                continue
            if per_model:
                vals = []
                for s, in_name in inputs:
                    v, _ = resolve(k, [(s.parameters, s.path + ("parameters",)), s_scope, *self.outer], in_name, t, kind, self.src)
                    if v is None and required:
                        raise self.src.error(s.path, f"missing required parameter '{k}' of {self.cfg.merge_method} for model {s.model} "
                                                     f"(tensor {in_name}); set it in this model's parameters or the top-level parameters")
                    vals.append(v)
                if all(v is None for v in vals):
                    continue
                out[k] = [default if v is None else v for v in vals]
            else:
                v, _ = resolve(k, [s_scope, *self.outer], out_name, t, kind, self.src)
                if v is None:
                    if required:
                        raise self.src.error(("parameters",), f"missing required parameter '{k}' of {self.cfg.merge_method} "
                                                              f"(tensor {out_name}); set it under parameters")
                    continue
                out[k] = v
        return out

    # ------------------------------------------------------------ plan
    def plan(self) -> Plan:
        if self.cfg.modules:
            return self._plan_modules()
        cfg = self.cfg
        src = self.src
        spec, _known = spec_for(cfg.merge_method)
        available = list(_core.METHODS)
        method = cfg.merge_method
        fallback_passthrough = False
        if method not in available:
            if method == "passthrough":
                fallback_passthrough = True  # a copy: linear over one input, weight = scale
            elif spec is not None:
                raise src.error(("merge_method",), f"merge_method {method} is not available in this build yet "
                                                   f"(available: {', '.join(available)})")
            else:
                raise src.error(("merge_method",), f"unknown merge_method {method!r} (available: {', '.join(available)})")
        if cfg.base_model is not None:
            self.model(cfg.base_model, ("base_model",))
        slices = self.slices()
        for sl in slices:
            if sl.base_model is not None:
                self.model(sl.base_model, sl.path + ("base_model",))
            for s in sl.sources:
                self.model(s.model, s.path + ("model",))
        if isinstance(cfg.tokenizer_source, ModelRef):
            self.model(cfg.tokenizer_source, ("tokenizer_source",))
        self._check_architectures()
        vocab = prepare_vocab(cfg, self)
        # As mergekit: the output has `out_dtype`, else the compute `dtype` (merged tensors
        # come out of the computation in it), else each input tensor's dtype.
        code = out_dtype_code(cfg.dtype or "float32", cfg.out_dtype or cfg.dtype)

        # Per slice: which source is the base, structure checks.
        slice_roles: List[Tuple[Optional[int], List[int]]] = []
        for sl in slices:
            base_ref = sl.base_model or cfg.base_model
            lengths = [s.layer_range[1] - s.layer_range[0] for s in sl.sources]
            for s in sl.sources:
                info = self.model(s.model, s.path + ("model",))
                a, b = s.layer_range
                if b > info.num_layers:
                    raise src.error(s.path + ("layer_range",), f"layer_range [{a}, {b}] is out of bounds: {s.model} has "
                                                               f"{info.num_layers} layers (valid: 0 <= start < end <= {info.num_layers})")
            if len(set(lengths)) > 1:
                raise src.error(sl.path + ("sources",), f"all sources of a slice must span the same number of layers, got {lengths}")
            seen: List[ModelRef] = []
            for s in sl.sources:
                if any(s.model.same(o) for o in seen):
                    raise src.error(s.path + ("model",), f"model {s.model} is listed twice in one slice")
                seen.append(s.model)
            base_idx = None
            if spec is None or spec.uses_base:
                for i, s in enumerate(sl.sources):
                    if base_ref is not None and s.model.same(base_ref):
                        base_idx = i
                if base_ref is not None and base_idx is None:
                    raise src.error(sl.path + ("sources",), f"the base model {base_ref} is not among this slice's sources")
            inputs = [i for i in range(len(sl.sources)) if i != base_idx]
            if spec is not None:
                n_all = len(sl.sources) if base_idx is not None or spec.base == "ignored" else len(inputs)
                if spec.base == "required" and base_idx is None:
                    raise src.error(("base_model",), f"merge_method {spec.name} needs a base_model")
                if n_all < spec.min_inputs or (spec.max_inputs is not None and n_all > spec.max_inputs):
                    want = (f"exactly {spec.min_inputs}" if spec.max_inputs == spec.min_inputs
                            else f"at least {spec.min_inputs}" if spec.max_inputs is None else f"{spec.min_inputs} to {spec.max_inputs}")
                    raise src.error(sl.path, f"merge_method {spec.name} takes {want} models (base included), got {n_all}")
                nb = len(inputs)
                if (spec.min_non_base is not None and nb < spec.min_non_base) or (spec.max_non_base is not None and nb > spec.max_non_base):
                    raise src.error(sl.path, f"merge_method {spec.name} takes {spec.min_non_base}"
                                             f"{'' if spec.max_non_base == spec.min_non_base else '+'} models besides the base, got {nb}")
            slice_roles.append((base_idx, inputs))

        tensors: List[TensorPlan] = []
        seen_names: Dict[str, KeyPath] = {}

        def emit(sl: SliceDef, roles, out_name: str, in_names: List[str], t: float) -> None:
            base_idx, inputs = roles
            infos = [self.model(s.model, s.path) for s in sl.sources]
            shapes = []
            for s, info, n in zip(sl.sources, infos, in_names):
                if n not in info.shapes:
                    raise src.error(s.path + ("model",), f"tensor {n!r} (for output {out_name!r}) is missing from {s.model}")
                shapes.append(info.shapes[n])
            is_vocab = vocab is not None and VOCAB_RE.search(out_name) is not None and all(len(sh) == 2 for sh in shapes)
            if is_vocab and len({sh[1:] for sh in shapes}) == 1:
                pass  # rows are permuted to the output vocabulary below
            elif len(set(shapes)) > 1:
                desc = ", ".join(f"{s.model}: {list(sh)}" for s, sh in zip(sl.sources, shapes))
                hint = " (different vocabularies: set tokenizer_source)" if VOCAB_RE.search(out_name) else ""
                raise src.error(sl.path, f"tensor shape mismatch for {out_name!r}: {desc}{hint}")
            pairs = [(sl.sources[i], in_names[i]) for i in inputs]
            params = self._tensor_params(spec, sl, pairs, out_name, t)
            m = method
            if fallback_passthrough:
                m = "linear"
                params = {"weight": [float(params.get("scale", [1.0])[0] or 1.0)], "normalize": False}
            all_srcs = [info.source(n) for info, n in zip(infos, in_names)]
            if vocab is not None and is_vocab:
                keys = [info.ref.key for info in infos]
                n_rows = [sh[0] for sh in shapes]
                for i in range(len(all_srcs)):
                    rows = vocab.rows_for(keys, n_rows, i)
                    if rows is not None:
                        all_srcs[i] = _plan.rows([info.source(n) for info, n in zip(infos, in_names)],
                                                 [vocab.size, *shapes[i][1:]], rows)
            base = all_srcs[base_idx] if base_idx is not None else None
            srcs = [all_srcs[i] for i in inputs]
            if out_name in seen_names:
                raise src.error(sl.path, f"output tensor {out_name!r} is produced twice")
            seen_names[out_name] = sl.path
            tensors.append(TensorPlan(out_name, m, params, base, srcs, code))

        def ref_info(sl: SliceDef, roles) -> ModelInfo:
            base_idx, _ = roles
            s = sl.sources[base_idx if base_idx is not None else 0]
            return self.model(s.model, s.path)

        # pre tensors (first slice), layers, post tensors (last slice): t = 0 outside layers
        first, last = slices[0], slices[-1]
        for name in ref_info(first, slice_roles[0]).pre:
            emit(first, slice_roles[0], name, [name] * len(first.sources), 0.0)
        out_layer = 0
        layer_origin: List[Tuple[ModelInfo, int]] = []
        out_prefix = ref_info(first, slice_roles[0]).prefix
        for sl, roles in zip(slices, slice_roles):
            ref = ref_info(sl, roles)
            infos = [self.model(s.model, s.path) for s in sl.sources]
            n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
            for i in range(n):
                t = interpolate_t(i, n)
                ref_layer = (sl.sources[roles[0]] if roles[0] is not None else sl.sources[0]).layer_range[0] + i
                if ref_layer not in ref.layers:
                    raise src.error(sl.path, f"{ref.ref} has no tensors for layer {ref_layer}")
                for rest, _ in ref.layers[ref_layer]:
                    in_names = [info.layer_name(s.layer_range[0] + i, rest) for s, info in zip(sl.sources, infos)]
                    emit(sl, roles, f"{out_prefix}.{out_layer}.{rest}", in_names, t)
                layer_origin.append((ref, ref_layer))
                out_layer += 1
        for name in ref_info(last, slice_roles[-1]).post:
            emit(last, slice_roles[-1], name, [name] * len(last.sources), 0.0)

        donor_ref = cfg.base_model or cfg.referenced_models()[0]
        donor = self.model(donor_ref, ("base_model",) if cfg.base_model else ("models",))
        return Plan(list(self.paths), tensors, donor, self.models, out_layer, layer_origin,
                    "linear" if fallback_passthrough else method, code, vocab)

    def _plan_modules(self) -> Plan:
        """One sub-plan per module over that module's tensors (modules.py), into one output."""
        import warnings

        from .._errors import MergeWarning
        from .modules import layer_keys, module_prefix, selector

        cfg = self.cfg
        mods = cfg.modules
        assert mods is not None  # plan() calls this for a modules config only
        prefixes = {}
        for name, m in mods.items():
            first = m.models[0] if m.models else [s for sl in m.slices or [] for s in sl.sources][0]
            prefixes[name] = module_prefix(name, self.model(first.model, first.path + ("model",)).names)
        plans = []
        for name, m in mods.items():
            sub_cfg = dataclasses.replace(cfg, models=m.models, slices=m.slices, modules=None)
            sub = Planner(sub_cfg, allow_crimes=self.allow_crimes, paths=self.paths, keep=selector(name, prefixes),
                          module_scope=(m.parameters, m.path + ("parameters",)))
            plans.append((name, sub.plan()))
        tensors = [t for _, p in plans for t in p.tensors]
        donor_ref = cfg.base_model or cfg.referenced_models()[0]
        donor = self.model(donor_ref, ("base_model",) if cfg.base_model else ("modules",))
        keeps = [selector(k, prefixes) for k in prefixes]
        left = [n for n in donor.names if not any(keep(n) for keep in keeps)]
        if left:
            warnings.warn(f"merge-fast: {len(left)} tensor(s) of {donor_ref} belong to no module of the config and are "
                          f"not written (as mergekit), e.g. {left[0]!r}", MergeWarning, stacklevel=4)
        module_layers = {}
        for name, p in plans:
            for key in layer_keys(name):
                section = donor.config.get(key[0])
                if isinstance(section, dict) and key[1] in section:
                    module_layers[key] = p.out_layers
                    break
        main = dict(plans).get("text_decoder") or plans[0][1]
        models = {k: v for _, p in plans for k, v in p.models.items()}
        return Plan(list(self.paths), tensors, main.donor, models, main.out_layers, main.layer_origin, main.method,
                    main.out_dtype, main.vocab, module_layers)
