"""Fused-tensor layouts and the slicing *recipes* shared by the eager and lazy paths.

A stored tensor maps to canonical tensors through at most two operations:

1. **gather** - keep a list of ``[start, stop)`` ranges along one axis of the *stored*
   tensor and concatenate them (a plain slice is one range; GPT-NeoX's per-head
   interleaved ``query_key_value`` is one range per head);
2. **transpose** - swap the two axes of a 2-D tensor (GPT-2 ``Conv1D`` weights are stored
   ``[in, out]``; canonical weights are ``[out, in]``).

A :class:`Recipe` describes that for one canonical tensor (reading side) and an
:class:`OutputRecipe` describes how one stored tensor is rebuilt from canonical tensors
(writing side).  Both are plain data (``to_dict()`` gives JSON-able dicts) so the Rust
engine can read only the byte ranges it needs: along axis 0 of a row-major tensor each
range is one contiguous block of the file.

Everything here is pure slicing/concatenation, so a split followed by a fuse reproduces the
original bits for every dtype (including ``ml_dtypes.bfloat16`` and float8 types).

Layouts of a :class:`SplitSpec` (sizes along the split axis, canonical orientation):

* ``concat``      ``[p0 | p1 | p2]``  (Phi-3 ``qkv_proj`` = q|k|v, ``gate_up_proj`` = gate|up,
  GPT-2 ``c_attn`` = q|k|v after the transpose);
* ``interleave``  ``groups`` repetitions of ``[p0 | p1 | p2]`` with per-group part sizes
  (GPT-NeoX ``query_key_value``: ``groups = num_heads``, parts ``head_dim`` each; the
  output dimension is laid out ``[heads, 3, head_dim]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from .dims import check_expr, eval_expr
from .errors import FusedTensorError, MappingFileError

__all__ = ["SplitPart", "SplitSpec", "Recipe", "Segment", "OutputRecipe", "apply_recipe", "apply_output_recipe"]

Layout = Literal["concat", "interleave"]


@dataclass(frozen=True)
class SplitPart:
    """One canonical piece of a fused tensor: ``role_param`` like ``"attn.q.weight"``.

    ``size`` is the piece's extent along the split axis (per group for ``interleave``) as
    a size expression, or ``None`` for "an equal share of what the other parts leave".
    """

    role_param: str
    size: "int | str | None" = None


@dataclass(frozen=True)
class SplitSpec:
    """How a fused tensor divides into canonical pieces (axis in canonical orientation)."""

    parts: tuple[SplitPart, ...]
    axis: int = 0
    layout: Layout = "concat"
    groups: "int | str | None" = None

    def __post_init__(self) -> None:
        if len(self.parts) < 2:
            raise MappingFileError("a fused tensor needs at least two parts")
        if self.layout not in ("concat", "interleave"):
            raise MappingFileError(f"unknown fused layout {self.layout!r} (expected 'concat' or 'interleave')")
        if self.layout == "interleave" and self.groups is None:
            raise MappingFileError("layout 'interleave' needs 'groups'")
        if self.layout == "concat" and self.groups is not None:
            raise MappingFileError("'groups' is only meaningful with layout 'interleave'")
        if self.axis not in (0, 1):
            raise MappingFileError(f"fused split axis must be 0 or 1, got {self.axis!r}")
        for p in self.parts:
            if p.size is not None:
                check_expr(p.size)
        if self.groups is not None:
            check_expr(self.groups)

    def part_sizes(self, total: int, dims: Mapping[str, int], config: Mapping[str, Any], name: str) -> tuple[int, list[int]]:
        """``(groups, per-group part sizes)`` for a fused axis of length ``total``.

        Raises :class:`FusedTensorError` when the sizes do not add up to ``total``.
        """
        groups = 1 if self.groups is None else eval_expr(self.groups, dims, config)
        if groups <= 0 or total % groups:
            raise FusedTensorError(f"{name}: fused axis of length {total} does not divide into {groups} groups")
        per_group = total // groups
        fixed = [None if p.size is None else eval_expr(p.size, dims, config) for p in self.parts]
        free = [i for i, s in enumerate(fixed) if s is None]
        known = sum(s for s in fixed if s is not None)
        if free:
            rest = per_group - known
            if rest <= 0 or rest % len(free):
                raise FusedTensorError(
                    f"{name}: cannot split the remaining {rest} of {per_group} equally among {len(free)} parts"
                )
            for i in free:
                fixed[i] = rest // len(free)
        sizes = [int(s) for s in fixed]  # type: ignore[arg-type]
        if any(s <= 0 for s in sizes) or sum(sizes) != per_group:
            parts = ", ".join(f"{p.role_param}={s}" for p, s in zip(self.parts, sizes))
            raise FusedTensorError(
                f"{name}: fused axis {self.axis} has length {total} but the parts ({parts})"
                f"{'' if groups == 1 else f' x {groups} groups'} add up to {sum(sizes) * groups}"
            )
        return groups, sizes

    def part_ranges(self, groups: int, sizes: Sequence[int]) -> list[tuple[tuple[int, int], ...]]:
        """For each part, the ``[start, stop)`` ranges along the fused axis (in order)."""
        stride = sum(sizes)
        out: list[tuple[tuple[int, int], ...]] = []
        off = 0
        for s in sizes:
            out.append(tuple((g * stride + off, g * stride + off + s) for g in range(groups)))
            off += s
        return out


def _merge_ranges(ranges: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for a, b in ranges:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return tuple(merged)


@dataclass(frozen=True)
class Recipe:
    """How to read one canonical tensor from one stored tensor.

    Apply as: ``x = stored``; if ``axis`` is not ``None``:
    ``x = concatenate([x[..start:stop..] for start, stop in ranges], axis)`` (indices along
    ``axis`` of the *stored* tensor); then if ``transpose``: ``x = x.T`` (2-D only).
    ``shape`` is the resulting canonical shape.
    """

    key: str
    source: str
    source_shape: tuple[int, ...]
    shape: tuple[int, ...]
    axis: int | None = None
    ranges: tuple[tuple[int, int], ...] = ()
    transpose: bool = False

    @property
    def is_identity(self) -> bool:
        """True when the canonical tensor is the stored tensor unchanged."""
        return self.axis is None and not self.transpose

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (lists instead of tuples)."""
        return {
            "key": self.key,
            "source": self.source,
            "source_shape": list(self.source_shape),
            "shape": list(self.shape),
            "axis": self.axis,
            "ranges": [list(r) for r in self.ranges],
            "transpose": self.transpose,
        }


