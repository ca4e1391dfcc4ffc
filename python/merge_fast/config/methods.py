"""What each mergekit method accepts in a config: which inputs (a base or not, how many
models) and which parameters, per model or shared, with their types and defaults. Built at
import from the kernels' own specs (``merge_fast._core.method_specs()``, declared next to
each Rust kernel), which receive the parameters under the same names (per-model ones as one
list entry per non-base input); the config facts of mergekit are applied here.

Methods in ``merge_fast._core.METHODS`` that are not listed here (merge_fast's own, e.g.
the Fisher merges) are passed through: a parameter set at model level becomes a per-model
list, any other parameter a shared scalar, and the kernel validates them.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

REQUIRED = object()

# Base policies, as in mergekit: "required" (the base is a separate input), "optional"
# (used when given), "ignored" (the base, if listed, is just another input).
@dataclasses.dataclass(frozen=True)
class Param:
    kind: str  # "float" | "bool" | "int" | "str"
    default: object = REQUIRED
    per_model: bool = False
    # per-model parameters of methods with a base: not resolved for the base ("non_base")
    # or resolved for every input ("input", only for methods that ignore the base)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    base: str  # "required" | "optional" | "ignored"
    min_inputs: int = 1  # counting the base when the method takes one
    max_inputs: Optional[int] = None
    min_non_base: Optional[int] = None
    max_non_base: Optional[int] = None
    params: Dict[str, Param] = dataclasses.field(default_factory=dict)

    @property
    def uses_base(self) -> bool:
        return self.base in ("required", "optional")


# How a kernel's base rule reads in a mergekit config: a kernel that takes no base, or
# treats a given one as one more input, sees the config's base as just another model.
_BASE_POLICY = {"required": "required", "optional": "optional", "ignored": "ignored", "forbidden": "ignored"}


def _param(p: dict) -> Param:
    # mergekit's configs must give every model a weight, whatever the kernel's default
    default = REQUIRED if p["required"] or p["name"] == "weight" else p["default"]
    return Param(p["kind"], default, per_model=p["per_model"])


def _config_spec(s: dict) -> MethodSpec:
    """The config facts of one of mergekit's methods, from its kernel's spec. The config
    checks a model count only where the kernel's differs from "one or more besides the
    base" (mergekit checks those only): besides the base when the base is optional, else
    counting the base (when the method takes one)."""
    arity: Dict[str, Optional[int]] = {}
    lo, hi = s["min_models"], s["max_models"]
    if s["base"] == "optional":
        arity = {"min_non_base": lo, "max_non_base": hi}
    elif (lo, hi) != (1, None):
        extra = 1 if s["base"] == "required" else 0
        arity = {"min_inputs": lo + extra, "max_inputs": None if hi is None else hi + extra}
    params = {p["name"]: _param(p) for p in s["params"] if p["role"] != "alias"}
    return MethodSpec(s["name"], _BASE_POLICY[s["base"]], params=params, **arity)  # type: ignore[arg-type]


def _specs() -> List[MethodSpec]:
    from .. import _core

    return [_config_spec(s) for s in _core.method_specs() if s["mergekit"]]


_SPECS = _specs()

MERGEKIT_METHODS: Dict[str, MethodSpec] = {s.name: s for s in _SPECS}

# Parameters accepted everywhere and dropped: memory/speed switches of mergekit with no
# effect on the result here.
NO_OP_PARAMS = ("int8_mask",)


def spec_for(name: str) -> Tuple[Optional[MethodSpec], bool]:
    """(spec or None, known_to_mergekit)."""
    s = MERGEKIT_METHODS.get(name)
    return s, s is not None
