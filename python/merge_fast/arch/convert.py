"""Stored names <-> canonical keys, eagerly (numpy) or as lazy recipes.

Reading side::

    plan = plan_canonical({name: shape, ...}, config)     # no data needed (safetensors header)
    plan.recipes["layers.0.attn.q.weight"]               # -> Recipe(source=..., ranges=..., transpose=...)
    canon = canonicalize({name: array, ...}, config)      # CanonicalDict[str, np.ndarray]

Writing side::

    out = plan_decanonical({key: shape, ...}, config, family, source_family="phi3")
    tensors = decanonicalize(canon, config, family)       # {stored name: np.ndarray}

Tensors a family does not know (``unknown``):

* ``"error"`` (default): :class:`UnknownTensorError` listing them;
* ``"passthrough"``: kept verbatim under the key ``"passthrough." + name`` and written back
  under the original name by :func:`decanonicalize` when the target family is the source
  family (for another family they count as unused keys);
* ``"drop"``: left out and listed in ``CanonicalDict.dropped``.

Known non-parameter buffers (rotary ``inv_freq``, GPT-2/NeoX causal-mask ``attn.bias``,
BERT ``position_ids``) follow ``buffers`` (``"drop"`` by default, or ``"passthrough"``).
Tensors matching the family's ``passthrough`` regexes (e.g. Gemma-3's vision tower) are
always kept as ``passthrough.<name>``.

Fused tensors (Phi-3 ``qkv_proj``/``gate_up_proj``, GPT-NeoX ``query_key_value``, GPT-2
``c_attn``) are split on the way in.  On the way out they are re-fused only when the
canonical tensors come from the same family (known from ``CanonicalDict.family`` or the
``source_family`` argument); otherwise :class:`FusedTensorError` is raised unless
``allow_cross_family_fuse=True``.  Part sizes are always checked against the target config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np

from .detect import detect_family
from .errors import ArchError, FusedTensorError, MissingTensorError, UnknownTensorError
from .families import get_family
from .family import Family, TensorRule
from .fused import OutputRecipe, Recipe, Segment, apply_output_recipe, apply_recipe, fuse_recipe, split_recipes
from .roles import CanonicalKey

__all__ = [
    "PASSTHROUGH_PREFIX",
    "CanonicalPlan",
    "CanonicalDict",
    "plan_canonical",
    "canonicalize",
    "plan_decanonical",
    "decanonicalize",
    "missing_keys",
    "check_complete",
]

#: Key prefix of tensors kept verbatim with ``unknown="passthrough"``.
PASSTHROUGH_PREFIX = "passthrough."

Unknown = Literal["error", "passthrough", "drop"]
Buffers = Literal["drop", "passthrough"]
Unused = Literal["error", "ignore"]


@dataclass(frozen=True)
class CanonicalPlan:
    """Result of :func:`plan_canonical`.

    ``recipes`` maps each canonical key (and ``passthrough.<name>`` keys) to the
    :class:`Recipe` that produces it; ``dropped`` lists stored names that produce nothing.
    """

    family: Family
    recipes: dict[str, Recipe]
    passthrough: tuple[str, ...]
    dropped: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for the Rust engine."""
        return {
            "family": self.family.name,
            "prefix": self.family.prefix,
            "recipes": {k: r.to_dict() for k, r in self.recipes.items()},
            "passthrough": list(self.passthrough),
            "dropped": list(self.dropped),
        }


class CanonicalDict(dict):  # dict[str, np.ndarray]
    """``dict`` of canonical key -> array that remembers where it came from.

    Attributes:
        family: the (prefix-bound) source :class:`Family`.
        passthrough: stored names kept verbatim (under ``passthrough.<name>``).
        dropped: stored names left out (buffers, or unknown with ``unknown="drop"``).

    Plain ``dict(...)`` copies lose these attributes; pass ``source_family=`` to
    :func:`decanonicalize` in that case.
    """

    family: Family
    passthrough: tuple[str, ...]
    dropped: tuple[str, ...]

    def __init__(self, *args: Any, family: Family, passthrough: Sequence[str] = (), dropped: Sequence[str] = (),
                 **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.family = family
        self.passthrough = tuple(passthrough)
        self.dropped = tuple(dropped)


def _resolve_family(family: "Family | str | None", config: Mapping[str, Any] | None, names: list[str]) -> Family:
    if family is None:
        return detect_family(config, names)
    if isinstance(family, str):
        return get_family(family).bind_to_names(names) if names else get_family(family)
    if names and not any(family.match(n) for n in names):
        return family.bind_to_names(names)
    return family


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in (x.shape if hasattr(x, "shape") else x))


