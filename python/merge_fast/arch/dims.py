"""Model dimensions (heads, head_dim, ...) resolved from a ``config.json`` dict.

Fused-tensor split sizes are written as small arithmetic expressions over *dimension
names* (``"num_heads * head_dim"``).  A family declares how each dimension is found in the
config as a list of alternative expressions, tried in order; the first whose names all
resolve to non-``None`` values wins.  Names are looked up first among the dimensions
resolved so far, then among the config's top-level keys, then in ``config["text_config"]``
(multimodal checkpoints such as Gemma-3).

Only integer literals, names, ``+ - * // %``, parentheses and unary minus are accepted;
nothing is ever passed to ``eval``.
"""

from __future__ import annotations

import ast
from typing import Any, Mapping, Sequence, Union, cast

from .errors import MappingFileError, FusedTensorError

__all__ = ["DEFAULT_DIMS", "Expr", "resolve_dims", "eval_expr", "check_expr"]

#: An expression: an int literal or a string such as ``"hidden_size // num_heads"``.
Expr = Union[int, str]

#: Dimension names every family gets (a family's own ``dims`` entries override these).
DEFAULT_DIMS: Mapping[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_heads": ("num_attention_heads", "n_head", "num_heads"),
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads", "num_heads"),
    "head_dim": ("head_dim", "hidden_size // num_heads"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim", "4 * hidden_size"),
}

_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
}


class _Unresolved(Exception):
    pass


def _parse(expr: "int | str") -> ast.AST:
    if isinstance(expr, bool):
        raise MappingFileError(f"size expression must be an int or a string, got {expr!r}")
    if isinstance(expr, int):
        return ast.Constant(expr)
    if not isinstance(expr, str):
        raise MappingFileError(f"size expression must be an int or a string, got {expr!r}")
    try:
        tree = ast.parse(expr, mode="eval").body
    except SyntaxError as e:
        raise MappingFileError(f"bad size expression {expr!r}: {e.msg}") from None
    for node in ast.walk(tree):
        ok = isinstance(node, (ast.BinOp, ast.UnaryOp, ast.Name, ast.Load, ast.USub, ast.UAdd)) or type(node) in _BINOPS
        ok = ok or (isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool))
        if not ok:
            raise MappingFileError(f"bad size expression {expr!r}: only ints, names and + - * // % are allowed")
    return tree


def check_expr(expr: "int | str") -> None:
    """Raise :class:`MappingFileError` unless ``expr`` is a syntactically valid size expression."""
    _parse(expr)


def _eval(node: ast.AST, lookup: Mapping[str, Any]) -> int:
    if isinstance(node, ast.Constant):
        assert isinstance(node.value, int)  # _parse admits int constants only
        return int(node.value)
    if isinstance(node, ast.Name):
        v = lookup.get(node.id)
        if v is None or isinstance(v, bool) or not isinstance(v, int):
            raise _Unresolved(node.id)
        return v
    if isinstance(node, ast.UnaryOp):
        v = _eval(node.operand, lookup)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left, lookup), _eval(node.right, lookup)
        if isinstance(node.op, (ast.FloorDiv, ast.Mod)) and b == 0:
            raise _Unresolved("division by zero")
        return _BINOPS[type(node.op)](a, b)
    raise _Unresolved(type(node).__name__)  # pragma: no cover - filtered by _parse


class _Lookup(dict):
    """dims first, then config."""

    def __init__(self, dims: Mapping[str, int], config: Mapping[str, Any]) -> None:
        super().__init__()
        self.dims, self.config = dims, config

    def get(self, k: str, default: Any = None) -> Any:
        if k in self.dims:
            return self.dims[k]
        v = self.config.get(k)
        if v is None:  # multimodal configs keep the language model's sizes in text_config
            text = self.config.get("text_config")
            if isinstance(text, Mapping):
                v = text.get(k)
        return default if v is None else v


def eval_expr(expr: "int | str", dims: Mapping[str, int], config: Mapping[str, Any] | None = None) -> int:
    """Evaluate one size expression; raises :class:`FusedTensorError` if a name is missing."""
    try:
        return _eval(_parse(expr), _Lookup(dims, config or {}))
    except _Unresolved as e:
        raise FusedTensorError(
            f"cannot evaluate size expression {expr!r}: {e.args[0]!r} is not a known dimension or integer config key"
        ) from None


def resolve_dims(
    config: Mapping[str, Any] | None, overrides: Mapping[str, "int | str | Sequence[int | str]"] | None = None
) -> dict[str, int]:
    """Resolve every dimension of :data:`DEFAULT_DIMS` (plus ``overrides``) that can be found.

    Dimensions that cannot be resolved are simply absent from the result.
    """
    config = config or {}
    spec: dict[str, Sequence[int | str]] = dict(DEFAULT_DIMS)
    for k, v in (overrides or {}).items():
        spec[k] = tuple(v) if isinstance(v, (list, tuple)) else (cast("int | str", v),)  # one expression
    dims: dict[str, int] = {}
    for name, alternatives in spec.items():
        for alt in alternatives:
            try:
                dims[name] = _eval(_parse(alt), _Lookup(dims, config))
                break
            except _Unresolved:
                continue
    return dims
