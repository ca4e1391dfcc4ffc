"""Dense linear algebra on numpy arrays, computed by the Rust core with the GIL released.

>>> U, S, Vt = mf.svd(X)                 # exact thin SVD, X (m, n) -> U (m, r), S (r,), Vt (r, n)
>>> U, S, Vt = mf.svd(X, k=16)           # randomized top-16 (Halko et al. 2011), seeded
>>> U, S, Vt = mf.svd(stack, k=16)       # stack (b, m, n) -> U (b, m, k), S (b, k), Vt (b, k, n)
>>> R = mf.procrustes(A, B)              # argmin ||A - B R||_F over (semi-)orthogonal R

Everything is float32 (inputs of other float dtypes, or torch tensors, are converted).
Stacks run in parallel across matrices; every result is bit-identical whatever the thread
count, and a stacked call equals the per-matrix calls. Signs are normalized so the
largest-magnitude entry of each column of ``U`` is positive.
"""
from __future__ import annotations

from typing import Any, Tuple

import numpy as np

from . import _core
from ._errors import config_error

__all__ = ["svd", "procrustes"]


def _as_f32(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, without importing torch
        x = x.detach().cpu().float().numpy()
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise config_error(f"{what} must be a real numeric array, got dtype {a.dtype}")
    return np.require(a, np.float32, ["C", "A"])  # copies an unaligned buffer too


def _stack(x: Any, what: str) -> Tuple[np.ndarray, bool]:
    a = _as_f32(x, what)
    if a.ndim == 2:
        return a[None], False
    if a.ndim == 3:
        return a, True
    raise config_error(f"{what} must be a 2-D matrix or a 3-D stack (n, m, k), got shape {a.shape}")


def _check_count(name: str, v: Any, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise config_error(f"{name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def svd(
    X: Any,
    k: "int | None" = None,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    return_energy: bool = False,
):
    """Thin SVD ``X = U diag(S) Vt`` of a matrix or of each matrix of a stack.

    Args:
        X: ``(m, n)`` matrix or ``(b, m, n)`` stack (numpy array, torch tensor, ...).
        k: ``None`` for the exact SVD (``r = min(m, n)`` components); else the top ``k``
            components by randomized range finding with ``k + oversample`` probes and
            ``power_iters`` power iterations, seeded by ``seed`` (the exact SVD is used
            when ``k`` is close to full rank). ``k`` is capped at ``min(m, n)``.
        return_energy: also return the fraction of ``||X||_F^2`` captured (per matrix).

    Returns:
        ``(U, S, Vt)`` float32 - ``(m, r), (r,), (r, n)`` or stacked ``(b, m, r), (b, r),
        (b, r, n)`` - and ``energy`` (float or ``(b,)`` array) when ``return_energy``.

    Raises:
        ConfigError for a bad shape/argument, NumericalError for NaN/inf input or a
        factorization that fails to converge.
    """
    a, stacked = _stack(X, "svd input")
    if k is not None:
        k = _check_count("k", k, 1)
    oversample = _check_count("oversample", oversample, 0)
    power_iters = _check_count("power_iters", power_iters, 0)
    seed = _check_count("seed", seed, 0)
    U, S, Vt, energy = _core.svd_stack(a, k, oversample, power_iters, seed)
    if not stacked:
        U, S, Vt = U[0], S[0], Vt[0]
        return (U, S, Vt, float(energy[0])) if return_energy else (U, S, Vt)
    return (U, S, Vt, energy) if return_energy else (U, S, Vt)


def procrustes(A: Any, B: Any) -> np.ndarray:
    """Orthogonal Procrustes: ``R = argmin ||A - B R||_F`` subject to ``R`` orthogonal.

    ``A`` is ``(m, ka)``, ``B`` is ``(m, kb)`` (or stacks ``(b, m, ka)``, ``(b, m, kb)``);
    ``R`` is ``(kb, ka)`` (stacked ``(b, kb, ka)``): orthogonal when ``ka == kb``, with
    orthonormal columns when ``kb > ka`` and orthonormal rows when ``kb < ka``
    (semi-orthogonal). ``R = U Vᵀ`` with ``U S Vᵀ = svd(Bᵀ A)`` (Schönemann 1966); when
    ``Bᵀ A`` is rank-deficient the minimizer is not unique and one of them is returned.
    """
    a, sa = _stack(A, "procrustes A")
    b, sb = _stack(B, "procrustes B")
    if sa != sb:
        raise config_error("procrustes: pass two matrices or two stacks, not a mix")
    R = _core.procrustes_stack(a, b)
    return R if sa else R[0]


def procrustes_cross(A: Any, B: Any) -> np.ndarray:
    """``Bᵀ A`` (``(kb, ka)``) of ``A (m, ka)`` and ``B (m, kb)``: the matrix whose polar factor
    (:func:`polar`) is :func:`procrustes`'s ``R``, bit for bit. Fits sharing ``A`` (an anchor
    and several donors) take their cross products one at a time and their polar factors, an
    exact SVD each, side by side."""
    return _core.procrustes_cross(_as_f32(A, "procrustes A"), _as_f32(B, "procrustes B"))


def polar(M: Any) -> np.ndarray:
    """``U Vᵀ`` of ``U S Vᵀ = svd(M)`` for a matrix ``(kb, ka)`` or a stack (in parallel)."""
    m, stacked = _stack(M, "polar M")
    R = _core.polar_stack(m)
    return R if stacked else R[0]
