"""The :class:`Family` table type and the spec format it is built from.

A family is described by a plain mapping (the same schema for built-in families, written
as Python dicts in :mod:`.families`, and for user YAML mapping files, loaded by
:mod:`.mapping_file`)::

    family: qed                         # required, unique name
    match:                              # how detect_family() recognises it from config.json
      model_type: [qed]
      architectures: [QedForCausalLM]
    prefixes: ["model.", ""]            # alternatives for "{prefix}" in names (first = default)
    dims:                               # extra / overriding size names (see .dims)
      num_kv_heads: [n_kv_heads]
    attributes: {norm: rmsnorm}         # free-form facts for cross-family code (documented per family)
    ignore: ['\\.rotary_emb\\.inv_freq$']  # regexes of known non-parameter buffers
    passthrough: ['^vision_tower\\.']    # regexes of parameters kept verbatim, outside the namespace
    detect:                             # optional: tensor-name-only detection signature
      require: ['q_proj\\.bias$']         # regexes; all must match some name
      forbid: ['o_proj\\.bias$']          # regexes; none may match any name
    tensors:
      - name: "{prefix}layers.{layer}.attn.wo.weight"   # template; {layer} = block index
        role: attn.o.weight                             # canonical "<role>.<param>"
        required: true                                  # counted by the completeness check
      - name: "h.{layer}.mlp.c_proj.weight"
        role: mlp.down.weight
        transpose: true                                 # stored [in, out] -> canonical [out, in]
      - name: "{prefix}layers.{layer}.attn.wqkv.weight"
        split:                                          # fused tensor
          axis: 0                                       # axis in canonical orientation
          layout: concat                                # or interleave (+ groups: <expr>)
          parts:
            - [attn.q.weight, "num_heads * head_dim"]   # [role.param, size expr | null]
            - [attn.k.weight, "num_kv_heads * head_dim"]
            - [attn.v.weight, "num_kv_heads * head_dim"]

Each ``<role>.<param>`` may be produced by one entry only.  Instead of ``name`` a tensor may
give ``pattern`` (a full-match regex, with a named group
``layer`` for per-layer tensors; ``{prefix}`` is substituted) *and* ``name`` (the template
used when writing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from .errors import CanonicalKeyError, FusedTensorError, MappingFileError, UnknownTensorError
from .fused import SplitPart, SplitSpec
from .roles import PARAMS, CanonicalKey, is_known_role, role_scope

__all__ = ["TensorRule", "Family", "RuleMatch"]

_TEMPLATE_FIELD = re.compile(r"\{(\w*)\}")


def _template_to_regex(template: str, prefix: str) -> str:
    out, pos = [], 0
    for m in _TEMPLATE_FIELD.finditer(template):
        out.append(re.escape(template[pos : m.start()]))
        f = m.group(1)
        if f == "layer":
            out.append(r"(?P<layer>\d+)")
        elif f == "prefix":
            out.append(re.escape(prefix))
        else:
            raise MappingFileError(f"unknown placeholder {{{f}}} in tensor name template {template!r}")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return "".join(out)


def _fill(template: str, prefix: str, layer: int | None) -> str:
    s = template.replace("{prefix}", prefix)
    if "{layer}" in s:
        if layer is None:
            raise CanonicalKeyError(f"template {template!r} needs a layer index")
        s = s.replace("{layer}", str(layer))
    return s


@dataclass(frozen=True)
class TensorRule:
    """One stored-tensor pattern and the canonical tensor(s) it holds."""

    template: str
    role_param: str | None = None
    split: SplitSpec | None = None
    transpose: bool = False
    required: bool = False
    pattern: str | None = None

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.template

    @property
    def role_params(self) -> tuple[str, ...]:
        """``"<role>.<param>"`` of every canonical tensor held, in part order."""
        if self.split is not None:
            return tuple(p.role_param for p in self.split.parts)
        assert self.role_param is not None
        return (self.role_param,)

    def keys(self, layer: int | None) -> tuple[CanonicalKey, ...]:
        return tuple(CanonicalKey.from_role_param(rp, layer) for rp in self.role_params)

    def to_spec(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.template}
        if self.pattern is not None:
            d["pattern"] = self.pattern
        if self.split is None:
            d["role"] = self.role_param
        else:
            s: dict[str, Any] = {"axis": self.split.axis, "layout": self.split.layout}
            if self.split.groups is not None:
                s["groups"] = self.split.groups
            s["parts"] = [[p.role_param, p.size] for p in self.split.parts]
            d["split"] = s
        if self.transpose:
            d["transpose"] = True
        if self.required:
            d["required"] = True
        return d


@dataclass(frozen=True)
class RuleMatch:
    """A stored name matched against a rule."""

    name: str
    rule: TensorRule
    layer: int | None

    @property
    def keys(self) -> tuple[CanonicalKey, ...]:
        return self.rule.keys(self.layer)


def _as_str_list(v: Any, what: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        return tuple(v)
    raise MappingFileError(f"{what} must be a string or a list of strings, got {v!r}")


def _check_keys(d: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    extra = sorted(set(d) - set(allowed))
    if extra:
        raise MappingFileError(f"{where}: unknown field(s) {extra} (allowed: {sorted(allowed)})")


def _check_role_param(rp: Any, per_layer: bool, where: str) -> str:
    if not isinstance(rp, str):
        raise MappingFileError(f"{where}: role must be a string like 'attn.q.weight', got {rp!r}")
    role, dot, param = rp.rpartition(".")
    if not dot or not role:
        raise MappingFileError(f"{where}: role {rp!r} must be '<role>.<param>' (e.g. 'attn.q.weight')")
    if not is_known_role(role):
        raise MappingFileError(f"{where}: unknown role {role!r} (use a vocabulary role or 'custom.<name>')")
    if param not in PARAMS:
        raise MappingFileError(f"{where}: role {rp!r} must end in one of {PARAMS}")
    scope = role_scope(role)
    if scope == "layer" and not per_layer:
        raise MappingFileError(f"{where}: role {role!r} is per-layer but the name has no {{layer}}")
    if scope == "global" and per_layer:
        raise MappingFileError(f"{where}: role {role!r} is global but the name has {{layer}}")
    return rp


def _parse_rule(t: Any, i: int, family: str) -> TensorRule:
    where = f"family {family!r}, tensors[{i}]"
    if not isinstance(t, Mapping):
        raise MappingFileError(f"{where}: expected a mapping, got {t!r}")
    _check_keys(t, ("name", "pattern", "role", "split", "transpose", "required"), where)
    template = t.get("name")
    if not isinstance(template, str) or not template:
        raise MappingFileError(f"{where}: 'name' (the tensor name template) is required")
    where = f"{where} ({template})"
    _template_to_regex(template, "")  # validates placeholders
    per_layer = "{layer}" in template
    pattern = t.get("pattern")
    if pattern is not None:
        if not isinstance(pattern, str):
            raise MappingFileError(f"{where}: 'pattern' must be a string")
        try:
            rx = re.compile(pattern.replace("{prefix}", ""))
        except re.error as e:
            raise MappingFileError(f"{where}: bad regex {pattern!r}: {e}") from None
        if per_layer != ("layer" in rx.groupindex):
            raise MappingFileError(
                f"{where}: 'pattern' must have a named group (?P<layer>...) exactly when 'name' has {{layer}}"
            )
    has_role, has_split = "role" in t, "split" in t
    if has_role == has_split:
        raise MappingFileError(f"{where}: give exactly one of 'role' or 'split'")
    transpose = t.get("transpose", False)
    required = t.get("required", False)
    if not isinstance(transpose, bool) or not isinstance(required, bool):
        raise MappingFileError(f"{where}: 'transpose' and 'required' must be true/false")
    split = None
    role_param = None
    if has_role:
        role_param = _check_role_param(t["role"], per_layer, where)
    else:
        s = t["split"]
        if not isinstance(s, Mapping):
            raise MappingFileError(f"{where}: 'split' must be a mapping")
        _check_keys(s, ("axis", "layout", "groups", "parts"), f"{where}.split")
        raw_parts = s.get("parts")
        if not isinstance(raw_parts, (list, tuple)) or len(raw_parts) < 2:
            raise MappingFileError(f"{where}: split.parts must list at least two [role, size] entries")
        parts = []
        rp: Any  # a role name, checked by _check_role_param
        for j, p in enumerate(raw_parts):
            if isinstance(p, str):
                rp, size = p, None
            elif isinstance(p, Mapping):
                _check_keys(p, ("role", "size"), f"{where}.split.parts[{j}]")
                rp, size = p.get("role"), p.get("size")
            elif isinstance(p, (list, tuple)) and len(p) == 2:
                rp, size = p
            else:
                raise MappingFileError(f"{where}: split.parts[{j}] must be [role, size], {{role, size}} or a role")
            parts.append(SplitPart(_check_role_param(rp, per_layer, f"{where}.split.parts[{j}]"), size))
        axis = s.get("axis", 0)
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise MappingFileError(f"{where}: split.axis must be an integer")
        split = SplitSpec(tuple(parts), axis, s.get("layout", "concat"), s.get("groups"))
        if len({p.role_param for p in parts}) != len(parts):
            raise MappingFileError(f"{where}: split parts repeat a role")
    return TensorRule(template, role_param, split, transpose, required, pattern)


@dataclass(frozen=True)
class Family:
    """A model family's tensor table, bound to one name prefix.

    Build with :meth:`from_spec`; get the built-in ones with
    :func:`merge_fast.arch.get_family` or :func:`merge_fast.arch.detect_family`.
    """

    name: str
    rules: tuple[TensorRule, ...]
    model_types: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ("",)
    prefix: str = ""
    dims: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    attributes: Mapping[str, Any] = field(default_factory=dict)
    ignore: tuple[str, ...] = ()
    passthrough: tuple[str, ...] = ()
    detect_require: tuple[str, ...] = ()
    detect_forbid: tuple[str, ...] = ()
    description: str = ""
    _compiled: Any = field(default=None, repr=False, compare=False, hash=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], *, source: str = "<spec>") -> "Family":
        """Validate a spec mapping (see module docstring) and build the family.

        Raises :class:`MappingFileError` naming ``source`` and the offending entry.
        """
        if not isinstance(spec, Mapping):
            raise MappingFileError(f"{source}: a family spec must be a mapping, got {type(spec).__name__}")
        allowed = ("merge_fast_arch", "family", "description", "match", "prefixes", "dims", "attributes",
                   "ignore", "passthrough", "detect", "tensors")
        try:
            _check_keys(spec, allowed, source)
            name = spec.get("family")
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
                raise MappingFileError(f"{source}: 'family' must be a simple name, got {name!r}")
            version = spec.get("merge_fast_arch", 1)
            if version != 1:
                raise MappingFileError(f"{source}: unsupported merge_fast_arch version {version!r} (expected 1)")
            match = spec.get("match") or {}
            if not isinstance(match, Mapping):
                raise MappingFileError(f"{source}: 'match' must be a mapping")
            _check_keys(match, ("model_type", "architectures"), f"{source}.match")
            prefixes = _as_str_list(spec.get("prefixes", [""]), f"{source}.prefixes") or ("",)
            dims_raw = spec.get("dims") or {}
            if not isinstance(dims_raw, Mapping):
                raise MappingFileError(f"{source}: 'dims' must be a mapping of name -> expression(s)")
            from .dims import check_expr

            dims: dict[str, tuple[Any, ...]] = {}
            for k, v in dims_raw.items():
                alts = tuple(v) if isinstance(v, (list, tuple)) else (v,)
                if not alts:
                    raise MappingFileError(f"{source}: dims.{k} is empty")
                for a in alts:
                    check_expr(a)
                dims[str(k)] = alts
            attributes = spec.get("attributes") or {}
            if not isinstance(attributes, Mapping):
                raise MappingFileError(f"{source}: 'attributes' must be a mapping")
            ignore = _as_str_list(spec.get("ignore"), f"{source}.ignore")
            passthrough = _as_str_list(spec.get("passthrough"), f"{source}.passthrough")
            detect = spec.get("detect") or {}
            if not isinstance(detect, Mapping):
                raise MappingFileError(f"{source}: 'detect' must be a mapping")
            _check_keys(detect, ("require", "forbid"), f"{source}.detect")
            require = _as_str_list(detect.get("require"), f"{source}.detect.require")
            forbid = _as_str_list(detect.get("forbid"), f"{source}.detect.forbid")
            for rx in (*ignore, *passthrough, *require, *forbid):
                try:
                    re.compile(rx)
                except re.error as e:
                    raise MappingFileError(f"{source}: bad regex {rx!r}: {e}") from None
            tensors = spec.get("tensors")
            if not isinstance(tensors, (list, tuple)) or not tensors:
                raise MappingFileError(f"{source}: 'tensors' must be a non-empty list")
            rules = tuple(_parse_rule(t, i, name) for i, t in enumerate(tensors))
            fam = cls(
                name=name,
                rules=rules,
                model_types=_as_str_list(match.get("model_type"), f"{source}.match.model_type"),
                architectures=_as_str_list(match.get("architectures"), f"{source}.match.architectures"),
                prefixes=prefixes,
                prefix=prefixes[0],
                dims=dims,
                attributes=dict(attributes),
                ignore=ignore,
                passthrough=passthrough,
                detect_require=require,
                detect_forbid=forbid,
                description=str(spec.get("description", "")),
            )
            fam._tables()  # validate duplicates / compile now
            return fam
        except MappingFileError as e:
            if str(e).startswith(source):
                raise
            raise MappingFileError(f"{source}: {e}") from None

    def to_spec(self) -> dict[str, Any]:
        """The spec mapping this family was built from (YAML/JSON-able)."""
        d: dict[str, Any] = {"merge_fast_arch": 1, "family": self.name}
        if self.description:
            d["description"] = self.description
        d["match"] = {"model_type": list(self.model_types), "architectures": list(self.architectures)}
        d["prefixes"] = list(self.prefixes)
        if self.dims:
            d["dims"] = {k: list(v) for k, v in self.dims.items()}
        if self.attributes:
            d["attributes"] = dict(self.attributes)
        if self.ignore:
            d["ignore"] = list(self.ignore)
        if self.passthrough:
            d["passthrough"] = list(self.passthrough)
        if self.detect_require or self.detect_forbid:
            d["detect"] = {"require": list(self.detect_require), "forbid": list(self.detect_forbid)}
        d["tensors"] = [r.to_spec() for r in self.rules]
        return d

    def bind(self, prefix: str) -> "Family":
        """The same family reading/writing names under ``prefix`` (one of :attr:`prefixes`)."""
        if prefix == self.prefix:
            return self
        if prefix not in self.prefixes:
            raise MappingFileError(f"family {self.name!r}: prefix {prefix!r} not among {list(self.prefixes)}")
        return replace(self, prefix=prefix, _compiled=None)

    def bind_to_names(self, names: Iterable[str]) -> "Family":
        """Bind to the prefix under which most of ``names`` are recognised (ties: the default)."""
        names = list(names)
        best, best_n = self.prefix, -1
        for p in dict.fromkeys((self.prefix, *self.prefixes)):
            fam = self.bind(p)
            n = sum(1 for nm in names if fam.match(nm) is not None)
            if n > best_n:
                best, best_n = p, n
        return self.bind(best)

    # ------------------------------------------------------------------ lookups
    def _tables(self) -> Any:
        if self._compiled is not None:
            return self._compiled
        compiled = []
        by_role: dict[str, tuple[TensorRule, int]] = {}
        for rule in self.rules:
            if rule.pattern is not None:
                rx = re.compile(rule.pattern.replace("{prefix}", re.escape(self.prefix)))
            else:
                rx = re.compile(_template_to_regex(rule.template, self.prefix))
            compiled.append((rx, rule))
            for i, rp in enumerate(rule.role_params):
                if rp in by_role:
                    raise MappingFileError(
                        f"family {self.name!r}: role {rp!r} is produced by both "
                        f"{by_role[rp][0].template!r} and {rule.template!r}"
                    )
                by_role[rp] = (rule, i)
        ignore = [re.compile(r) for r in self.ignore]
        passthrough = [re.compile(r) for r in self.passthrough]
        tables = (compiled, by_role, ignore, passthrough)
        object.__setattr__(self, "_compiled", tables)
        return tables

    def match(self, name: str) -> RuleMatch | None:
        """The rule a stored tensor name falls under, or ``None``."""
        compiled = self._tables()[0]
        for rx, rule in compiled:
            m = rx.fullmatch(name)
            if m:
                layer = int(m.group("layer")) if rule.per_layer else None
                return RuleMatch(name, rule, layer)
        return None

    def is_ignored(self, name: str) -> bool:
        """True for known non-parameter buffers (rotary ``inv_freq``, causal-mask ``attn.bias``...)."""
        return any(rx.search(name) for rx in self._tables()[2])

    def is_passthrough(self, name: str) -> bool:
        """True for parameters the family keeps verbatim outside the namespace (e.g. a vision tower)."""
        return any(rx.search(name) for rx in self._tables()[3])

    def to_canonical(self, name: str) -> tuple[CanonicalKey, ...] | None:
        """Canonical key(s) held by a stored tensor: one key, or several for a fused tensor.

        ``None`` when the name is not in this family's table (including ignored buffers).
        """
        m = self.match(name)
        return None if m is None else m.keys

    def canonical_key(self, name: str) -> CanonicalKey | None:
        """The single canonical key of an unfused stored tensor (``None`` if unknown).

        Raises :class:`FusedTensorError` for a fused tensor (use :meth:`to_canonical`).
        """
        m = self.match(name)
        if m is None:
            return None
        if m.rule.split is not None:
            raise FusedTensorError(
                f"{name} is fused ({', '.join(m.rule.role_params)}); use to_canonical() for all its keys"
            )
        return m.keys[0]

    def rule_for(self, key: "CanonicalKey | str") -> tuple[TensorRule, int]:
        """``(rule, part index)`` of the stored tensor that holds ``key``."""
        k = CanonicalKey.parse(key)
        by_role = self._tables()[1]
        hit = by_role.get(k.role_param)
        if hit is None:
            raise UnknownTensorError(f"family {self.name!r} has no tensor for canonical key {str(k)!r}", [str(k)])
        rule, i = hit
        if rule.per_layer != (k.layer is not None):
            raise UnknownTensorError(
                f"family {self.name!r}: {str(k)!r} has the wrong layer scope for {rule.template!r}", [str(k)]
            )
        return rule, i

    def from_canonical(self, key: "CanonicalKey | str") -> str:
        """Stored tensor name holding ``key`` (for a fused part: the fused tensor's name)."""
        k = CanonicalKey.parse(key)
        rule, _ = self.rule_for(k)
        return _fill(rule.template, self.prefix, k.layer)

    def is_fused(self, name: str) -> bool:
        """True when the stored tensor holds several canonical tensors."""
        m = self.match(name)
        return m is not None and m.rule.split is not None

    @property
    def has_fused(self) -> bool:
        return any(r.split is not None for r in self.rules)

    def required_keys(self, num_layers: int) -> list[CanonicalKey]:
        """Canonical keys every checkpoint of this family must have (rules marked ``required``)."""
        out: list[CanonicalKey] = []
        for rule in self.rules:
            if not rule.required:
                continue
            if rule.per_layer:
                for i in range(num_layers):
                    out.extend(rule.keys(i))
            else:
                out.extend(rule.keys(None))
        return out

    def roles(self) -> tuple[str, ...]:
        """Every ``"<role>.<param>"`` this family can hold."""
        by_role = self._tables()[1]
        return tuple(by_role)

    def resolve_dims(self, config: Mapping[str, Any] | None) -> dict[str, int]:
        """Dimensions (``num_heads``, ``head_dim``, ...) for ``config`` using this family's overrides."""
        from .dims import resolve_dims

        return resolve_dims(config, self.dims)

    def __hash__(self) -> int:
        return hash((self.name, self.prefix, self.rules))

    def __repr__(self) -> str:
        return f"Family({self.name!r}, prefix={self.prefix!r}, {len(self.rules)} tensor rules)"
