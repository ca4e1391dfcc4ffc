"""Parameter values as mergekit configs write them, and their resolution per tensor.

A setting is one of:
- a scalar (number, bool, string);
- a gradient: a list of scalars, interpolated piecewise-linearly over ``t`` in [0, 1]
  (``t`` = position of the layer inside its slice; tensors outside the layers use t = 0,
  as mergekit does); booleans and strings pick ``values[int(t * (n - 1))]``;
- a conditional ``{filter: SUBSTRING, value: SETTING}`` or a list of them: the first whose
  filter is a substring of the tensor name (or is missing / ``"*"``) wins; when none
  matches the next scope is asked;
- merge_fast extension: ``{regex: PATTERN, value: SETTING}``, matched with ``re.search``
  against the tensor name (it may be mixed with ``filter`` entries in one list).

Scopes, highest precedence first: the source's (model's) ``parameters`` (only for
per-model parameters), the slice's ``parameters``, the top-level ``parameters``.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, List, Optional, Sequence, Tuple

from ._source import ConfigSource, KeyPath

_SCALARS = (bool, int, float, str)


def _is_scalar(x: Any) -> bool:
    return isinstance(x, _SCALARS)


def check_setting(src: ConfigSource, path: KeyPath, setting: Any) -> None:
    """Raises ConfigError for anything that is not a valid setting."""
    if _is_scalar(setting):
        return
    if isinstance(setting, dict):
        _check_cond(src, path, setting)
        return
    if isinstance(setting, list):
        if not setting:
            raise src.error(path, "an empty list is not a value (give a scalar, a gradient list or filters)")
        if all(_is_scalar(e) for e in setting):
            return
        if all(isinstance(e, dict) for e in setting):
            for i, e in enumerate(setting):
                _check_cond(src, path + (i,), e)
            return
        raise src.error(path, "a list must hold either scalars (a gradient) or {filter, value} entries, not a mix")
    raise src.error(path, f"unsupported value {setting!r}")


def _check_cond(src: ConfigSource, path: KeyPath, d: dict) -> None:
    for k in sorted(set(d) - {"filter", "value", "regex"}, key=str):
        # mergekit drops the key, so the entry has no filter and matches every tensor
        src.ignore(path + (k,), "a conditional value", ("filter", "regex", "value"),
                   "ignored, as mergekit does: this entry has no filter and matches every tensor")
    if "value" not in d:
        raise src.error(path, "a conditional value needs 'value'")
    if "filter" in d and "regex" in d:
        raise src.error(path, "give 'filter' (substring) or 'regex', not both")
    if "filter" in d and d["filter"] is not None and not isinstance(d["filter"], str):
        raise src.error(path + ("filter",), "filter must be a string")
    if "regex" in d:
        if not isinstance(d["regex"], str):
            raise src.error(path + ("regex",), "regex must be a string")
        try:
            re.compile(d["regex"])
        except re.error as e:
            raise src.error(path + ("regex",), f"invalid regular expression: {e}") from None
    v = d["value"]
    if isinstance(v, dict) or (isinstance(v, list) and not all(_is_scalar(e) for e in v)) or v is None:
        raise src.error(path + ("value",), "value must be a scalar or a gradient list")
    if isinstance(v, list) and not v:
        raise src.error(path + ("value",), "an empty gradient")


def _matches(cond: dict, tensor: str) -> bool:
    if "regex" in cond:
        return re.search(cond["regex"], tensor) is not None
    f = cond.get("filter")
    return f is None or f == "*" or (bool(tensor) and f in tensor)


def convert(kind: Optional[str], value: Any) -> Any:
    """Validates/converts one scalar to the parameter's type (mergekit accepts numeric
    strings such as YAML's ``1e-3``, which PyYAML reads as a string)."""
    if kind is None:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
        return value
    if kind == "str":
        if isinstance(value, str):
            return value
        raise ValueError(f"expected a string, got {value!r}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"expected true or false, got {value!r}")
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    if kind == "int":
        if float(value) != int(value):
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"expected a finite number, got {value!r}")
    return v


def evaluate(setting: Any, tensor: str, t: float, kind: Optional[str] = None) -> Any:
    """The value of one setting for one tensor at gradient position t (None: no filter
    matched)."""
    if isinstance(setting, dict):
        setting = [setting]
    if _is_scalar(setting):
        return convert(kind, setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(_is_scalar(e) for e in setting):
            values = [convert(kind, e) for e in setting]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            if not numeric:
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(values) - 1)
            i0 = int(scaled)
            i1 = min(len(values) - 1, i0 + 1)
            frac = scaled - i0
            res = (1 - frac) * values[i0] + frac * values[i1]
            return convert(kind, res) if kind != "int" else int(res)
        for cond in setting:
            if _matches(cond, tensor):
                return evaluate(cond["value"], tensor, t, kind)
        return None
    raise ValueError(f"unexpected setting {setting!r}")


Scope = Tuple[Optional[dict], KeyPath]  # (parameters dict or None, its key path)


def resolve(name: str, scopes: Iterable[Scope], tensor: str, t: float, kind: Optional[str],
            src: ConfigSource) -> Tuple[Any, Optional[KeyPath]]:
    """(value, key path it came from) from the first scope that gives one, else (None, None)."""
    for params, path in scopes:
        if params is not None and name in params:
            try:
                v = evaluate(params[name], tensor, t, kind)
            except ValueError as e:
                raise src.error(path + (name,), f"parameter '{name}': {e}") from None
            if v is not None:
                return v, path + (name,)
    return None, None


def interpolate_t(layer: int, n_layers: int) -> float:
    """mergekit's gradient position of layer `layer` (0-based) inside a slice of
    `n_layers` layers: i / (n - 1), and 1 for a one-layer slice."""
    return layer / (n_layers - 1) if n_layers > 1 else 1.0


def settings_used(settings: Sequence[Any]) -> List[Any]:
    return [s for s in settings if s is not None]
