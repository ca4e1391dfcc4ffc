"""Residual-stream alignment of a donor onto an anchor (orthogonal Procrustes).

Notation (torch ``Linear`` convention, ``y = W x``, weights ``[out, in]``; embeddings
``[vocab, hidden]``): the donor's residual stream ``h_d`` (width ``d_d``) is mapped onto the
anchor's (width ``d_a``) by ``R`` (``d_d x d_a``), ``h_a = Rᵀ h_d``, ``h_d = R h_a``.

**Estimating R.** ``R = argmin ||E_a[S_a] - E_d[S_d] R||_F`` over (semi-)orthogonal ``R``
(:func:`merge_fast.procrustes`), where ``S_a``/``S_d`` are the embedding rows of the tokens
the two tokenizers share (intersection of the ``tokenizer.json`` vocabularies, matched by
token string; ``vocab.json`` as a fallback), or all rows when the vocabularies are identical
(or neither folder has a tokenizer and the row counts agree). Without any shared token the
top right-singular subspaces of the two embeddings are matched instead
(:func:`.projection.subspace_map`, a heuristic).

**Carrying every residual-stream tensor through R** (donor layer ``j`` feeds anchor layer
``i``, see :func:`depth_map`):

* writes to the stream: ``embed`` rows ``E R``, ``pos_embed`` rows ``P R``; ``attn.o`` and
  ``mlp.down`` weights ``Rᵀ W``, their biases ``Rᵀ b``;
* reads from the stream through a norm (``attn.q/k/v``, ``mlp.gate/up``, ``lm_head``):
  an elementwise norm gain does not commute with a rotation, so - as SliceGPT does - the
  donor's gain ``g_d`` (``offset + weight``, Gemma offset 1) is first folded into the reading
  linear (``W diag(g_d)``; a LayerNorm bias ``β_d`` goes into the linear's bias,
  ``b + W β_d``), the result is rotated (``W diag(g_d) R``) and then re-expressed with the
  **anchor's** gain: ``W' = W diag(g_d) R diag(1/g_a)`` and the anchor's norm tensors are
  written. For RMSNorm families of equal width this is exact (the aligned donor computes
  the same function as the donor); LayerNorm's mean-centring is not carried (approximate).
  When the donor is narrower, the RMS normalisation's ``1/sqrt(d)`` changes, so reading
  weights are also scaled by ``sqrt(d_d / d_a)``.
* norms feeding the MLP: ``mlp_norm`` when the donor has one, else ``attn_norm`` (parallel
  blocks such as Phi); the final norm feeds ``lm_head`` (tied donors: the embedding).
* per-head ``q_norm``/``k_norm``, biases of reading linears: not in the stream, unchanged.
* inner widths that differ (heads x head_dim, intermediate): :func:`.projection.match_axis`.
* vocabulary rows (``embed``, ``lm_head``): anchor row ``t`` takes the donor row of the same
  token; anchor tokens the donor lacks keep the anchor's row.

**Family conventions** (:func:`._model.function_scales`): scalar multipliers a family's
forward pass applies (Granite's embedding/residual/attention multipliers and logits scaling,
T5's unscaled attention scores and scaled decoder output, Gemma's ``sqrt(hidden)``
embedding scale) are folded in: a donor tensor of role ``r`` is carried as
``W * s_donor(r) / s_anchor(r)``, exactly function-preserving for those scalars.

**Encoder-decoder donors** (T5): the decoder's self-attention and MLP are aligned like a
decoder-only model's (the encoder and its relative position tables are not used). Its
cross-attention has no counterpart in a decoder-only anchor: with ``cross_attention="error"``
(default) that is refused with :class:`ConfigError` naming the tensor; ``"skip"`` leaves it
out knowingly. An encoder-decoder *anchor* is refused (its encoder is outside the namespace).

**Per-tensor mode** (``mode="per_tensor"``, the borg-merge card's alignment): instead of one
residual-stream rotation, each donor matrix ``W_d`` (depth-mapped, family scales applied, no
norm folding) gets its own orthogonal Procrustes rotation on its smaller side:
``W_d Q`` with ``Q = argmin ||W_a - W_d Q||`` (``in x in``) when ``in <= out``, else ``Q W_d``
with ``Q`` (``out x out``) from ``Wᵀ``; where sizes differ, the residual-stream axis is first
mapped by the embedding-fitted ``R`` and an inner axis by a semi-orthogonal Procrustes map
(:func:`.projection.match_axis`). The embedding and head use
the same fit on their hidden axis over shared-token rows; 1-D tensors are taken as they are.
It minimises each tensor's distance to the anchor, not the function's: the rotations of
consecutive tensors need not agree.

Sandwich norms (Gemma-2/3 ``attn_post_norm``/``mlp_post_norm``) and post-norm models
(BERT, OPT with ``do_layer_norm_before=False``) have a norm between a writing linear and
the stream, which no rotation can pass through: they raise :class:`ConfigError` naming
the tensor.

**Output.** The aligned donor is planned for the Rust engine (:mod:`._engine`,
:meth:`DonorAligner.plan_source`): reading linears are ``affine`` sources
``W · diag(g_d) · R · diag(1/g_a) · s`` and writing ones ``Rᵀ · W · s`` over the donor's
stored tensors, the embedding and head row gathers over the anchor's and the rotated
donor's rows, norms the anchor's tensors; only ``R``, the gains and what those sources
cannot express (biases, width projections, per-tensor mode, fused or transposed stored
layouts) are computed here, into temporary side files the plan reads.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .._errors import TensorMismatch, config_error
from .._output import check_output_dir
from ..arch import PASSTHROUGH_PREFIX
from ..arch.roles import CanonicalKey
from ..linalg import polar, procrustes, procrustes_cross
from ._model import FamilyArg, ModelView
from .. import plan as _plan
from ._engine import SideFiles, execute_canonical, new_side_dir, stored_source
from .projection import match_axis, subspace_map

__all__ = ["AlignResult", "Alignment", "align", "depth_map", "estimate_rotation", "estimate_rotations",
           "per_tensor_rotate"]

PathLike = Union[str, Path]

READ_ROLES = {"attn.q", "attn.k", "attn.v", "mlp.gate", "mlp.up"}
WRITE_ROLES = {"attn.o", "mlp.down"}
NORM_ROLES = {"attn_norm", "mlp_norm", "final_norm"}
UNSUPPORTED_ROLES = {
    "attn_post_norm": "sandwich (post-sub-layer) norms sit between a writing linear and the residual stream",
    "mlp_post_norm": "sandwich (post-sub-layer) norms sit between a writing linear and the residual stream",
    "embed_norm": "a norm on the embeddings sits between the embedding and the residual stream",
    "embed_proj_in": "the embedding is projected into the stream (OPT project_in)",
    "embed_proj_out": "the stream is projected before the head (OPT project_out)",
}


def depth_map(anchor_layers: int, donor_layers: int) -> List[int]:
    """Donor layer feeding each anchor layer, by relative depth:
    ``j(i) = round(i * (Ld - 1) / (La - 1))`` (``j = 0`` when ``La == 1``). Rounding is half
    away from zero, so the first and last layers always meet."""
    if donor_layers <= 0:
        return [0] * anchor_layers
    if anchor_layers <= 1:
        return [0] * anchor_layers
    return [int(np.floor(i * (donor_layers - 1) / (anchor_layers - 1) + 0.5)) for i in range(anchor_layers)]


def _cross_attn_keys(view: ModelView) -> List[str]:
    return [k for k in view.keys if CanonicalKey.parse(k).role.startswith("cross_attn")]


def _check_encoder_decoder(anchor: ModelView, donor: ModelView, cross_attention: str) -> None:
    if cross_attention not in ("error", "skip"):
        raise config_error(f"cross_attention must be 'error' or 'skip', got {cross_attention!r}")
    if anchor.family.attributes.get("encoder_decoder"):
        raise config_error(
            f"tensor '{anchor.family.from_canonical(anchor.keys[0])}' of {anchor.path}: the anchor is an "
            f"encoder-decoder model ({anchor.family.name}); only its decoder is in the canonical namespace, so it cannot "
            f"be an alignment anchor (use a decoder-only anchor)"
        )
    cross = _cross_attn_keys(donor)
    if cross and cross_attention == "error":
        raise config_error(
            f"tensor '{donor.family.from_canonical(cross[0])}' of {donor.path}: {donor.family.name} "
            f"decoder blocks have cross-attention over an encoder's output, which the decoder-only anchor "
            f"({anchor.family.name}) has no place for; refusing to drop it silently. Pass cross_attention='skip' to "
            f"absorb only the decoder's self-attention and MLP roles ({len(cross)} cross-attention tensors left out)"
        )


def _check_placement(view: ModelView) -> None:
    placement = str(view.family.attributes.get("norm_placement", "pre"))
    post = placement.startswith("post") or (
        view.family.name == "opt" and view.config.get("do_layer_norm_before", True) is False
    )
    if post or placement.startswith("sandwich"):
        first = next(
            (k for k in view.keys if CanonicalKey.parse(k).role in ("attn_norm", "attn_post_norm")), view.keys[0]
        )
        raise config_error(
            f"tensor '{view.family.from_canonical(first)}' of {view.path}: {view.family.name} uses "
            f"{'post' if post else 'sandwich'}-norm blocks, where a norm sits between a writing linear and the "
            f"residual stream; a residual-stream rotation cannot pass through it"
        )
    for k in view.keys:
        role = CanonicalKey.parse(k).role
        if role in UNSUPPORTED_ROLES:
            raise config_error(
                f"tensor '{view.family.from_canonical(k)}' of {view.path}: {UNSUPPORTED_ROLES[role]}; "
                f"cannot align it"
            )


@dataclasses.dataclass
class Alignment:
    """How a donor maps onto an anchor."""

    rotation: np.ndarray  # R, (d_donor, d_anchor)
    method: str  # "all_rows" | "shared_tokens" | "subspace"
    anchor_rows: np.ndarray  # embedding rows of the anchor matched ...
    donor_rows: np.ndarray  # ... to these rows of the donor
    residual: float  # ||E_a[S] - E_d[S] R||_F / ||E_a[S]||_F (NaN: subspace map, estimate_rotations)


def _row_pairs(anchor: ModelView, donor: ModelView) -> Tuple[str, np.ndarray, np.ndarray]:
    va, vd = anchor.vocab, donor.vocab
    na, nd = anchor.vocab_rows, donor.vocab_rows
    if va is not None and vd is not None and va != vd:
        pairs = sorted((ia, vd[t]) for t, ia in va.items() if t in vd and ia < na and vd[t] < nd)
        if not pairs:
            return "subspace", np.zeros(0, np.int64), np.zeros(0, np.int64)
        a = np.fromiter((p[0] for p in pairs), np.int64, len(pairs))
        d = np.fromiter((p[1] for p in pairs), np.int64, len(pairs))
        return "shared_tokens", a, d
    if (va is not None and va == vd) or na == nd:
        n = min(na, nd)
        return "all_rows", np.arange(n), np.arange(n)
    return "subspace", np.zeros(0, np.int64), np.zeros(0, np.int64)


def _fit_inputs(anchor_embed: np.ndarray, anchor: ModelView, donor: ModelView) -> Tuple[str, np.ndarray, np.ndarray,
                                                                                        np.ndarray, np.ndarray]:
    """``(method, anchor rows, donor rows, A, B)``: the embedding rows a fit pairs up (the whole
    embeddings for ``"subspace"``)."""
    method, ra, rd = _row_pairs(anchor, donor)
    Ed = donor.need("embed.weight")
    if method == "subspace":
        return method, ra, rd, anchor_embed, Ed
    A = anchor_embed if method == "all_rows" and len(ra) == anchor_embed.shape[0] else \
        np.ascontiguousarray(anchor_embed[ra])
    B = Ed if method == "all_rows" and len(rd) == Ed.shape[0] else np.ascontiguousarray(Ed[rd])
    return method, ra, rd, A, B


def estimate_rotation(anchor: ModelView, donor: ModelView, *, seed: int = 0) -> Alignment:
    """Procrustes ``R`` from embedding rows (see module docstring), and the fit's residual."""
    method, ra, rd, A, B = _fit_inputs(anchor.need("embed.weight"), anchor, donor)
    if method == "subspace":
        return Alignment(subspace_map(A, B, seed=seed), method, ra, rd, float("nan"))
    R = procrustes(A, B)
    # relative residual, in row blocks (no full-size temporaries)
    num = den = 0.0
    for s in range(0, A.shape[0], 4096):
        a = A[s:s + 4096].astype(np.float64)
        num += float(np.square(a - B[s:s + 4096].astype(np.float64) @ R).sum())
        den += float(np.square(a).sum())
    res = float(np.sqrt(num / den)) if den > 0 else 0.0
    return Alignment(R, method, ra, rd, res)


