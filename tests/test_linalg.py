"""mf.svd / mf.procrustes against numpy (float64 references)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import merge_fast as mf


def rng(seed=0):
    return np.random.default_rng(seed)


def decaying(m, n, seed=0, rate=0.7):
    g = rng(seed)
    U, _ = np.linalg.qr(g.standard_normal((m, min(m, n))))
    V, _ = np.linalg.qr(g.standard_normal((n, min(m, n))))
    s = rate ** np.arange(min(m, n))
    return ((U * s) @ V.T).astype(np.float32)


def rank_deficient(m, n, r, seed=0):
    g = rng(seed)
    return (g.standard_normal((m, r)) @ g.standard_normal((r, n))).astype(np.float32)


def check_svd(X, U, S, Vt, tol=1e-5):
    X64 = X.astype(np.float64)
    r = min(X.shape)
    assert U.shape == (X.shape[0], r) and S.shape == (r,) and Vt.shape == (r, X.shape[1])
    assert U.dtype == S.dtype == Vt.dtype == np.float32
    ref = np.linalg.svd(X64, compute_uv=False)
    smax = max(ref[0], 1e-30)
    np.testing.assert_allclose(S, ref, atol=tol * smax * 10, rtol=0)
    assert np.all(np.diff(S) <= 1e-6 * smax)
    rec = (U.astype(np.float64) * S) @ Vt.astype(np.float64)
    assert np.abs(rec - X64).max() <= tol * smax * 10
    nz = S > 1e-4 * smax  # orthonormality only where the components are determined
    np.testing.assert_allclose(U[:, nz].T.astype(np.float64) @ U[:, nz], np.eye(nz.sum()), atol=1e-4)
    np.testing.assert_allclose(Vt[nz].astype(np.float64) @ Vt[nz].T, np.eye(nz.sum()), atol=1e-4)


@pytest.mark.parametrize("shape", [(40, 30), (30, 40), (64, 64), (1, 5), (7, 1)])
def test_exact_svd_random(shape):
    X = rng(1).standard_normal(shape).astype(np.float32)
    check_svd(X, *mf.svd(X))


@pytest.mark.parametrize("shape,r", [((50, 40), 5), ((40, 60), 1), ((30, 30), 0)])
def test_exact_svd_rank_deficient(shape, r):
    X = rank_deficient(*shape, r, seed=2) if r else np.zeros(shape, np.float32)
    U, S, Vt = mf.svd(X)
    check_svd(X, U, S, Vt)
    smax = max(float(S[0]), 1.0)
    assert np.all(S[r:] <= 1e-4 * smax)


def test_svd_matches_numpy_singular_vectors_up_to_sign():
    X = decaying(60, 45, seed=3)
    U, S, Vt = mf.svd(X)
    Un, Sn, Vtn = np.linalg.svd(X.astype(np.float64), full_matrices=False)
    k = 10  # well-separated leading components
    signs = np.sign(np.sum(U[:, :k] * Un[:, :k], axis=0))
    np.testing.assert_allclose(U[:, :k], Un[:, :k] * signs, atol=1e-4)
    np.testing.assert_allclose(Vt[:k], Vtn[:k] * signs[:, None], atol=1e-4)
    # sign convention: largest-|.| entry of each column of U is positive
    idx = np.abs(U).argmax(axis=0)
    assert np.all(U[idx, np.arange(U.shape[1])] > 0)


@pytest.mark.parametrize("shape", [(300, 200), (200, 500)])
def test_topk_energy_on_decaying_spectrum(shape):
    X = decaying(*shape, seed=4, rate=0.8)
    k = 16
    U, S, Vt, energy = mf.svd(X, k=k, return_energy=True)
    assert U.shape == (shape[0], k) and S.shape == (k,) and Vt.shape == (k, shape[1])
    ref = np.linalg.svd(X.astype(np.float64), compute_uv=False)
    exact_energy = float((ref[:k] ** 2).sum() / (ref ** 2).sum())
    assert abs(energy - exact_energy) <= 1e-3
    got = float((S.astype(np.float64) ** 2).sum() / (ref ** 2).sum())
    assert abs(got - exact_energy) <= 1e-3
    np.testing.assert_allclose(S, ref[:k], rtol=1e-3, atol=1e-6)
    # orthonormal factors and a good rank-k reconstruction
    np.testing.assert_allclose(U.T @ U, np.eye(k), atol=1e-4)
    rec = (U * S) @ Vt
    best = np.sqrt((ref[k:] ** 2).sum())
    assert np.linalg.norm(rec - X) <= best * 1.01 + 1e-6


def test_topk_rank_deficient_and_seeded():
    X = rank_deficient(200, 150, 4, seed=5)
    U, S, Vt = mf.svd(X, k=8, seed=7)
    ref = np.linalg.svd(X.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(S[:4], ref[:4], rtol=1e-4)
    assert np.all(S[4:] <= 1e-4 * ref[0])
    np.testing.assert_allclose((U * S) @ Vt, X, atol=1e-4 * ref[0])
    again = mf.svd(X, k=8, seed=7)
    for a, b in zip((U, S, Vt), again):
        assert np.array_equal(a, b)


def test_topk_k_capped_and_exact_fallback():
    X = rng(6).standard_normal((20, 12)).astype(np.float32)
    U, S, Vt = mf.svd(X, k=50)
    assert S.shape == (12,)
    np.testing.assert_allclose(S, np.linalg.svd(X, compute_uv=False), rtol=1e-5)


def test_batched_svd_equals_single_calls():
    g = rng(8)
    stack = g.standard_normal((5, 40, 30)).astype(np.float32)
    U, S, Vt = mf.svd(stack)
    assert U.shape == (5, 40, 30) and S.shape == (5, 30) and Vt.shape == (5, 30, 30)
    Uk, Sk, Vtk = mf.svd(stack, k=4)
    assert Uk.shape == (5, 40, 4) and Sk.shape == (5, 4) and Vtk.shape == (5, 4, 30)
    for i in range(5):
        u, s, vt = mf.svd(stack[i])
        assert np.array_equal(u, U[i]) and np.array_equal(s, S[i]) and np.array_equal(vt, Vt[i])
        u, s, vt = mf.svd(stack[i], k=4)
        assert np.array_equal(u, Uk[i]) and np.array_equal(s, Sk[i]) and np.array_equal(vt, Vtk[i])


def test_svd_accepts_other_dtypes_and_rejects_bad_input():
    X = rng(9).standard_normal((10, 8))
    U, S, Vt = mf.svd(X)  # float64 in, float32 out
    assert S.dtype == np.float32
    with pytest.raises(mf.ConfigError):
        mf.svd(np.zeros(5, np.float32))
    with pytest.raises(mf.ConfigError):
        mf.svd(np.zeros((2, 2, 2, 2), np.float32))
    with pytest.raises(mf.ConfigError):
        mf.svd(X, k=0)
    bad = X.astype(np.float32).copy()
    bad[0, 0] = np.nan
    with pytest.raises(mf.NumericalError):
        mf.svd(bad)


def ref_procrustes(A, B):
    U, _, Vt = np.linalg.svd(B.astype(np.float64).T @ A.astype(np.float64), full_matrices=False)
    return U @ Vt


@pytest.mark.parametrize("m,ka,kb", [(100, 16, 16), (100, 12, 20), (100, 20, 12)])
def test_procrustes_random(m, ka, kb):
    g = rng(10)
    A = g.standard_normal((m, ka)).astype(np.float32)
    B = g.standard_normal((m, kb)).astype(np.float32)
    R = mf.procrustes(A, B)
    assert R.shape == (kb, ka) and R.dtype == np.float32
    np.testing.assert_allclose(R, ref_procrustes(A, B), atol=1e-4)
    if kb >= ka:
        np.testing.assert_allclose(R.T @ R, np.eye(ka), atol=1e-5)
    else:
        np.testing.assert_allclose(R @ R.T, np.eye(kb), atol=1e-5)
    # optimality: no random orthogonal perturbation does better
    base = np.linalg.norm(A - B @ R)
    for s in range(5):
        Q, _ = np.linalg.qr(rng(100 + s).standard_normal((ka, ka)))
        assert np.linalg.norm(A - B @ (R @ Q.astype(np.float32))) >= base - 1e-4


def test_procrustes_from_its_cross_product():
    """polar(procrustes_cross(A, B)) is procrustes(A, B) bit for bit, over enough rows that the
    cross product is summed from two halves (the numpy reference bounds both), and a stack of
    cross products gives each one's polar factor."""
    from merge_fast.linalg import polar, procrustes_cross

    g = rng(15)
    A = g.standard_normal((5000, 24)).astype(np.float32)
    Bs = [g.standard_normal((5000, k)).astype(np.float32) for k in (24, 24)]
    crosses = [procrustes_cross(A, B) for B in Bs]
    np.testing.assert_allclose(crosses[0], Bs[0].astype(np.float64).T @ A, rtol=1e-4, atol=1e-3)
    Rs = polar(np.stack(crosses))
    for B, C, R in zip(Bs, crosses, Rs):
        assert np.array_equal(R, mf.procrustes(A, B)) and np.array_equal(R, polar(C))
        np.testing.assert_allclose(R, ref_procrustes(A, B), atol=1e-4)
    with pytest.raises(mf.ConfigError, match="rows"):
        procrustes_cross(A, Bs[0][:10])
    with pytest.raises(mf.MergeError, match="NaN"):
        polar(np.full((3, 3), np.nan, np.float32))


