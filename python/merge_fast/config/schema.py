"""mergekit's config schema, parsed and checked key by key (each error names its key and
line). Structure only: models, files and tensors are checked by the planner."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ._source import ConfigSource, KeyPath
from .params import check_setting

TOP_KEYS = {
    "models", "slices", "merge_method", "base_model", "dtype", "out_dtype", "tokenizer_source",
    "tokenizer", "chat_template", "parameters", "name", "modules",
}
DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "torch.float32": "float32",
                  "torch.bfloat16": "bfloat16", "torch.float16": "float16", "half": "float16", "float": "float32"}


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A model (local path or hub repo id, with its revision), optionally with a PEFT LoRA
    adapter applied (``base+adapter``). After hub resolution (merge_fast.hub) ``path`` and
    ``lora`` are local folders and ``label`` keeps the reference as written."""

    path: str
    lora: Optional[str] = None
    revision: Optional[str] = None
    lora_revision: Optional[str] = None
    label: Optional[str] = dataclasses.field(default=None, compare=False)
    # mergekit's per-reference `override_architecture`: the model's config.json is read (and,
    # for the base/first model, written) with `architectures: [this]`.
    override_architecture: Optional[str] = dataclasses.field(default=None, compare=False)

    @property
    def key(self) -> Tuple[Any, ...]:
        return (os.path.abspath(self.path), os.path.abspath(self.lora) if self.lora else None,
                self.revision, self.lora_revision)

    def __str__(self) -> str:
        if self.label:
            return self.label
        m = f"{self.path}@{self.revision}" if self.revision else self.path
        if not self.lora:
            return m
        return f"{m}+{self.lora}@{self.lora_revision}" if self.lora_revision else f"{m}+{self.lora}"

    def same(self, other: "ModelRef") -> bool:
        return other is not None and self.key == other.key


@dataclasses.dataclass
class ModelDef:
    """An entry of ``models:`` (all of that model's layers)."""

    model: ModelRef
    parameters: Optional[Dict[str, Any]]
    path: KeyPath  # key path of this entry


@dataclasses.dataclass
class SourceDef:
    """A source of a slice: a model's layers ``layer_range`` (end excluded)."""

    model: ModelRef
    layer_range: Tuple[int, int]
    parameters: Optional[Dict[str, Any]]
    path: KeyPath  # key path of this entry


@dataclasses.dataclass
class SliceDef:
    sources: List[SourceDef]
    base_model: Optional[ModelRef]
    parameters: Optional[Dict[str, Any]]
    path: KeyPath


@dataclasses.dataclass
class TokenSpec:
    """One entry of ``tokenizer.tokens``: where a token's embedding row comes from."""

    kind: str  # "model" (that model's row for this token) | "model_token" | "zero"
    model: Optional[ModelRef]
    token: Optional[str]
    token_id: Optional[int]
    force: bool
    path: KeyPath


@dataclasses.dataclass
class MergeConfig:
    src: ConfigSource
    merge_method: str
    base_model: Optional[ModelRef]
    models: Optional[List[ModelDef]]
    slices: Optional[List[SliceDef]]
    parameters: Optional[Dict[str, Any]]
    dtype: Optional[str]
    out_dtype: Optional[str]
    tokenizer_source: Optional[Any]  # "base" | "union" | ModelRef | None
    chat_template: Optional[str]
    tokens: Dict[str, TokenSpec] = dataclasses.field(default_factory=dict)
    modules: Optional[Dict[str, "ModuleDef"]] = None  # see modules.py and ModuleDef below
    # multi-stage files: the hub inputs of the earlier stages this one is built from, pinned
    # in its card and recipe with its own (merge_fast.hub.HubInput)
    earlier_hub_inputs: Tuple[Any, ...] = ()

    def referenced_models(self) -> List[ModelRef]:
        """Every model, in config order (base first), without repeats."""
        out: List[ModelRef] = []

        def add(m: Optional[ModelRef]) -> None:
            if m is not None and not any(m.same(o) for o in out):
                out.append(m)

        add(self.base_model)
        for mod in [self] + list((self.modules or {}).values()):
            for m in mod.models or []:
                add(m.model)
            for sl in mod.slices or []:
                add(sl.base_model)
                for s in sl.sources:
                    add(s.model)
        if isinstance(self.tokenizer_source, ModelRef):
            add(self.tokenizer_source)
        return out


