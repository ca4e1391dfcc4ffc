"""What each mergekit method accepts: which inputs (a base or not, how many models) and
which parameters, per model or shared, with their types and defaults. This is the config
layer's schema only; the math lives in the Rust kernels, which receive the parameters
under the same names (per-model ones as one list entry per non-base input).

Methods in ``merge_fast._core.METHODS`` that are not listed here (merge_fast's own, e.g.
the Fisher merges) are passed through: a parameter set at model level becomes a per-model
list, any other parameter a shared scalar, and the kernel validates them.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

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


def _gta(normalize: bool, rescale: bool, **extra: Param) -> Dict[str, Param]:
    p = {
        "int8_mask": Param("bool", False),
        "normalize": Param("bool", normalize),
        "rescale": Param("bool", rescale),
        "lambda": Param("float", 1.0),
        "weight": Param("float", REQUIRED, per_model=True),
        "density": Param("float", 1.0, per_model=True),
        # merge_fast's options beyond mergekit (see merge_fast.methods.sparsified)
        "rescale_mode": Param("str", None),
        "disjoint_mean": Param("str", None),
        "consensus": Param("str", None),
    }
    p.update(extra)
    return p


_SPECS = [
    MethodSpec("linear", "ignored", params={"normalize": Param("bool", True), "weight": Param("float", per_model=True)}),
    MethodSpec("slerp", "required", min_inputs=2, max_inputs=2, params={"t": Param("float")}),
    MethodSpec("nearswap", "required", min_inputs=2, max_inputs=2, params={"t": Param("float")}),
    MethodSpec("passthrough", "ignored", min_inputs=1, max_inputs=1, params={"scale": Param("float", None, per_model=True)}),
    MethodSpec("task_arithmetic", "required", params=_gta(False, False)),
    MethodSpec("ties", "required", params=_gta(True, False)),
    MethodSpec("dare_ties", "required", params=_gta(False, True)),
    MethodSpec("dare_linear", "required", params=_gta(False, True)),
    MethodSpec("breadcrumbs", "required", params=_gta(False, False, gamma=Param("float", 0.01, per_model=True))),
    MethodSpec("breadcrumbs_ties", "required", params=_gta(False, False, gamma=Param("float", 0.01, per_model=True))),
    MethodSpec("della", "required", params=_gta(True, True, epsilon=Param("float", 0.15, per_model=True))),
    MethodSpec("della_linear", "required", params=_gta(False, True, epsilon=Param("float", 0.15, per_model=True))),
    MethodSpec("sce", "required", params={"int8_mask": Param("bool", False), "select_topk": Param("float", 1.0)}),
    MethodSpec("model_stock", "required", min_inputs=3, params={
        "filter_wise": Param("bool", False), "clamp_cosine": Param("bool", False)}),
    MethodSpec("nuslerp", "optional", min_non_base=2, max_non_base=2, params={
        "nuslerp_row_wise": Param("bool", False), "nuslerp_flatten": Param("bool", True),
        "weight": Param("float", per_model=True)}),
    MethodSpec("multislerp", "optional", min_non_base=1, params={
        "normalize_weights": Param("bool", True), "eps": Param("float", 1e-8), "weight": Param("float", per_model=True)}),
    MethodSpec("karcher", "ignored", params={"max_iter": Param("int", 10), "tol": Param("float", 1e-5)}),
    MethodSpec("arcee_fusion", "required", min_inputs=2, max_inputs=2),
    MethodSpec("ram", "required", params={"epsilon": Param("float", 1e-5)}),
    MethodSpec("ramplus_tl", "required", params={
        "r": Param("float", 0.1), "alpha": Param("float", 0.2), "epsilon": Param("float", 1e-5)}),
]

MERGEKIT_METHODS: Dict[str, MethodSpec] = {s.name: s for s in _SPECS}

# Parameters accepted everywhere and dropped: memory/speed switches of mergekit with no
# effect on the result here.
NO_OP_PARAMS = ("int8_mask",)


def spec_for(name: str) -> Tuple[Optional[MethodSpec], bool]:
    """(spec or None, known_to_mergekit)."""
    s = MERGEKIT_METHODS.get(name)
    return s, s is not None