def test_procrustes_recovers_rotation():
    g = rng(11)
    A = g.standard_normal((200, 32)).astype(np.float32)
    Q, _ = np.linalg.qr(g.standard_normal((32, 32)))
    B = (A.astype(np.float64) @ Q).astype(np.float32)  # B = A Q -> R = Qᵀ
    R = mf.procrustes(A, B)
    np.testing.assert_allclose(R, Q.T, atol=1e-5)


def test_procrustes_rank_deficient_still_orthogonal():
    A = rank_deficient(80, 10, 3, seed=13)
    B = np.zeros((80, 10), np.float32)
    B[:, :5] = A[:, :5]
    R = mf.procrustes(A, B)
    np.testing.assert_allclose(R.T @ R, np.eye(10), atol=1e-5)
    # it is a minimizer: matches the numpy reference's objective value
    ref = ref_procrustes(A, B)
    assert abs(np.linalg.norm(A - B @ R) - np.linalg.norm(A - B @ ref)) <= 1e-4 * np.linalg.norm(A)
    Z = mf.procrustes(np.zeros((5, 3), np.float32), np.zeros((5, 3), np.float32))
    np.testing.assert_allclose(Z.T @ Z, np.eye(3), atol=1e-6)


def test_procrustes_stacked_and_errors():
    g = rng(14)
    A = g.standard_normal((4, 50, 8)).astype(np.float32)
    B = g.standard_normal((4, 50, 6)).astype(np.float32)
    R = mf.procrustes(A, B)
    assert R.shape == (4, 6, 8)
    for i in range(4):
        assert np.array_equal(R[i], mf.procrustes(A[i], B[i]))
    with pytest.raises(mf.ConfigError):
        mf.procrustes(A, B[0])
    with pytest.raises(mf.ConfigError):
        mf.procrustes(A[:, :10], B)
    with pytest.raises(mf.MergeError):
        mf.procrustes(A[0, :10], B[0])


def test_gil_released_during_svd():
    """A Python thread keeps running while a large SVD runs in the core."""
    X = rng(15).standard_normal((700, 700)).astype(np.float32)
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(1)
            stop.wait(0.005)

    t = threading.Thread(target=ticker)
    t.start()
    try:
        before = len(ticks)
        mf.svd(X)
        during = len(ticks) - before
    finally:
        stop.set()
        t.join()
    assert during >= 3