def _resolve_path(p: str, src: ConfigSource) -> str:
    """Paths as written; relative ones are tried against the working folder first, then
    against the config file's folder."""
    path = os.path.expanduser(p)
    if os.path.isabs(path) or os.path.exists(path) or not src.filename:
        return path
    alt = os.path.join(os.path.dirname(os.path.abspath(src.filename)), path)
    return alt if os.path.exists(alt) else path


def _ref_part(src: ConfigSource, path: KeyPath, text: str) -> Tuple[str, Optional[str]]:
    """'org/name@rev' -> (name, rev); a path that exists is taken as it is."""
    local = _resolve_path(text, src)
    if os.path.exists(local) or "@" not in text:
        return local, None
    name, rev = text.rsplit("@", 1)
    if not name or not rev:
        raise src.error(path, f"cannot parse model reference {text!r} (use NAME@REVISION)")
    return _resolve_path(name, src), rev


def parse_model_ref(src: ConfigSource, path: KeyPath, value: Any, revision: Any = None) -> ModelRef:
    """mergekit's forms: ``path``, ``org/name@revision``, ``model+adapter`` (each side a local
    path or a hub repo id), ``{model: ..., lora: ...}`` (each a string or ``{path, revision}``);
    `revision` is a ``revision:`` key beside the reference."""
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise src.error(path[:-1] + ("revision",), "revision must be a branch, tag or commit hash")
    override = None
    if isinstance(value, dict):
        extra = set(value) - {"model", "lora", "override_architecture"}
        if extra:
            raise src.error(path + (sorted(extra)[0],),
                            "unknown key in a model reference (allowed: model, lora, override_architecture)")
        override = value.get("override_architecture")
        if override is not None and (not isinstance(override, str) or not override.strip()):
            raise src.error(path + ("override_architecture",),
                            "override_architecture must be an architecture class name (e.g. LlamaForCausalLM)")
        parts = []
        for k in ("model", "lora"):
            v, rev = value.get(k), None
            if isinstance(v, dict):  # mergekit's serialized ModelPath {path, revision}
                rev = v.get("revision")
                v = v.get("path")
                if rev is not None and (not isinstance(rev, str) or not rev):
                    raise src.error(path + (k, "revision"), "revision must be a branch, tag or commit hash")
            if v is not None and (not isinstance(v, str) or not v):
                raise src.error(path + (k,), "a model reference needs 'model: PATH'" if k == "model"
                                else "lora must be a path to a PEFT adapter folder or a hub repo id")
            if v is not None and rev is None:
                v, rev = _ref_part(src, path + (k,), v)
            elif v is not None:
                v = _resolve_path(v, src)
            parts.append((v, rev))
        (m, mrev), (lora, lrev) = parts
        if m is None:
            raise src.error(path + ("model",), "a model reference needs 'model: PATH'")
    else:
        if not isinstance(value, str) or not value.strip():
            raise src.error(path, f"expected a model path, got {value!r}")
        if os.path.exists(_resolve_path(value, src)):
            return ModelRef(_resolve_path(value, src), revision=revision)
        texts = value.split("+")
        if len(texts) > 2 or not all(texts):
            raise src.error(path, f"cannot parse model reference {value!r} (use MODEL or MODEL+LORA_ADAPTER)")
        m, mrev = _ref_part(src, path, texts[0])
        lora, lrev = _ref_part(src, path, texts[1]) if len(texts) == 2 else (None, None)
    if revision is not None:
        if mrev is not None and mrev != revision:
            raise src.error(path[:-1] + ("revision",), f"revision {revision!r} contradicts {m}@{mrev}")
        mrev = revision
    return ModelRef(m, lora, mrev, lrev, override_architecture=override)


def _params(src: ConfigSource, path: KeyPath, value: Any) -> Optional[Dict[str, Any]]:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise src.error(path, "parameters must be a mapping of name: value")
    for k, v in value.items():
        if not isinstance(k, str):
            raise src.error(path + (k,), "parameter names must be strings")
        if v is None:
            raise src.error(path + (k,), f"parameter '{k}' has no value")
        check_setting(src, path + (k,), v)
    return value