def _preview(names: Sequence[str], n: int = 8) -> str:
    s = ", ".join(repr(x) for x in names[:n])
    return s + (f", ... ({len(names)} in all)" if len(names) > n else "")


def plan_canonical(
    shapes: Mapping[str, Any],
    config: Mapping[str, Any] | None,
    family: "Family | str | None" = None,
    *,
    unknown: Unknown = "error",
    buffers: Buffers = "drop",
) -> CanonicalPlan:
    """Recipes for every canonical tensor of a checkpoint, from names and shapes only.

    Args:
        shapes: stored name -> shape (a sequence of ints, or anything with ``.shape``).
        config: the checkpoint's ``config.json`` (used for detection and fused sizes).
        family: a :class:`Family`, a family name, or ``None`` to detect it.
        unknown, buffers: policies, see the module docstring.

    Raises:
        UnknownFamilyError, UnknownTensorError, FusedTensorError.
    """
    if unknown not in ("error", "passthrough", "drop"):
        raise ArchError(f"unknown= must be 'error', 'passthrough' or 'drop', got {unknown!r}")
    if buffers not in ("drop", "passthrough"):
        raise ArchError(f"buffers= must be 'drop' or 'passthrough', got {buffers!r}")
    names = list(shapes)
    fam = _resolve_family(family, config, names)
    cfg = config or {}
    dims = fam.resolve_dims(cfg)
    recipes: dict[str, Recipe] = {}
    passthrough: list[str] = []
    dropped: list[str] = []
    unknown_names: list[str] = []
    origin: dict[str, str] = {}
    for name in names:
        shape = _shape(shapes[name])
        m = fam.match(name)
        if m is None:
            if fam.is_passthrough(name):
                policy: str = "passthrough"
            elif fam.is_ignored(name):
                policy = buffers
            else:
                policy = unknown
            if policy == "error":
                unknown_names.append(name)
            elif policy == "passthrough":
                passthrough.append(name)
                recipes[PASSTHROUGH_PREFIX + name] = Recipe(PASSTHROUGH_PREFIX + name, name, shape, shape)
            else:
                dropped.append(name)
            continue
        keys = [str(k) for k in m.keys]
        rule = m.rule
        if rule.split is not None:
            rs = split_recipes(rule.split, name, shape, keys, rule.transpose, dims, cfg)
        else:
            if rule.transpose and len(shape) != 2:
                raise FusedTensorError(f"{name}: expected a 2-D tensor to transpose, got shape {shape}")
            out_shape = tuple(reversed(shape)) if rule.transpose else shape
            rs = [Recipe(keys[0], name, shape, out_shape, None, (), rule.transpose)]
        for r in rs:
            if r.key in origin:
                raise UnknownTensorError(
                    f"tensors {origin[r.key]!r} and {name!r} both map to canonical key {r.key!r}", [origin[r.key], name]
                )
            origin[r.key] = name
            recipes[r.key] = r
    if unknown_names:
        raise UnknownTensorError(
            f"{len(unknown_names)} tensor(s) not in the {fam.name!r} table (prefix {fam.prefix!r}): "
            f"{_preview(unknown_names)}. Pass unknown='passthrough' or 'drop', or describe them in a mapping file.",
            unknown_names,
        )
    return CanonicalPlan(fam, recipes, tuple(passthrough), tuple(dropped))


