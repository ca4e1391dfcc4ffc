"""Projections between widths: ``W' = P_out W P_inᵀ`` with semi-orthogonal ``P``.

Two places need them:

* the **residual stream** when the donor's hidden size differs from the anchor's: the
  Procrustes map ``R`` (``d_donor x d_anchor``) estimated from embedding rows of shared
  tokens is semi-orthogonal (orthonormal columns when the donor is wider, orthonormal rows
  when it is narrower), and every tensor is carried over exactly as for a rotation
  (``P_in = Rᵀ`` on the input side, ``P_out = Rᵀ`` on the output side). Without shared
  tokens, :func:`subspace_map` matches the top right-singular subspaces of the two
  embedding matrices instead.
* **inner widths** (attention ``heads*head_dim``, MLP ``intermediate``) when they differ
  between donor and anchor: per tensor, the semi-orthogonal ``P`` minimizing
  ``||W_anchor - P W_donor||_F`` along that axis (:func:`match_axis`), a linear-algebra
  stand-in for neuron matching (it ignores head structure and the non-linearity; the
  absorbed delta is then low-rank filtered anyway).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from ..linalg import procrustes, svd

__all__ = ["project", "subspace_map", "match_axis"]


def project(W: np.ndarray, P_out: "np.ndarray | None" = None, P_in: "np.ndarray | None" = None) -> np.ndarray:
    """``P_out @ W @ P_inᵀ`` (either side may be None = identity), in float32.

    ``W`` is ``(out, in)`` in the torch Linear convention; ``P_out`` is ``(out', out)`` and
    ``P_in`` is ``(in', in)``.
    """
    x = np.asarray(W, dtype=np.float32)
    if P_out is not None:
        x = np.asarray(P_out, dtype=np.float32) @ x
    if P_in is not None:
        x = x @ np.asarray(P_in, dtype=np.float32).T
    return np.ascontiguousarray(x, dtype=np.float32)


def subspace_map(E_anchor: np.ndarray, E_donor: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Semi-orthogonal ``R`` (``d_donor x d_anchor``) sending the donor's top right-singular
    directions onto the anchor's, for embeddings with no rows in common:
    ``R = V_d[:, :r] V_a[:, :r]ᵀ`` with ``r = min(d_a, d_d)``. Signs follow the SVD's sign
    convention, so this is a heuristic: it matches principal axes, not tokens."""
    _, _, vt_a = svd(E_anchor)
    _, _, vt_d = svd(E_donor)
    r = min(vt_a.shape[0], vt_d.shape[0])
    R = vt_d[:r].T @ vt_a[:r]
    da, dd = E_anchor.shape[1], E_donor.shape[1]
    if r < min(da, dd):  # rank-deficient embeddings: complete with Procrustes on the span
        R = procrustes(np.eye(dd, da, dtype=np.float32), np.eye(dd, dd, dtype=np.float32))
    return np.ascontiguousarray(R, dtype=np.float32)


def match_axis(W_anchor: np.ndarray, W_donor: np.ndarray, axis: int) -> Tuple[np.ndarray, np.ndarray]:
    """Project ``W_donor`` along ``axis`` onto the anchor's size on that axis.

    ``axis=0``: ``W_donor`` is ``(n_d, c)`` and the result ``Pᵀ W_donor`` is ``(n_a, c)``;
    ``axis=1``: ``W_donor`` is ``(c, n_d)`` and the result ``W_donor P`` is ``(c, n_a)``;
    ``P`` (``n_d x n_a``) is the semi-orthogonal Procrustes solution matching the donor's
    slices to the anchor's. Returns ``(projected, P)``.
    """
    if axis == 0:
        P = procrustes(np.ascontiguousarray(W_anchor.T), np.ascontiguousarray(W_donor.T))
        return np.ascontiguousarray(P.T @ W_donor), P
    P = procrustes(np.ascontiguousarray(W_anchor), np.ascontiguousarray(W_donor))
    return np.ascontiguousarray(W_donor @ P), P