@dataclass(frozen=True)
class Segment:
    """``key[start:stop]`` along the assembly axis (``start``/``stop`` index the canonical tensor).

    In an :class:`OutputRecipe` with ``axis=None`` there is one segment whose
    ``start``/``stop`` are 0 and unused: the whole canonical tensor is taken.
    """

    key: str
    start: int
    stop: int


@dataclass(frozen=True)
class OutputRecipe:
    """How to build one stored tensor from canonical tensors.

    Apply as: if ``axis`` is ``None`` the single segment's whole tensor is taken; otherwise
    ``x = concatenate([canon[s.key][..s.start:s.stop..] for s in segments], axis)`` with the
    slices along ``axis`` of the canonical tensors; then if ``transpose``: ``x = x.T``.
    ``shape`` is the stored shape.
    """

    name: str
    shape: tuple[int, ...]
    segments: tuple[Segment, ...]
    axis: int | None = None
    transpose: bool = False
    fused: bool = False

    @property
    def keys(self) -> tuple[str, ...]:
        """Canonical keys this tensor is made of (each once, in first-use order)."""
        return tuple(dict.fromkeys(s.key for s in self.segments))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "segments": [[s.key, s.start, s.stop] for s in self.segments],
            "axis": self.axis,
            "transpose": self.transpose,
            "fused": self.fused,
        }


def _take(arr: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    idx: list[slice] = [slice(None)] * arr.ndim
    idx[axis] = slice(start, stop)
    return arr[tuple(idx)]


def _transpose(arr: np.ndarray) -> np.ndarray:
    if arr.ndim != 2:
        raise FusedTensorError(f"transpose needs a 2-D tensor, got shape {arr.shape}")
    return np.ascontiguousarray(arr.T)


def apply_recipe(recipe: Recipe, stored: np.ndarray) -> np.ndarray:
    """Produce the canonical tensor from the stored tensor (pure slicing; bit-exact)."""
    if tuple(stored.shape) != recipe.source_shape:
        raise FusedTensorError(f"{recipe.source}: expected shape {recipe.source_shape}, got {tuple(stored.shape)}")
    x = stored
    if recipe.axis is not None:
        pieces = [_take(x, recipe.axis, a, b) for a, b in recipe.ranges]
        x = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=recipe.axis)
        x = np.ascontiguousarray(x)
    if recipe.transpose:
        x = _transpose(x)
    return x