def estimate_rotations(anchor: ModelView, donors: Sequence[ModelView], *, seed: int = 0) -> List[Alignment]:
    """:func:`estimate_rotation` of each donor, the same ``R`` bit for bit, without the residual
    (NaN; a product of the embedding with ``R`` as large as the fit, 3 s per donor at 1.1B,
    which only :func:`align` and the graft report): the anchor's embedding read once, one
    donor's at a time for its cross product, and the fits' polar factors (an exact SVD each, on
    one core) side by side at the end."""
    Ea = anchor.need("embed.weight")
    out: List[Optional[Alignment]] = []
    crosses: List[np.ndarray] = []
    fits: List[Tuple[int, str, np.ndarray, np.ndarray]] = []
    for donor in donors:
        method, ra, rd, A, B = _fit_inputs(Ea, anchor, donor)
        if method == "subspace":
            out.append(Alignment(subspace_map(A, B, seed=seed), method, ra, rd, float("nan")))
            continue
        crosses.append(procrustes_cross(A, B))
        fits.append((len(out), method, ra, rd))
        out.append(None)
        del A, B
    # One stack per shape (donors of other widths have other cross products).
    for shape in {c.shape for c in crosses}:
        group = [j for j, c in enumerate(crosses) if c.shape == shape]
        for j, R in zip(group, polar(np.stack([crosses[j] for j in group]))):
            i, method, ra, rd = fits[j]
            out[i] = Alignment(R, method, ra, rd, float("nan"))
    return [a for a in out if a is not None]