def _check_keys(src: ConfigSource, path: KeyPath, d: Any, allowed: set, what: str) -> None:
    """A mapping is required; keys outside `allowed` are recorded as ignored (mergekit's
    schema drops unknown keys silently; we warn, or refuse under strict)."""
    if not isinstance(d, dict):
        raise src.error(path, f"expected a mapping for {what}, got {type(d).__name__}")
    for k in d:
        if k not in allowed:
            src.ignore(path + (k,), what, allowed)


def _layer_range(src: ConfigSource, path: KeyPath, v: Any) -> Tuple[int, int]:
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
        raise src.error(path, f"layer_range must be [start, end] (integers, end excluded), got {v!r}")
    a, b = v
    if a < 0 or b <= a:
        raise src.error(path, f"layer_range [{a}, {b}] is empty or negative (end is excluded)")
    return (a, b)


def _dtype(src: ConfigSource, key: str, v: Any) -> Optional[str]:
    if v is None:
        return None
    if isinstance(v, str):
        v2 = _DTYPE_ALIASES.get(v, v)
        if v2 in DTYPES:
            return v2
    raise src.error((key,), f"{key} must be one of {', '.join(DTYPES)}, got {v!r}")


def _model_entry(src: ConfigSource, p: KeyPath, m: Any) -> ModelDef:
    if isinstance(m, str):
        m = {"model": m}
    _check_keys(src, p, m, {"model", "parameters", "revision"}, "a model entry")
    if "model" not in m:
        raise src.error(p, "a model entry needs 'model'")
    return ModelDef(parse_model_ref(src, p + ("model",), m["model"], m.get("revision")),
                    _params(src, p + ("parameters",), m.get("parameters")), p)


def _source_entry(src: ConfigSource, q: KeyPath, so: Any) -> SourceDef:
    _check_keys(src, q, so, {"model", "layer_range", "parameters", "revision"}, "a slice source")
    if "model" not in so:
        raise src.error(q, "a slice source needs 'model'")
    if "layer_range" not in so:
        raise src.error(q, "a slice source needs 'layer_range: [start, end]'")
    return SourceDef(parse_model_ref(src, q + ("model",), so["model"], so.get("revision")),
                     _layer_range(src, q + ("layer_range",), so["layer_range"]),
                     _params(src, q + ("parameters",), so.get("parameters")), q)


def _slice_entry(src: ConfigSource, p: KeyPath, s: Any) -> SliceDef:
    _check_keys(src, p, s, {"sources", "base_model", "parameters", "residual_weight"}, "a slice")
    if s.get("residual_weight") is not None:
        # accepted by mergekit's schema and used nowhere in 0.1.5
        src.ignore(p + ("residual_weight",), "a slice", (), "it has no effect (in mergekit 0.1.5 neither); ignored")
    if not isinstance(s.get("sources"), list) or not s["sources"]:
        raise src.error(p + ("sources",), "a slice needs a non-empty 'sources' list")
    sources = [src.collect(_source_entry, src, p + ("sources", j), so) for j, so in enumerate(s["sources"])]
    sb = src.collect(parse_model_ref, src, p + ("base_model",), s["base_model"]) if s.get("base_model") is not None else None
    params = src.collect(_params, src, p + ("parameters",), s.get("parameters"))
    return SliceDef([x for x in sources if x is not None], sb, params, p)


def _inputs(src: ConfigSource, d: dict, path: KeyPath = ()) -> Tuple[Optional[List[ModelDef]], Optional[List[SliceDef]]]:
    """`models` or `slices` of a config (or of one module)."""
    has_models, has_slices = d.get("models") is not None, d.get("slices") is not None
    if has_models == has_slices:
        raise src.error(path, "give exactly one of 'models' or 'slices'" + (" (or 'modules')" if not path else ""))
    if has_models:
        if not isinstance(d["models"], list) or not d["models"]:
            raise src.error(path + ("models",), "models must be a non-empty list")
        got = [src.collect(_model_entry, src, path + ("models", i), m) for i, m in enumerate(d["models"])]
        return [x for x in got if x is not None], None
    if not isinstance(d["slices"], list) or not d["slices"]:
        raise src.error(path + ("slices",), "slices must be a non-empty list")
    got = [src.collect(_slice_entry, src, path + ("slices", i), s) for i, s in enumerate(d["slices"])]
    return None, [x for x in got if x is not None]