def apply_output_recipe(recipe: OutputRecipe, canon: Mapping[str, np.ndarray]) -> np.ndarray:
    """Produce the stored tensor from canonical tensors (pure slicing; bit-exact)."""
    if recipe.axis is None:
        x = canon[recipe.segments[0].key]
    else:
        pieces = [_take(canon[s.key], recipe.axis, s.start, s.stop) for s in recipe.segments]
        dtypes = {p.dtype for p in pieces}
        if len(dtypes) > 1:
            raise FusedTensorError(f"{recipe.name}: parts have different dtypes {sorted(map(str, dtypes))}")
        x = np.concatenate(pieces, axis=recipe.axis) if len(pieces) > 1 else pieces[0]
    if recipe.transpose:
        x = _transpose(x)
    else:
        x = np.ascontiguousarray(x)
    if tuple(x.shape) != recipe.shape:
        raise FusedTensorError(f"{recipe.name}: built shape {tuple(x.shape)}, expected {recipe.shape}")
    return x


def split_recipes(
    spec: SplitSpec,
    name: str,
    stored_shape: Sequence[int],
    keys: Sequence[str],
    transpose: bool,
    dims: Mapping[str, int],
    config: Mapping[str, Any],
) -> list[Recipe]:
    """Recipes for every part of a fused stored tensor (``keys`` in part order)."""
    stored_shape = tuple(int(s) for s in stored_shape)
    if transpose and len(stored_shape) != 2:
        raise FusedTensorError(f"{name}: transpose needs a 2-D tensor, got shape {stored_shape}")
    canon_shape = tuple(reversed(stored_shape)) if transpose else stored_shape
    if spec.axis >= len(canon_shape):
        raise FusedTensorError(f"{name}: split axis {spec.axis} out of range for shape {stored_shape}")
    groups, sizes = spec.part_sizes(canon_shape[spec.axis], dims, config, name)
    stored_axis = (1 - spec.axis) if transpose else spec.axis
    out = []
    for key, size, ranges in zip(keys, sizes, spec.part_ranges(groups, sizes)):
        shape = list(canon_shape)
        shape[spec.axis] = size * groups
        out.append(
            Recipe(key, name, stored_shape, tuple(shape), stored_axis, _merge_ranges(ranges), transpose)
        )
    return out


def fuse_recipe(
    spec: SplitSpec,
    name: str,
    part_shapes: Sequence[Sequence[int]],
    keys: Sequence[str],
    transpose: bool,
    dims: Mapping[str, int],
    config: Mapping[str, Any],
) -> OutputRecipe:
    """The :class:`OutputRecipe` re-fusing ``keys`` (canonical shapes ``part_shapes``) into ``name``."""
    shapes = [tuple(int(s) for s in sh) for sh in part_shapes]
    ax = spec.axis
    for k, sh in zip(keys, shapes):
        if ax >= len(sh):
            raise FusedTensorError(f"{name}: part {k} has shape {sh}, no axis {ax} to fuse along")
    others = {sh[:ax] + sh[ax + 1 :] for sh in shapes}
    if len(others) != 1:
        raise FusedTensorError(
            f"{name}: parts {list(keys)} have shapes {shapes} that differ outside the fused axis {ax}"
        )
    total = sum(sh[ax] for sh in shapes)
    groups, sizes = spec.part_sizes(total, dims, config, name)
    for k, sh, s in zip(keys, shapes, sizes):
        if sh[ax] != s * groups:
            raise FusedTensorError(
                f"{name}: part {k} has {sh[ax]} rows along axis {ax} but the target config implies {s * groups}"
            )
    segs: list[Segment] = []
    for g in range(groups):
        for k, s in zip(keys, sizes):
            segs.append(Segment(k, g * s, (g + 1) * s))
    # merge consecutive segments of one key (concat layout -> one segment per part)
    merged: list[Segment] = []
    for seg in segs:
        if merged and merged[-1].key == seg.key and merged[-1].stop == seg.start:
            merged[-1] = Segment(seg.key, merged[-1].start, seg.stop)
        else:
            merged.append(seg)
    canon_shape = list(shapes[0])
    canon_shape[ax] = total
    stored = tuple(reversed(canon_shape)) if transpose else tuple(canon_shape)
    return OutputRecipe(name, stored, tuple(merged), ax, transpose, fused=True)