def per_tensor_rotate(W_anchor: np.ndarray, W_donor: np.ndarray) -> np.ndarray:
    """``W_donor`` rotated onto ``W_anchor`` (same shape) by the orthogonal Procrustes fit on
    its smaller side: ``W_d Q``, ``Q = argmin_Q ||W_a - W_d Q||`` when ``in <= out``, else
    ``Q W_d``, ``Q = argmin_Q ||W_a - Q W_d||`` (the SVD is of a ``min(out, in)``-square matrix)."""
    r, c = W_donor.shape
    if c <= r:
        Q = procrustes(W_anchor, W_donor)
        return np.ascontiguousarray(W_donor @ Q, dtype=np.float32)
    Q = procrustes(np.ascontiguousarray(W_anchor.T), np.ascontiguousarray(W_donor.T))
    return np.ascontiguousarray(Q.T @ W_donor, dtype=np.float32)


class DonorAligner:
    """Produces a donor's tensors in the anchor's basis and shapes, one canonical key at a time."""

    def __init__(self, anchor: ModelView, donor: ModelView, alignment: Optional[Alignment] = None, seed: int = 0,
                 *, mode: str = "residual", cross_attention: str = "error"):
        if mode not in ("residual", "per_tensor"):
            raise config_error(f"alignment mode must be 'residual' or 'per_tensor', got {mode!r}")
        self.check(anchor, donor, cross_attention)
        self.mode = mode
        self.anchor, self.donor = anchor, donor
        self.al = alignment or estimate_rotation(anchor, donor, seed=seed)
        self.R = self.al.rotation
        self.layers = depth_map(anchor.num_layers, donor.num_layers)
        da, dd = anchor.hidden, donor.hidden
        self.read_scale = np.float32(np.sqrt(dd / da)) if dd < da else np.float32(1.0)
        self._proj: Dict[str, np.ndarray] = {}

    @staticmethod
    def check(anchor: ModelView, donor: ModelView, cross_attention: str) -> None:
        """The checks the aligner runs first (before any fit): a donor it cannot align raises."""
        _check_encoder_decoder(anchor, donor, cross_attention)
        _check_placement(anchor)
        _check_placement(donor)

    # -------------------------------------------------------------- helpers
    def conv(self, role: str) -> np.float32:
        """Factor carrying a donor ``role`` weight into the anchor's convention (multipliers)."""
        return np.float32(self.donor.scale(role) / self.anchor.scale(role))

    def donor_key(self, key: str) -> str:
        k = CanonicalKey.parse(key)
        if k.layer is None:
            return key
        if k.layer >= len(self.layers):
            return key
        return str(CanonicalKey(self.layers[k.layer], k.role, k.param))

    def _norm_for(self, view: ModelView, key: CanonicalKey, layer: Optional[int]) -> Optional[str]:
        if key.role == "lm_head":
            return "final_norm"
        if key.role.startswith("attn."):
            return f"layers.{layer}.attn_norm"
        if key.role.startswith("mlp."):
            m = f"layers.{layer}.mlp_norm"
            return m if view.has(m + ".weight") else f"layers.{layer}.attn_norm"
        return None

    def _rows(self, anchor_val: np.ndarray, donor_rows: np.ndarray) -> np.ndarray:
        """Anchor-vocabulary matrix: donor rows of shared tokens, anchor rows elsewhere."""
        out = np.array(anchor_val, dtype=np.float32, copy=True)
        ra, rd = self.al.anchor_rows, self.al.donor_rows
        if self.al.method == "subspace":
            n = min(out.shape[0], donor_rows.shape[0])
            ra, rd = np.arange(n), np.arange(n)
        out[ra] = donor_rows[rd]
        return out

    def _inner(self, key: str, W: np.ndarray, axis: int) -> np.ndarray:
        if W.shape[axis] == self.anchor.shape(key)[axis]:
            return W
        W2, P = match_axis(self.anchor.need(key), W, axis)
        self._proj[key] = P
        return W2

    # -------------------------------------------------------------- main entry
    def aligned(self, key: str) -> Tuple[str, Optional[np.ndarray]]:
        """``(status, value)`` for an anchor canonical key:

        * ``("anchor", None)``: the anchor's own tensor is the answer (norms, passthrough,
          tensors outside the residual stream the donor cannot supply in the anchor's shape);
        * ``("missing", None)``: the donor has no counterpart for this role;
        * ``("donor", array)``: the donor's tensor in the anchor's basis and shape.
        """
        if key.startswith(PASSTHROUGH_PREFIX):
            return "anchor", None
        if self.mode == "per_tensor":
            return self._per_tensor(key)
        return self._residual(key)

    def _residual(self, key: str) -> Tuple[str, Optional[np.ndarray]]:
        A, D = self.anchor, self.donor
        k = CanonicalKey.parse(key)
        dkey = self.donor_key(key)
        dk = CanonicalKey.parse(dkey)
        role, param = k.role, k.param
        ashape = A.shape(key)
        if role in NORM_ROLES:
            return "anchor", None
        R = self.R
        c = self.conv(role)
        if role == "embed":
            Ed = D.get("embed.weight") @ R
            if c != 1.0:
                Ed *= c
            return "donor", self._rows(A.need(key), Ed)
        if role == "pos_embed":
            P = D.get(dkey)
            if P is None:
                return "missing", None
            P = P @ R
            out = np.array(A.get(key), dtype=np.float32, copy=True)
            n = min(out.shape[0], P.shape[0])
            out[:n] = P[:n]
            return "donor", out
        if role == "lm_head":
            if param == "bias":
                b = D.get(dkey)
                if b is None:
                    return "missing", None
                return "donor", self._rows(A.need(key)[:, None], (b * c)[:, None])[:, 0]
            W = D.get("lm_head.weight")
            if W is None:
                W = D.get("embed.weight")  # tied donor
            W = self._read_side(W, D, A, k, None, dk_layer=None)
            if c != 1.0:
                W *= c
            return "donor", self._rows(A.need(key), W)
        if role in READ_ROLES:
            Wd = D.get(str(CanonicalKey(dk.layer, role, "weight")))
            if Wd is None:
                return "missing", None
            if param == "weight":
                W = self._read_side(Wd, D, A, k, k.layer, dk_layer=dk.layer)
                if c != 1.0:
                    W *= c
                return "donor", self._inner(key, W, 0)
            # bias: b + W beta_d (LayerNorm bias folded), projected like the weight
            b = D.get(dkey)
            beta = D.get(f"{self._norm_for(D, dk, dk.layer)}.bias")
            if b is None and beta is None:
                return "missing", None
            bb = np.zeros(Wd.shape[0], np.float32) if b is None else b.astype(np.float32)
            if beta is not None:
                bb = bb + Wd @ beta
            bb = bb * c
            wkey = str(CanonicalKey(k.layer, role, "weight"))
            if bb.shape[0] != ashape[0]:
                P = self._proj.get(wkey)
                if P is None:
                    self.aligned(wkey)
                    P = self._proj.get(wkey)
                if P is None:
                    return "anchor", None
                bb = P.T @ bb
            return "donor", np.ascontiguousarray(bb, dtype=np.float32)
        if role in WRITE_ROLES:
            X = D.get(dkey)
            if X is None:
                return "missing", None
            if param == "bias":
                return "donor", np.ascontiguousarray((R.T @ X) * c, dtype=np.float32)
            W = np.ascontiguousarray(R.T @ X)
            if c != 1.0:
                W *= c
            return "donor", self._inner(key, W, 1)
        # Roles outside the residual stream (q_norm/k_norm, heads, custom): the donor's own
        # tensor when the shapes agree, else the anchor's.
        X = D.get(dkey)
        if X is None:
            return "missing", None
        if tuple(X.shape) != tuple(ashape):
            return "anchor", None
        return "donor", np.ascontiguousarray(X, dtype=np.float32)

    def _per_tensor(self, key: str) -> Tuple[str, Optional[np.ndarray]]:
        """The card's alignment: each donor tensor rotated onto the anchor's by its own
        orthogonal Procrustes fit (see module docstring)."""
        A, D = self.anchor, self.donor
        k = CanonicalKey.parse(key)
        role, param = k.role, k.param
        if role in NORM_ROLES:
            return "anchor", None
        if role == "embed":  # the residual-stream fit *is* the embedding's per-tensor fit
            return self._residual(key)
        c = self.conv(role)
        Wa = A.need(key)
        if role == "lm_head":
            X = D.get(key)
            if X is None and param == "weight":
                X = D.get("embed.weight")  # tied donor
            if X is None:
                return "missing", None
            X = X * c
            if param == "bias":
                return "donor", self._rows(Wa[:, None], X[:, None])[:, 0]
            ra, rd = self.al.anchor_rows, self.al.donor_rows
            if self.al.method == "subspace" or not len(ra):
                n = min(Wa.shape[0], X.shape[0])
                ra, rd = np.arange(n), np.arange(n)
            Q = procrustes(np.ascontiguousarray(Wa[ra]), np.ascontiguousarray(X[rd]))
            return "donor", self._rows(Wa, np.ascontiguousarray(X @ Q, dtype=np.float32))
        X = D.get(self.donor_key(key))
        if X is None:
            return "missing", None
        X = np.asarray(X, dtype=np.float32) * c
        if X.ndim != 2 or Wa.ndim != 2:
            if tuple(X.shape) != tuple(Wa.shape):
                return "anchor", None
            return "donor", np.ascontiguousarray(X, dtype=np.float32)
        # sizes that differ: the residual-stream axis through the embedding-fitted map R (the
        # only evidence shared across the two streams), an inner axis by its own Procrustes map
        if role in READ_ROLES and X.shape[1] != Wa.shape[1]:
            X = X @ self.R
        elif role in WRITE_ROLES and X.shape[0] != Wa.shape[0]:
            X = self.R.T @ X
        for axis in (1, 0):
            if X.shape[axis] != Wa.shape[axis]:
                X, _ = match_axis(Wa, np.ascontiguousarray(X), axis)
        return "donor", per_tensor_rotate(Wa, X)

    # -------------------------------------------------------------- as plan sources
    def plan_source(self, key: str, a_in: int, d_in: int, side: SideFiles, tag: str
                    ) -> Tuple[str, Optional[_plan.Source]]:
        """:meth:`aligned` as a plan source the core materialises: ``("anchor", src)``,
        ``("missing", None)``, ``("donor", src)``, or ``("numpy", None)`` where the value
        has to come from :meth:`aligned` (per-tensor mode, biases, width projections, stored
        tensors that are fused or transposed). ``a_in``/``d_in``: the plan's input indices of
        the anchor and donor; ``tag`` names this donor's matrices in ``side``."""
        A, D = self.anchor, self.donor
        if key.startswith(PASSTHROUGH_PREFIX):
            return self._status("anchor", stored_source(A, key, a_in))
        k = CanonicalKey.parse(key)
        role, param = k.role, k.param
        if role in NORM_ROLES:
            return self._status("anchor", stored_source(A, key, a_in))
        if self.mode != "residual" or param != "weight":
            return "numpy", None
        dkey = self.donor_key(key)
        dk = CanonicalKey.parse(dkey)
        ashape = A.shape(key)
        c = float(self.conv(role))

        def rot() -> _plan.TensorRef:
            return side.ref(f"{tag}/R", lambda: self.R)

        if role in ("embed", "pos_embed"):
            src_key = "embed.weight" if role == "embed" else dkey
            if not D.has(src_key):
                return "missing", None
            src = stored_source(D, src_key, d_in)
            if src is None:
                return "numpy", None
            aff = _plan.affine(src, [D.shape(src_key)[0], ashape[1]], right=rot(), scale=c)
            return self._status("donor", self._rows_source(A, key, a_in, aff, D.shape(src_key)[0], role == "embed"))
        if role == "lm_head":
            src_key = "lm_head.weight" if D.has("lm_head.weight") else "embed.weight"
            src = stored_source(D, src_key, d_in)
            if src is None:
                return "numpy", None
            aff = self._read_affine(src, [D.shape(src_key)[0], ashape[1]], k, None, None, side, tag, c)
            return self._status("donor", self._rows_source(A, key, a_in, aff, D.shape(src_key)[0], True))
        if role in READ_ROLES:
            if not D.has(dkey):
                return "missing", None
            if D.shape(dkey)[0] != ashape[0]:
                return "numpy", None
            src = stored_source(D, dkey, d_in)
            if src is None:
                return "numpy", None
            return self._status("donor", self._read_affine(src, ashape, k, k.layer, dk.layer, side, tag, c))
        if role in WRITE_ROLES:
            if not D.has(dkey):
                return "missing", None
            if D.shape(dkey)[1] != ashape[1]:
                return "numpy", None
            src = stored_source(D, dkey, d_in)
            if src is None:
                return "numpy", None
            rt = side.ref(f"{tag}/RT", lambda: np.ascontiguousarray(self.R.T))
            return self._status("donor", _plan.affine(src, ashape, left=rt, scale=c))
        if not D.has(dkey):
            return "missing", None
        if tuple(D.shape(dkey)) != tuple(ashape):
            return self._status("anchor", stored_source(A, key, a_in))
        return self._status("donor", stored_source(D, dkey, d_in))

    @staticmethod
    def _status(status: str, src: Optional[_plan.Source]) -> Tuple[str, Optional[_plan.Source]]:
        return (status, src) if src is not None else ("numpy", None)

    def _rows_source(self, A: ModelView, key: str, a_in: int, donor: _plan.Source, donor_rows: int,
                     by_token: bool) -> Optional[_plan.Source]:
        """:meth:`_rows` (``by_token``; else the first rows) as a row gather: anchor rows
        (source 0) where the donor has no row for the token, the donor's (source 1) elsewhere."""
        anc = stored_source(A, key, a_in)
        if anc is None:
            return None
        shape = list(A.shape(key))
        table: List[List[Tuple[int, int]]] = [[(0, i)] for i in range(shape[0])]
        if by_token and self.al.method != "subspace":
            pairs = zip(self.al.anchor_rows.tolist(), self.al.donor_rows.tolist())
        else:
            n = min(shape[0], donor_rows)
            pairs = zip(range(n), range(n))
        for a, d in pairs:
            table[a] = [(1, d)]
        return _plan.rows([anc, donor], shape, table)

    def _read_affine(self, src: _plan.Source, shape: Sequence[int], k: CanonicalKey, a_layer: Optional[int],
                     dk_layer: Optional[int], side: SideFiles, tag: str, c: float) -> _plan.AffineSource:
        """:meth:`_read_side` (times ``c``) as an affine source:
        ``W · diag(g_d) · R · diag(1/g_a) · read_scale · c``."""
        D, A = self.donor, self.anchor
        nd = self._norm_for(D, CanonicalKey(dk_layer, k.role, "weight") if dk_layer is not None else k, dk_layer)
        na = self._norm_for(A, k, a_layer)
        g = h = None
        if nd is not None and D.has(nd + ".weight"):
            dg = nd + ".weight"
            g = side.ref(f"{tag}/g/{nd}", lambda: D.need_gain(dg))
        if na is not None and A.has(na + ".weight"):
            ag = na + ".weight"

            def inv() -> np.ndarray:
                ga = A.need_gain(ag)
                safe = np.abs(ga) > 1e-12
                return np.where(safe, np.float32(1.0) / np.where(safe, ga, np.float32(1.0)), np.float32(0.0))

            h = side.ref(f"anchor/inv_g/{na}", inv)
        return _plan.affine(src, shape, right=side.ref(f"{tag}/R", lambda: self.R), right_in=g, right_out=h,
                            scale=float(self.read_scale) * c)

    def _read_side(self, Wd, D: ModelView, A: ModelView, k: CanonicalKey, a_layer, dk_layer) -> np.ndarray:
        nd = self._norm_for(D, CanonicalKey(dk_layer, k.role, "weight") if dk_layer is not None else k, dk_layer)
        assert nd is not None, "reading linears have a norm"
        gd = D.gain(nd + ".weight")
        if gd is not None:  # W diag(g_d) R == W (diag(g_d) R): scale R's rows, not W
            W = Wd @ (gd[:, None] * self.R)
        else:
            W = Wd @ self.R
        del Wd
        if self.read_scale != 1.0:
            W *= self.read_scale
        na = self._norm_for(A, k, a_layer)
        assert na is not None, "reading linears have a norm"
        ga = A.gain(na + ".weight")
        if ga is not None:
            safe = np.abs(ga) > 1e-12
            W /= np.where(safe, ga, 1.0)[None, :].astype(np.float32)
            W[:, ~safe] = 0.0
        return np.ascontiguousarray(W, dtype=np.float32)