def canonicalize(
    tensors: Mapping[str, np.ndarray],
    config: Mapping[str, Any] | None,
    family: "Family | str | None" = None,
    *,
    unknown: Unknown = "error",
    buffers: Buffers = "drop",
) -> CanonicalDict:
    """Map a checkpoint's tensors onto canonical keys (pure slicing: bit-exact, any dtype).

    Unfused, untransposed tensors are returned as is (no copy); split and transposed ones
    are new contiguous arrays.  See :func:`plan_canonical` for the arguments.
    """
    plan = plan_canonical(tensors, config, family, unknown=unknown, buffers=buffers)
    out = CanonicalDict(family=plan.family, passthrough=plan.passthrough, dropped=plan.dropped)
    for key, r in plan.recipes.items():
        arr = tensors[r.source]
        out[key] = arr if r.is_identity else apply_recipe(r, np.asarray(arr))
    return out


def _source_name(source_family: "Family | str | None", canon: Any) -> str | None:
    if isinstance(source_family, Family):
        return source_family.name
    if isinstance(source_family, str):
        return source_family
    fam = getattr(canon, "family", None)
    return fam.name if isinstance(fam, Family) else None


def plan_decanonical(
    shapes: Mapping[str, Any],
    config: Mapping[str, Any] | None,
    family: "Family | str",
    *,
    source_family: "Family | str | None" = None,
    allow_cross_family_fuse: bool = False,
    unused: Unused = "error",
) -> dict[str, OutputRecipe]:
    """Output recipes (stored name -> :class:`OutputRecipe`) for canonical keys and shapes.

    Args:
        shapes: canonical key (or ``passthrough.<name>``) -> canonical shape.
        config: the *target* config (fused part sizes are checked against it).
        family: target :class:`Family` (its bound prefix is used) or family name.
        source_family: the family the canonical tensors were read from (needed to re-fuse).
        allow_cross_family_fuse: re-fuse even when the source family differs / is unknown.
        unused: ``"error"`` (default) or ``"ignore"`` for keys the target family cannot hold.

    Raises:
        UnknownTensorError, MissingTensorError, FusedTensorError.
    """
    fam = get_family(family) if isinstance(family, str) else family
    source_family = _source_name(source_family, None)
    cfg = config or {}
    dims = fam.resolve_dims(cfg)
    groups: dict[tuple[int, int | None], dict[int, str]] = {}
    rules: dict[tuple[int, int | None], TensorRule] = {}
    unused_keys: list[str] = []
    out: dict[str, OutputRecipe] = {}
    rule_index = {id(r): i for i, r in enumerate(fam.rules)}
    for key in shapes:
        if key.startswith(PASSTHROUGH_PREFIX):
            if source_family == fam.name:
                name = key[len(PASSTHROUGH_PREFIX):]
                out[name] = OutputRecipe(name, _shape(shapes[key]), (Segment(key, 0, 0),))
            else:
                unused_keys.append(key)
            continue
        try:
            rule, idx = fam.rule_for(key)
        except UnknownTensorError:
            unused_keys.append(key)
            continue
        layer = CanonicalKey.parse(key).layer
        g = (rule_index[id(rule)], layer)
        groups.setdefault(g, {})[idx] = key
        rules[g] = rule
    cross = [k for k in unused_keys if not k.startswith(PASSTHROUGH_PREFIX) and CanonicalKey.parse(k).role.startswith("cross_attn")]
    if cross and unused == "error":
        raise UnknownTensorError(
            f"refusing to write cross-attention into {fam.name!r}: {_preview(cross)} attend over an encoder's output "
            f"(encoder-decoder source {source_family or 'model'!r}), and {fam.name!r} is decoder-only, with no "
            "cross-attention and no encoder to feed it. Only the decoder's self-attention (attn.*) and MLP (mlp.*) "
            "roles carry over; drop the cross_attn.* keys or pass unused='ignore' to leave them out.",
            cross,
        )
    if unused_keys and unused == "error":
        raise UnknownTensorError(
            f"{len(unused_keys)} canonical key(s) have no place in family {fam.name!r}: {_preview(unused_keys)}"
            " (pass unused='ignore' to leave them out)",
            unused_keys,
        )
    for g, parts in groups.items():
        rule = rules[g]
        layer = g[1]
        name = fam.from_canonical(next(iter(parts.values())))
        if rule.split is None:
            key = parts[0]
            shape = _shape(shapes[key])
            if rule.transpose:
                if len(shape) != 2:
                    raise FusedTensorError(f"{key}: expected a 2-D tensor to transpose into {name}, got {shape}")
                shape = tuple(reversed(shape))
            out[name] = OutputRecipe(name, shape, (Segment(key, 0, 0),), None, rule.transpose)
            continue
        if not allow_cross_family_fuse and source_family != fam.name:
            raise FusedTensorError(
                f"refusing to fuse {name} ({fam.name!r}) from canonical tensors of "
                f"{'an unknown family' if source_family is None else repr(source_family)}: the fused layout is only "
                f"re-created for the family it was read from. Pass source_family={fam.name!r} if they do come from "
                f"{fam.name!r}, or allow_cross_family_fuse=True."
            )
        keys = [str(k) for k in rule.keys(layer)]
        missing = [k for i, k in enumerate(keys) if i not in parts]
        if missing:
            raise MissingTensorError(f"cannot build fused {name}: missing canonical {missing}", missing)
        out[name] = fuse_recipe(rule.split, name, [_shape(shapes[k]) for k in keys], keys, rule.transpose, dims, cfg)
    return out