def _tokenizer(src: ConfigSource, d: dict) -> Tuple[Any, Dict[str, TokenSpec]]:
    tok = d.get("tokenizer_source")
    tokens: Dict[str, TokenSpec] = {}
    if d.get("tokenizer") is not None:
        t = d["tokenizer"]
        _check_keys(src, ("tokenizer",), t, {"source", "tokens", "pad_to_multiple_of"}, "tokenizer")
        if tok is not None:
            raise src.error(("tokenizer",), "give tokenizer_source or tokenizer, not both")
        if t.get("pad_to_multiple_of"):
            raise src.error(("tokenizer", "pad_to_multiple_of"), "tokenizer.pad_to_multiple_of is not supported")
        tok = t.get("source")
        if tok is None:
            raise src.error(("tokenizer",), "tokenizer needs 'source' (base, union or a model)")
        tokens = _tokens(src, t.get("tokens"))
    if tok is not None and tok not in ("base", "union"):
        tok = parse_model_ref(src, ("tokenizer_source",), tok)
        if tok.lora:
            raise src.error(("tokenizer_source",), "a tokenizer source cannot carry a LoRA")
    return tok, tokens


def check_param_names(src: ConfigSource, method: str, scopes: List[Tuple[Optional[dict], KeyPath, bool]]) -> None:
    """Parameters the method does not take, or shared ones set per model: mergekit ignores
    both, so they are recorded as ignored. `scopes`: (parameters, key path, per model)."""
    from .methods import NO_OP_PARAMS, spec_for

    spec, _ = spec_for(method)
    if spec is None:  # merge_fast's own methods: their kernels check the names
        return
    for params, path, per_source in scopes:
        for k in params or {}:
            if k in NO_OP_PARAMS:
                continue
            if k not in spec.params:
                src.ignore(path + (k,), f"the parameters of {spec.name}", spec.params)
            elif per_source and not spec.params[k].per_model:
                src.ignore(path + (k,), f"a model's parameters ({k} is shared by all models of {spec.name})", (),
                           "ignored, as mergekit does; set it under the slice or top-level parameters")


def param_scopes(cfg_params: Optional[dict], models: Optional[List[ModelDef]], slices: Optional[List[SliceDef]],
                 path: KeyPath = ()) -> List[Tuple[Optional[dict], KeyPath, bool]]:
    scopes: List[Tuple[Optional[dict], KeyPath, bool]] = [(cfg_params, path + ("parameters",), False)]
    for m in models or []:
        scopes.append((m.parameters, m.path + ("parameters",), True))
    for sl in slices or []:
        scopes.append((sl.parameters, sl.path + ("parameters",), False))
        for s in sl.sources:
            scopes.append((s.parameters, s.path + ("parameters",), True))
    return scopes