@dataclasses.dataclass
class AlignResult:
    """What :func:`align` estimated (and wrote, when ``out`` was given)."""

    rotation: np.ndarray
    method: str
    matched_rows: int
    residual: float
    layer_map: List[int]
    path: Optional[Path] = None
    tensors_written: int = 0
    filled_from_anchor: List[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def align(
    anchor: PathLike,
    donor: PathLike,
    out: Optional[PathLike] = None,
    *,
    missing: str = "error",
    anchor_family: FamilyArg = None,
    donor_family: FamilyArg = None,
    out_dtype: Optional[str] = None,
    max_shard_size: Union[int, str] = "128MB",
    seed: int = 0,
    overwrite: bool = False,
    cache_dir: Optional[PathLike] = None,
    mode: str = "residual",
    cross_attention: str = "error",
    threads: Optional[int] = None,
    progress: bool = False,
    fsync: bool = True,
) -> AlignResult:
    """Rotate ``donor``'s residual stream onto ``anchor``'s and (with ``out``) write the aligned
    donor under the anchor's tensor names, config and tokenizer.

    Args:
        anchor, donor: model folders (safetensors + config.json; tokenizer.json to match
            vocabularies by token), or hub repo ids (``org/name[@revision]``, downloaded
            into ``cache_dir``).
        out: output folder (written atomically); ``None`` only estimates.
        missing: an anchor tensor the donor has no counterpart for: ``"error"``
            (TensorMismatch naming it) or ``"anchor"`` (keep the anchor's tensor; listed in
            ``filled_from_anchor``).
        anchor_family, donor_family: family name, :class:`merge_fast.arch.Family` or mapping
            file for checkpoints that are not detected automatically.
        out_dtype: ``"float32"``/``"bfloat16"``/``"float16"``; default each anchor tensor's dtype.
        overwrite: replace an existing ``out`` holding a previous merge output.
        mode: ``"residual"`` (one residual-stream rotation, function-preserving) or
            ``"per_tensor"`` (each tensor its own Procrustes rotation; module docstring).
        cross_attention: an encoder-decoder donor's cross-attention: ``"error"`` (refuse) or
            ``"skip"`` (leave it out; only self-attention and MLP carry over).
        threads, progress, fsync: as for :func:`merge_fast.merge` (the output is written by the engine).

    Returns:
        :class:`AlignResult` with the estimated ``rotation`` ``R`` (``d_donor x d_anchor``,
        ``h_anchor = Rᵀ h_donor``) and the depth map.
    """
    if missing not in ("error", "anchor"):
        raise config_error(f"missing must be 'error' or 'anchor', got {missing!r}")
    if out is not None:
        check_output_dir(out, [anchor, donor], overwrite=overwrite)
    t0 = time.perf_counter()
    from ..lora import local_models

    anchor, donor = local_models([anchor, donor], cache_dir=cache_dir)
    A = ModelView(anchor, anchor_family, is_anchor=True)
    D = ModelView(donor, donor_family)
    al = DonorAligner(A, D, seed=seed, mode=mode, cross_attention=cross_attention)
    res = AlignResult(al.R, al.al.method, int(len(al.al.anchor_rows)), al.al.residual, al.layers)
    if out is None:
        res.seconds = time.perf_counter() - t0
        return res
    filled: List[str] = []

    def absent(key: str) -> None:
        if missing == "error":
            raise TensorMismatch(
                f"tensor mismatch for '{A.family.from_canonical(key)}' (canonical '{key}'): donor {D.path} "
                f"({D.family.name}) has no '{al.donor_key(key)}'"
            )
        filled.append(key)

    def value(key: str) -> np.ndarray:
        status, v = al.aligned(key)
        if status == "donor":
            assert v is not None
            return v
        if status == "missing":
            absent(key)
        return A.need(key)

    recipe = {"method": "align", "anchor": str(anchor), "donor": str(donor), "rotation_method": al.al.method}
    inputs = _plan.Inputs()
    a_in, d_in = inputs(A.path), inputs(D.path)
    with new_side_dir() as tmp:
        side = SideFiles(inputs, Path(tmp))

        def plan_for(name: str, key: str) -> Optional[Tuple[str, Dict[str, Any], Optional[_plan.Source],
                                                            List[_plan.Source]]]:
            status, src = al.plan_source(key, a_in, d_in, side, "donor")
            if status == "missing":
                src = stored_source(A, key, a_in)
                if src is None:
                    return None  # value() decides
                absent(key)
            if src is None:
                return None
            return "passthrough", {}, None, [src]

        mr = execute_canonical(A, inputs, side, plan_for, value, out, recipe=recipe, out_dtype=out_dtype,
                               max_shard_size=max_shard_size, protected=[A.folder, D.folder], overwrite=overwrite,
                               threads=threads, progress=progress, fsync=fsync)
    res.path, res.tensors_written = mr.path, mr.tensors_written
    res.filled_from_anchor = filled
    res.seconds = time.perf_counter() - t0
    return res