def decanonicalize(
    canon: Mapping[str, np.ndarray],
    config: Mapping[str, Any] | None,
    family: "Family | str | None" = None,
    *,
    source_family: "Family | str | None" = None,
    allow_cross_family_fuse: bool = False,
    unused: Unused = "error",
) -> dict[str, np.ndarray]:
    """Write canonical tensors back under ``family``'s stored names (bit-exact).

    ``family`` defaults to ``canon.family`` for a :class:`CanonicalDict`; a family *name*
    equal to the source family's reuses the source's name prefix.  See
    :func:`plan_decanonical` for the other arguments.
    """
    src = _source_name(source_family, canon)
    src_fam = getattr(canon, "family", None)
    if family is None:
        if not isinstance(src_fam, Family):
            raise ArchError("decanonicalize: no target family given and the input carries none")
        fam = src_fam
    elif isinstance(family, str):
        fam = src_fam if isinstance(src_fam, Family) and src_fam.name == family else get_family(family)
    else:
        fam = family
    recipes = plan_decanonical(
        {k: np.shape(v) for k, v in canon.items()}, config, fam,
        source_family=src, allow_cross_family_fuse=allow_cross_family_fuse, unused=unused,
    )
    out: dict[str, np.ndarray] = {}
    for name, r in recipes.items():
        if r.axis is None and not r.transpose:
            out[name] = canon[r.segments[0].key]
        else:
            out[name] = apply_output_recipe(r, canon)
    return out


def missing_keys(
    keys: Iterable[str], config: Mapping[str, Any] | None, family: "Family | str", num_layers: int | None = None
) -> list[str]:
    """Required canonical keys (see ``required`` in the family table) absent from ``keys``.

    The layer count comes from ``num_layers``, else the config, else the keys themselves.
    """
    fam = get_family(family) if isinstance(family, str) else family
    have = set(keys)
    if num_layers is None:
        num_layers = fam.resolve_dims(config or {}).get("num_layers")
    if num_layers is None:
        layers = [CanonicalKey.parse(k).layer for k in have if not k.startswith(PASSTHROUGH_PREFIX)]
        num_layers = max((x for x in layers if x is not None), default=-1) + 1
    return [str(k) for k in fam.required_keys(num_layers) if str(k) not in have]


def check_complete(canon: Mapping[str, Any], config: Mapping[str, Any] | None, family: "Family | str | None" = None) -> None:
    """Raise :class:`MissingTensorError` if a required canonical key is absent."""
    fam = family if family is not None else getattr(canon, "family", None)
    if fam is None:
        raise ArchError("check_complete: no family given and the input carries none")
    miss = missing_keys(canon.keys(), config, fam)
    if miss:
        name = fam if isinstance(fam, str) else fam.name
        raise MissingTensorError(f"{len(miss)} required canonical tensor(s) missing for {name!r}: {_preview(miss)}", miss)