def parse(src: ConfigSource, *, strict: bool = False) -> MergeConfig:
    """Checks the whole config and reports every problem at once (one ConfigError); keys
    mergekit ignores are warnings (errors with `strict`)."""
    src.strict = strict
    d = src.data
    if not isinstance(d, dict):
        raise src.error((), "a merge config is a mapping (merge_method, models or slices, ...)")
    _check_keys(src, (), d, TOP_KEYS, "the config")
    method = d.get("merge_method")
    if not isinstance(method, str) or not method:
        src.errors.append(src.error(("merge_method",), "merge_method is required (e.g. linear, slerp, ties)"))
        method = ""
    base = src.collect(parse_model_ref, src, ("base_model",), d["base_model"]) if d.get("base_model") is not None else None
    modules = None
    models = slices = None
    if d.get("modules") is not None:
        if d.get("models") is not None or d.get("slices") is not None:
            src.errors.append(src.error(("modules",), "give exactly one of 'models', 'slices' or 'modules'"))
        modules = src.collect(parse_modules, src, d["modules"])
    else:
        got = src.collect(_inputs, src, d)
        if got is not None:
            models, slices = got
    params = src.collect(_params, src, ("parameters",), d.get("parameters"))
    tok_tokens = src.collect(_tokenizer, src, d)
    tok, tokens = tok_tokens if tok_tokens is not None else (None, {})
    ct = d.get("chat_template")
    if ct is not None and not isinstance(ct, str):
        src.errors.append(src.error(("chat_template",), "chat_template must be a string (a template or a built-in name)"))
    if d.get("name") is not None and not isinstance(d["name"], str):
        src.errors.append(src.error(("name",), "name must be a string"))
    dtype = src.collect(_dtype, src, "dtype", d.get("dtype"))
    out_dtype = src.collect(_dtype, src, "out_dtype", d.get("out_dtype"))
    if method:
        scopes = param_scopes(params, models, slices)
        for m in (modules or {}).values():
            scopes += param_scopes(m.parameters, m.models, m.slices, m.path)
        check_param_names(src, method, scopes)
    src.finish()
    return MergeConfig(
        src=src,
        merge_method=method,
        base_model=base,
        models=models,
        slices=slices,
        parameters=params,
        dtype=dtype,
        out_dtype=out_dtype,
        tokenizer_source=tok,
        chat_template=ct,
        tokens=tokens,
        modules=modules,
    )


def _tokens(src: ConfigSource, value: Any) -> Dict[str, TokenSpec]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise src.error(("tokenizer", "tokens"), "tokens must map token strings to {source, force}")
    out: Dict[str, TokenSpec] = {}
    for tok, spec in value.items():
        p = ("tokenizer", "tokens", tok)
        _check_keys(src, p, spec, {"source", "force"}, "a token entry")
        force = spec.get("force", False)
        if not isinstance(force, bool):
            raise src.error(p + ("force",), "force must be true or false")
        s = spec.get("source")
        if isinstance(s, dict) and "kind" in s:
            kind = s["kind"]
            if kind == "zero":
                _check_keys(src, p + ("source",), s, {"kind"}, "a zero token source")
                out[str(tok)] = TokenSpec("zero", None, None, None, force, p)
                continue
            if kind != "model_token":
                raise src.error(p + ("source", "kind"), f"unknown token source kind {kind!r} (model_token or zero)")
            _check_keys(src, p + ("source",), s, {"kind", "model", "token", "token_id"}, "a model_token source")
            if ("token" in s) == ("token_id" in s):
                raise src.error(p + ("source",), "a model_token source needs exactly one of token or token_id")
            tid = s.get("token_id")
            if tid is not None and (not isinstance(tid, int) or isinstance(tid, bool) or tid < 0):
                raise src.error(p + ("source", "token_id"), "token_id must be a non-negative integer")
            out[str(tok)] = TokenSpec("model_token", parse_model_ref(src, p + ("source", "model"), s.get("model")),
                                      s.get("token"), tid, force, p)
        elif s is None:
            raise src.error(p, "a token entry needs 'source'")
        else:
            out[str(tok)] = TokenSpec("model", parse_model_ref(src, p + ("source",), s), None, None, force, p)
    return out


def model_dir(ref: ModelRef) -> Path:
    return Path(ref.path)


# ---------------------------------------------------------------- modules (see modules.py)
@dataclasses.dataclass
class ModuleDef:
    name: str
    models: Optional[List[ModelDef]]
    slices: Optional[List[SliceDef]]
    parameters: Optional[Dict[str, Any]]
    path: KeyPath


def parse_modules(src: ConfigSource, value: Any) -> Dict[str, ModuleDef]:
    if not isinstance(value, dict) or not value:
        raise src.error(("modules",), "modules must map module names (e.g. text_decoder, vision_tower) to "
                                      "{models | slices, parameters}")
    out = {}
    for name, m in value.items():
        p: KeyPath = ("modules", name)
        _check_keys(src, p, m, {"models", "slices", "parameters", "name"}, "a module")
        got = src.collect(_inputs, src, m, p)
        params = src.collect(_params, src, p + ("parameters",), m.get("parameters"))
        models, slices = got if got is not None else (None, None)
        out[str(name)] = ModuleDef(str(name), models, slices, params, p)
    return out
