"""Attention grafting across families and widths (as in the Qemma model card): a body model
keeps everything but its attention projections, which come from a donor of another family,
projected into the body's hidden size and regrouped to the body's heads.

Per body layer ``i`` (donor layer ``j = depth_map(i)``), with ``R`` (``d_donor x d_body``) the
residual-stream Procrustes map of :func:`.align.estimate_rotation`:

* **hidden side**: reading weights ``W' = sqrt(d_d/d_b) · W diag(g_d) R diag(1/g_b)`` (the
  donor's pre-attention norm gain folded in, the body's divided out, the RMS-normalisation
  width corrected); ``o_proj`` ``W' = Rᵀ W``. The body's own norms (Gemma's sandwich norms
  included) stay: they are not moved through ``R``, which is why this is a graft of whole
  attention blocks and not an alignment of the stream (:func:`merge_fast.align` refuses
  sandwich norms).
* **heads** (:func:`head_groups`): body head_dim ``= m ·`` donor head_dim; body KV head ``c``
  is donor KV heads ``c·m … c·m+m−1`` side by side, body query head ``h`` (KV group ``c``,
  index ``u`` in it) is donor query head ``u`` of each of those KV groups, so every query
  still meets the keys it was trained with. Within a head the halves are interleaved
  (``[a₁[:h/2], a₂[:h/2], …, a₁[h/2:], a₂[h/2:], …]``) so RoPE's rotate-half pairs stay
  pairs. Donor heads beyond what the body holds are dropped. A body head's logit is the
  sum of its donor heads' logits; ``q_norm``/``k_norm`` gains are tiled the same way and
  scaled by ``(s_b / hd_d)^(1/4)`` each (``s_b`` the body's ``query_pre_attn_scalar`` or
  head_dim) so that sum keeps the donor's per-head scale.

Nothing here preserves the function exactly (softmax of a sum of logits, RoPE frequencies
of another head size, a stream the donor never wrote): the result is a starting point that
the card, like the example, trains further.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .._errors import ConfigError
from .._output import check_output_dir
from ..arch.roles import CanonicalKey
from ._model import FamilyArg, ModelView
from .. import plan as _plan
from ._engine import Planned, SideFiles, execute_canonical, new_side_dir, stored_source
from .align import depth_map, estimate_rotation

__all__ = ["GraftResult", "graft_attention", "head_groups"]

PathLike = Union[str, Path]


def head_groups(donor: Tuple[int, int, int], body: Tuple[int, int, int]) -> Tuple[List[List[int]], List[List[int]]]:
    """Donor heads feeding each body head: ``(q_groups, kv_groups)``, each a list (one entry per
    body head) of donor head indices, for ``(num_heads, num_kv_heads, head_dim)`` of donor and
    body (see the module docstring). Raises :class:`ConfigError` when the body's heads cannot
    be built from the donor's."""
    hq_d, hkv_d, hd_d = donor
    hq_b, hkv_b, hd_b = body
    for who, (hq, hkv) in (("donor", donor[:2]), ("body", body[:2])):
        if hkv <= 0 or hq % hkv:
            raise ConfigError(f"config error: {who}: {hq} attention heads are not a multiple of {hkv} KV heads")
    if hd_b % hd_d or hd_d % 2:
        raise ConfigError(f"config error: body head_dim {hd_b} is not a multiple of the donor's {hd_d} (even)")
    m = hd_b // hd_d
    g_d, g_b = hq_d // hkv_d, hq_b // hkv_b
    if hkv_b * m > hkv_d:
        raise ConfigError(f"config error: the body's {hkv_b} KV heads of {hd_b} need {hkv_b * m} donor KV heads of "
                          f"{hd_d}; the donor has {hkv_d}")
    if g_b > g_d:
        raise ConfigError(f"config error: the body groups {g_b} query heads per KV head, the donor only {g_d}")
    kv = [[c * m + j for j in range(m)] for c in range(hkv_b)]
    q = [[kvd * g_d + (h % g_b) for kvd in kv[h // g_b]] for h in range(hq_b)]
    return q, kv


def _rows(groups: List[List[int]], hd: int) -> np.ndarray:
    """Row indices (into a donor projection's ``heads*hd`` axis) of every body head, halves
    interleaved for rotate-half RoPE."""
    half = hd // 2
    out: List[int] = []
    for g in groups:
        out += [a * hd + t for a in g for t in range(half)]
        out += [a * hd + half + t for a in g for t in range(half)]
    return np.asarray(out, dtype=np.int64)


def _heads(view: ModelView) -> Tuple[int, int, int]:
    c = view.config.get("text_config") or view.config
    try:
        hq = int(c["num_attention_heads"])
        hkv = int(c.get("num_key_value_heads") or hq)
        hd = int(c.get("head_dim") or int(c["hidden_size"]) // hq)
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"config error: {view.path}/config.json: needs num_attention_heads (and hidden_size or "
                          f"head_dim) to regroup attention heads") from None
    return hq, hkv, hd


@dataclasses.dataclass
class GraftResult:
    """What :func:`graft_attention` did."""

    path: Path
    rotation: np.ndarray  # R, (d_donor, d_body)
    method: str  # how R was estimated
    residual: float
    layer_map: Dict[int, int]  # body layer -> donor layer
    q_groups: List[List[int]]
    kv_groups: List[List[int]]
    tensors_replaced: List[str]


def graft_attention(
    body: PathLike,
    donor: PathLike,
    out: PathLike,
    *,
    layers: Optional[Sequence[int]] = None,
    body_family: FamilyArg = None,
    donor_family: FamilyArg = None,
    out_dtype: Optional[str] = None,
    seed: int = 0,
    overwrite: bool = False,
) -> GraftResult:
    """Writes ``body`` (same architecture, names, config, tokenizer) with the attention
    projections (``q/k/v/o`` and ``q_norm``/``k_norm``) of ``layers`` (default: all) taken from
    ``donor``, projected to the body's width and regrouped to its heads (module docstring).
    Both models need a token embedding with rows in common (same tokenizer, or shared token
    strings) for ``R``."""
    check_output_dir(out, [body, donor], overwrite=overwrite)
    B = ModelView(body, body_family, is_anchor=True)
    D = ModelView(donor, donor_family)
    al = estimate_rotation(B, D, seed=seed)
    R = al.rotation
    hq_d, hkv_d, hd_d = _heads(D)
    hq_b, hkv_b, hd_b = _heads(B)
    q_groups, kv_groups = head_groups((hq_d, hkv_d, hd_d), (hq_b, hkv_b, hd_b))
    q_rows, kv_rows = _rows(q_groups, hd_d), _rows(kv_groups, hd_d)
    m = hd_b // hd_d
    cfg = B.config.get("text_config") or B.config
    qk_scale = np.float32((float(cfg.get("query_pre_attn_scalar") or hd_b) / hd_d) ** 0.25)
    read_scale = np.float32(np.sqrt(D.hidden / B.hidden))
    dmap = depth_map(B.num_layers, D.num_layers)
    todo = set(range(B.num_layers)) if layers is None else {int(i) for i in layers}
    bad = sorted(i for i in todo if not 0 <= i < B.num_layers)
    if bad:
        raise ConfigError(f"config error: layers {bad} are outside the body's {B.num_layers} layers")
    replaced: List[str] = []

    def gain(view: ModelView, key: str) -> np.ndarray:
        g = view.gain(key)
        return np.ones(view.hidden, np.float32) if g is None else g.astype(np.float32)

    def read(W: np.ndarray, i: int, j: int) -> np.ndarray:
        Rg = gain(D, f"layers.{j}.attn_norm.weight")[:, None] * R
        gb = gain(B, f"layers.{i}.attn_norm.weight")
        safe = np.abs(gb) > 1e-12
        out_ = (W @ Rg) * read_scale / np.where(safe, gb, 1.0)[None, :]
        out_[:, ~safe] = 0.0
        return out_

    def value(key: str) -> np.ndarray:
        k = CanonicalKey.parse(key)
        if k.layer is None or k.layer not in todo or not k.role.startswith("attn."):
            return B.need(key)
        i, j = k.layer, dmap[k.layer]
        dkey = str(CanonicalKey(j, k.role, k.param))
        role, X = k.role, D.get(dkey)
        if role in ("attn.q", "attn.k", "attn.v"):
            rows = q_rows if role == "attn.q" else kv_rows
            if k.param == "weight":
                v = read(D.need(dkey)[rows], i, j)
            else:  # bias: the donor's rows, zeros where the donor has none
                v = X[rows] if X is not None else np.zeros(len(rows), np.float32)
        elif role == "attn.o":
            if k.param == "weight":
                v = R.T @ D.need(dkey)[:, q_rows]
            else:
                v = R.T @ X if X is not None else np.zeros(B.hidden, np.float32)
        elif role in ("attn.q_norm", "attn.k_norm"):
            if X is None:
                return B.need(key)  # a donor without per-head norms: keep the body's
            g = D.need_gain(dkey)
            half = hd_d // 2
            tiled = np.concatenate([np.tile(g[:half], m), np.tile(g[half:], m)]) * qk_scale
            v = tiled - np.float32(B.norm_offset)
        else:
            return B.need(key)
        replaced.append(B.family.from_canonical(key))
        return np.ascontiguousarray(v, dtype=np.float32)

    for i in todo:
        if D.has(f"layers.{dmap[i]}.attn.q.weight") is False:
            raise ConfigError(f"config error: donor {D.path} has no attention q projection in layer {dmap[i]}")
        if B.has(f"layers.{i}.attn.q_norm.weight") is False and D.has(f"layers.{dmap[i]}.attn.q_norm.weight"):
            raise ConfigError(f"config error: the donor {D.path} normalises q/k per head and the body {B.path} has no "
                              f"q_norm/k_norm to hold that; cannot graft its attention")
    recipe = {"method": "graft_attention", "body": str(body), "donor": str(donor), "rotation_method": al.method,
              "layers": sorted(todo)}
    inputs = _plan.Inputs()
    b_in = inputs(B.path)

    def plan_for(name: str, key: str) -> Optional[Planned]:
        k = CanonicalKey.parse(key)
        if k.layer is None or k.layer not in todo or not k.role.startswith("attn."):
            src = stored_source(B, key, b_in)  # the body's own tensor, copied by the engine
            return None if src is None else ("passthrough", {}, None, [src])
        return None  # grafted attention: made with numpy (small), read from a side file

    with new_side_dir() as tmp:
        mr = execute_canonical(B, inputs, SideFiles(inputs, Path(tmp)), plan_for, value, out, recipe=recipe,
                               out_dtype=out_dtype, max_shard_size="128MB", protected=[B.folder, D.folder],
                               overwrite=overwrite)
    return GraftResult(mr.path, R, al.method, al.residual, {i: dmap[i] for i in sorted(todo)}, q_groups, kv_groups,
                       replaced)
