"""The sparsify-and-merge family (ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties,
della, della_linear, sce) on arrays and folders.

Every check compares against an independent numpy implementation written here from the
formulas (mergekit 0.1.5's semantics, see merge_fast/methods/sparsified.py), including a numpy
re-implementation of the counter-based generator (rng.rs: SplitMix64 finalizer, FNV-1a of the
tensor name) so the random methods are checked element for element. Parity with mergekit
itself runs `mergekit-yaml` (its click entry point, all configs in one subprocess so torch is
imported once) on a tiny random Llama.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import read_folder_f32

RNG = np.random.default_rng(20260)
M64 = (1 << 64) - 1


# --------------------------------------------------------------------------- counter RNG
def _mix_int(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _mix_np(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def stream_key(seed: int, tensor: str, sub: int) -> int:
    h = 0xCBF29CE484222325
    for b in tensor.encode():
        h = ((h ^ b) * 0x100000001B3) & M64
    return _mix_int(_mix_int(seed ^ _mix_int(h)) ^ ((sub * 0xD6E8FEB86659FD93) & M64))


def uniform(key: int, idx: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = _mix_np(np.uint64(key) + idx.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# --------------------------------------------------------------------------- references
def deltas32(base, xs):
    b = np.asarray(base, np.float32).ravel()
    return [np.asarray(x, np.float32).ravel() - b for x in xs]


def keep_topk(d, density):
    n = d.size
    if density >= 1:
        return np.ones(n, bool)
    if density <= 0:
        return np.zeros(n, bool)
    k = max(1, int(density * n))
    order = np.argsort(-np.abs(d).astype(np.float64), kind="stable")  # ties: lowest index first
    keep = np.zeros(n, bool)
    keep[order[:k]] = True
    return keep


def keep_breadcrumbs(d, density, gamma):
    n = d.size
    if density >= 1:
        return np.ones(n, bool)
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = np.argsort(np.abs(d), kind="stable")
    keep = np.zeros(n, bool)
    if target > 0:
        keep[order[n_bot : n_bot + target]] = True
    return keep


def keep_dare(n, density, seed, i, tensor="array"):
    if density >= 1:
        return np.ones(n, bool)
    if density <= 0:
        return np.zeros(n, bool)
    return uniform(stream_key(seed, tensor, i), np.arange(n)) < density


def keep_della(d, shape, density, eps, seed, i, tensor="array"):
    n = d.size
    if density >= 1:
        return np.ones(n, bool)
    if density <= 0:
        return np.zeros(n, bool)
    m = n if len(shape) < 2 else int(np.prod(shape[1:]))
    u = uniform(stream_key(seed, tensor, i), np.arange(n))
    keep = np.zeros(n, bool)
    for r0 in range(0, n, m):
        row = np.abs(d[r0 : r0 + m])
        rank = np.empty(m, np.int64)
        rank[np.argsort(row, kind="stable")] = np.arange(m)
        p = np.full(m, density) if m == 1 else (density - eps) + (rank / (m - 1)) * 2.0 * eps
        keep[r0 : r0 + m] = u[r0 : r0 + m] < p
    return keep


def rescale_factor(d, keep, mode, density):
    """mergekit's norm-matching rescale (or 1/density), applied only when something was
    removed (0 < density < 1)."""
    if mode is None or density >= 1 or density <= 0:
        return 1.0
    if mode == "density":
        return 1.0 / density
    d64, k64 = d.astype(np.float64), np.where(keep, d, 0).astype(np.float64)
    norm = {"l1": lambda v: np.abs(v).sum(), "l2": lambda v: np.sqrt((v * v).sum()), "linf": lambda v: np.abs(v).max()}[mode]
    before, after = norm(d64), norm(k64)
    return 1.0 if before < 1e-7 or after < 1e-7 else before / after


def ref_gta(base, xs, weights, keeps, scales, consensus, normalize, lam, count_mean=False, by_count=False):
    """mergekit's generalized task arithmetic. Deltas are weighted in float32 as the engine
    (and mergekit) do, so the sign election sees the same numbers; the rest in float64."""
    b = np.asarray(base, np.float32).ravel()
    ds = deltas32(base, xs)
    w32 = [np.float32(w) for w in weights]
    dw = [((np.where(k, d, np.float32(0)) * np.float32(s)) * w) for d, k, s, w in zip(ds, keeps, scales, w32)]
    if consensus:
        s = np.zeros_like(b)
        for d in dw:
            s = s + (np.sign(d) if by_count else d)
        maj = np.where(s >= 0, 1.0, -1.0)
        agree = [np.sign(d) == maj for d in dw]
        mixed = sum(np.where(a, d.astype(np.float64), 0.0) for a, d in zip(agree, dw))
        div = sum(a * (1.0 if count_mean else float(w)) for a, w in zip(agree, w32))
        div = np.where(div == 0, 1.0, div)
        if normalize:
            mixed = mixed / div
    else:
        mixed = sum(d.astype(np.float64) for d in dw)
        tot = float(sum(np.float32(w) for w in w32))
        if normalize:
            mixed = mixed / (1.0 if abs(tot) < 1e-8 else tot)
    return b.astype(np.float64) + lam * mixed


def ref_sce(base, xs, topk):
    b = np.asarray(base, np.float32).ravel()
    tv = np.stack(deltas32(base, xs))
    n = tv.shape[1]
    if topk < 1:
        t64 = tv.astype(np.float64)
        var = (((t64 - t64.mean(0)) ** 2).mean(0)).astype(np.float32)
        k = int(np.float32(np.count_nonzero(var)) * np.float32(topk)) if topk > 0 else 0
        keep = np.zeros(n, bool)
        if k > 0:
            keep[np.argsort(-var.astype(np.float64), kind="stable")[:k]] = True
        tv = np.where(keep, tv, np.float32(0))
    ms = (tv.astype(np.float64) ** 2).mean(1)
    w = np.full(len(xs), 1.0 / len(xs)) if abs(ms.sum()) < 1e-6 else ms / ms.sum()
    s = np.zeros(n, np.float32)
    for t in tv:
        s = s + t
    maj = np.where(s >= 0, 1.0, -1.0)
    agree = np.sign(tv) == maj
    ew = w[:, None] * agree
    return b + (tv * ew).sum(0) / np.maximum(ew.sum(0), 1e-6)


def close(got, ref, tol=2e-5, what=""):
    got = np.asarray(got, np.float64).ravel()
    ref = np.asarray(ref, np.float64).ravel()
    err = np.abs(got - ref) / (1.0 + np.abs(ref))
    assert err.max() <= tol, f"{what}: max rel err {err.max():.3g} at {err.argmax()} (got {got[err.argmax()]}, ref {ref[err.argmax()]})"


def problem(shape=(33, 70), n=2, scale=0.05, rng=RNG):
    base = rng.standard_normal(shape).astype(np.float32)
    xs = [(base + rng.standard_normal(shape) * scale).astype(np.float32) for _ in range(n)]
    return base, xs


# --------------------------------------------------------------------------- ties
@pytest.mark.parametrize("density", [0.05, 0.3, 0.77, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_reference(mf, density, normalize):
    base, xs = problem(n=3)
    w = [0.7, 0.5, 1.2]
    got = mf.ties(base, xs, weights=w, density=density, normalize=normalize, lam=0.9)
    assert got.shape == base.shape and got.dtype == np.float32
    ds = deltas32(base, xs)
    keeps = [keep_topk(d, density) for d in ds]
    ref = ref_gta(base, xs, w, keeps, [1, 1, 1], True, normalize, 0.9)
    close(got, ref, what=f"ties d={density}")


def test_ties_per_model_density_rescale_and_multichunk(mf):
    # 150_000 elements: three engine chunks, thresholds and their ties counted across chunks.
    base, xs = problem(shape=(150_000,), n=2)
    # Quantize base and one delta (exactly representable sums) so the threshold falls inside
    # a large group of equal magnitudes spread over every chunk.
    base = (np.round(base * 1024) / 1024).astype(np.float32)
    xs[0] = (base + np.round(RNG.standard_normal(base.shape) * 2) / 32).astype(np.float32)
    for mode in ["l1", "l2", "linf", "density"]:
        got = mf.ties(base, xs, weights=[1.0, 0.6], density=[0.45, 0.2], rescale_mode=mode)
        ds = deltas32(base, xs)
        keeps = [keep_topk(d, dd) for d, dd in zip(ds, [0.45, 0.2])]
        scales = [rescale_factor(d, k, mode, dd) for d, k, dd in zip(ds, keeps, [0.45, 0.2])]
        close(got, ref_gta(base, xs, [1.0, 0.6], keeps, scales, True, True, 1.0), what=mode)
    # exactly k entries of the quantized delta survive (ties resolved by index)
    single = mf.ties(base, xs[:1], density=0.45, normalize=False) - base
    assert np.count_nonzero(single) == int(0.45 * base.size)


def test_ties_sign_cases(mf):
    rng = np.random.default_rng(5)
    base = rng.standard_normal((40, 30)).astype(np.float32)
    d = np.abs(rng.standard_normal((40, 30))).astype(np.float32) * 0.1 + 0.01
    cases = {
        "all_agree": [base + d, base + 2 * d, base + 0.5 * d],
        "all_disagree": [base + d, base - d],
        "zero_deltas": [base.copy(), base.copy()],
        "colinear": [base + d * np.sign(base), base + 3 * d * np.sign(base)],
        "one_zero": [base.copy(), base - d],
    }
    for name, xs in cases.items():
        w = [1.0] * len(xs)
        for dens in [0.5, 1.0]:
            got = mf.ties(base, xs, weights=w, density=dens)
            keeps = [keep_topk(x, dens) for x in deltas32(base, xs)]
            close(got, ref_gta(base, xs, w, keeps, [1] * len(xs), True, True, 1.0), what=f"{name} {dens}")
    # the two exact special cases, by hand
    np.testing.assert_array_equal(mf.ties(base, [base.copy(), base.copy()], density=0.5), base)
    agree = mf.ties(base, [base + d, base + 3 * d], weights=[1, 1], density=1.0)
    close(agree, base + 2 * d.astype(np.float64), what="mean of agreeing")


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_disjoint_mean_and_consensus_variants(mf, method):
    base, xs = problem(n=3)
    w = [0.3, 1.0, 0.6]
    fn = getattr(mf, method)
    for count_mean, by_count in [(True, False), (False, True)]:
        got = fn(base, xs, weights=w, density=1.0, normalize=True, disjoint_mean="count" if count_mean else None,
                 consensus="count" if by_count else None)
        ref = ref_gta(base, xs, w, [np.ones(base.size, bool)] * 3, [1] * 3, True, True, 1.0, count_mean, by_count)
        close(got, ref, what=f"{method} count_mean={count_mean} by_count={by_count}")


# --------------------------------------------------------------------------- breadcrumbs
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("density,gamma", [(0.9, 0.01), (0.5, 0.1), (0.95, 0.2), (0.3, 0.0), (0.05, 0.01), (1.0, 0.3)])
def test_breadcrumbs_matches_reference(mf, method, density, gamma):
    base, xs = problem(n=2)
    w = [0.8, 0.4]
    got = getattr(mf, method)(base, xs, weights=w, density=density, gamma=gamma, lam=1.1)
    keeps = [keep_breadcrumbs(d, density, gamma) for d in deltas32(base, xs)]
    ref = ref_gta(base, xs, w, keeps, [1, 1], method.endswith("ties"), False, 1.1)
    close(got, ref, what=f"{method} {density} {gamma}")


def test_breadcrumbs_small_gamma_keeps_the_top(mf):
    # gamma*n < 1: old mergekit (indices[n_bot:-0]) zeroed the whole delta. Nothing is removed
    # from the top here: the `target` largest entries survive.
    base, xs = problem(shape=(50,), n=1)
    got = mf.breadcrumbs(base, xs, density=0.5, gamma=0.01) - base
    d = deltas32(base, xs)[0]
    top = np.argsort(-np.abs(d), kind="stable")[:25]
    assert np.count_nonzero(got) == 25
    assert set(np.flatnonzero(got)) == set(top)


# --------------------------------------------------------------------------- DARE
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("density", [0.05, 0.35, 1.0])
@pytest.mark.parametrize("mode", [None, "density", "l2"])
def test_dare_matches_reference_rng(mf, method, density, mode):
    base, xs = problem(shape=(70, 40), n=3)
    w = [0.5, 1.0, 0.8]
    got = getattr(mf, method)(base, xs, weights=w, density=density, rescale_mode=mode, seed=11, normalize=True)
    ds = deltas32(base, xs)
    keeps = [keep_dare(d.size, density, 11, i) for i, d in enumerate(ds)]
    scales = [rescale_factor(d, k, mode or "l1", density) for d, k in zip(ds, keeps)]
    ref = ref_gta(base, xs, w, keeps, scales, method == "dare_ties", True, 1.0)
    close(got, ref, what=f"{method} {density} {mode}")


def test_dare_no_rescale(mf):
    base, xs = problem(n=2)
    got = mf.dare_linear(base, xs, density=0.5, rescale=False, seed=3)
    keeps = [keep_dare(base.size, 0.5, 3, i) for i in range(2)]
    close(got, ref_gta(base, xs, [1, 1], keeps, [1, 1], False, False, 1.0), what="dare no rescale")


def test_dare_statistics_and_rescale_semantics(mf):
    rng = np.random.default_rng(9)
    base = rng.standard_normal(300_000).astype(np.float32)
    x = (base + rng.standard_normal(300_000).astype(np.float32) * 0.1).astype(np.float32)
    d = deltas32(base, [x])[0].astype(np.float64)
    for density in [0.1, 0.5, 0.9]:
        l1 = mf.dare_linear(base, [x], density=density, seed=1) - base.astype(np.float64)
        kept = l1 != 0
        assert abs(kept.mean() - density) < 0.005, (density, kept.mean())
        # mergekit's rescale: the L1 norm of the delta is preserved exactly
        assert abs(np.abs(l1).sum() / np.abs(d).sum() - 1) < 1e-4
        # the paper's rescale: survivors times exactly 1/density, expectation preserved
        pap = mf.dare_linear(base, [x], density=density, seed=1, rescale_mode="density") - base.astype(np.float64)
        np.testing.assert_array_equal(pap != 0, kept)
        close(pap[kept] + base[kept], (d[kept] / density) + base[kept], tol=1e-5, what="1/density")
        assert abs(pap.sum() - d.sum()) < 5 * np.sqrt((d * d).sum() * (1 - density) / density)


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_random_methods_deterministic_across_threads_and_seeds(mf, method):
    base, xs = problem(shape=(200_003,), n=3)
    kw = dict(weights=[1.0, 0.5, 0.7], density=0.4)
    r1 = getattr(mf, method)(base, xs, threads=1, seed=5, **kw)
    r2 = getattr(mf, method)(base, xs, threads=2, seed=5, **kw)
    assert r1.tobytes() == r2.tobytes()
    r3 = getattr(mf, method)(base, xs, threads=2, seed=6, **kw)
    assert not np.array_equal(r1, r3)


# --------------------------------------------------------------------------- DELLA
@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("shape", [(37, 45), (500,), (4, 1), (2, 3, 4)])
@pytest.mark.parametrize("density,eps", [(0.4, 0.15), (0.7, 0.25), (1.0, 0.15), (0.2, 0.15)])
def test_della_matches_reference_rng(mf, method, shape, density, eps):
    base, xs = problem(shape=shape, n=2)
    w = [1.0, 0.6]
    got = getattr(mf, method)(base, xs, weights=w, density=density, epsilon=eps, seed=2)
    ds = deltas32(base, xs)
    keeps = [keep_della(d, shape, density, eps, 2, i) for i, d in enumerate(ds)]
    scales = [rescale_factor(d, k, "l1", density) for d, k in zip(ds, keeps)]
    ref = ref_gta(base, xs, w, keeps, scales, method == "della", method == "della", 1.0)
    close(got, ref, what=f"{method} {shape} {density}")


def test_della_keep_probability_follows_rank(mf):
    base = np.zeros((400, 64), np.float32)
    x = np.tile(np.arange(1, 65, dtype=np.float32), (400, 1))  # rank = column in every row
    got = mf.della_linear(base, [x], density=0.5, epsilon=0.3, rescale=False, seed=8)
    frac = (got != 0).mean(0)
    expect = 0.2 + np.arange(64) / 63 * 0.6
    assert np.abs(frac - expect).max() < 0.1
    assert abs((got != 0).mean() - 0.5) < 0.02


# --------------------------------------------------------------------------- SCE
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.01])
@pytest.mark.parametrize("n", [2, 3])
def test_sce_matches_reference(mf, topk, n):
    base, xs = problem(n=n)
    got = mf.sce(base, xs, select_topk=topk)
    close(got, ref_sce(base, xs, topk), what=f"sce {topk}")


def test_sce_multichunk_and_degenerate(mf):
    base, xs = problem(shape=(140_000,), n=3)
    close(mf.sce(base, xs, select_topk=0.3), ref_sce(base, xs, 0.3), what="sce multichunk")
    same = [base.copy(), base.copy()]
    np.testing.assert_array_equal(mf.sce(base, same, select_topk=0.5), base)
    np.testing.assert_array_equal(mf.sce(base, same), base)


# --------------------------------------------------------------------------- params
def test_param_rules(mf):
    base, xs = problem(n=2)
    a = mf.ties(base, xs, density=0.5, int8_mask=True)
    np.testing.assert_array_equal(a, mf.ties(base, xs, density=0.5))
    with pytest.raises(mf.ConfigError, match="epsilon"):
        mf.della(base, xs, density=0.1)  # 0.1 - 0.15 <= 0, as mergekit refuses
    with pytest.raises(mf.ConfigError, match="rescale"):
        mf.dare_linear(base, xs, density=0.5, rescale=False, rescale_mode="l1")
    with pytest.raises(mf.ConfigError, match="rescale_mode"):
        mf.ties(base, xs, rescale_mode="l3")
    with pytest.raises(mf.ConfigError, match="unknown"):
        mf.merge("ties", xs, base=base, params={"densty": 0.5})
    with pytest.raises(mf.ConfigError, match="unknown"):
        mf.merge("dare_linear", xs, base=base, params={"disjoint_mean": "count"})
    with pytest.raises(mf.ConfigError, match="base"):
        mf.merge("ties", xs, params={"density": 0.5})
    with pytest.raises(mf.ConfigError, match="gamma"):
        mf.breadcrumbs(base, xs, density=0.5, gamma=-0.1)
    with pytest.raises(mf.ConfigError):
        mf.ties(base, xs, weights=[1.0, 2.0, 3.0])
    # lam and lambda are the same parameter
    np.testing.assert_array_equal(
        mf.merge("ties", xs, base=base, params={"density": 0.5, "lam": 0.5}),
        mf.ties(base, xs, density=0.5, lam=0.5),
    )


# --------------------------------------------------------------------------- folders
FOLDER_METHODS = {
    "ties": dict(weights=[0.7, 0.5], density=[0.6, 0.4]),
    "dare_ties": dict(weights=[0.7, 0.5], density=0.5),
    "breadcrumbs": dict(weights=[1.0, 0.5], density=0.8, gamma=0.05),
    "della_linear": dict(weights=[1.0, 0.5], density=0.5, epsilon=0.1),
    "sce": dict(select_topk=0.4),
}


# mergekit's defaults: (consensus, normalize, rescale)
DEFAULTS = {
    "ties": (True, True, False), "dare_ties": (True, False, True), "dare_linear": (False, False, True),
    "breadcrumbs": (False, False, False), "breadcrumbs_ties": (True, False, False),
    "della": (True, True, True), "della_linear": (False, False, True),
}


def reference(method, kw, base, xs, name="array", seed=0):
    """The numpy reference of any method of the family with keyword arguments `kw` (the public
    API's names: weights, density, gamma, epsilon, select_topk), mergekit defaults otherwise."""
    shape = np.shape(base)
    if method == "sce":
        return ref_sce(base, xs, kw.get("select_topk", 1.0)).reshape(shape)
    ds = deltas32(base, xs)
    n = len(xs)
    per = lambda v, d: [float(x) for x in v] if isinstance(v, (list, tuple)) else [d if v is None else float(v)] * n
    w, dens = per(kw.get("weights"), 1.0), per(kw.get("density"), 1.0)
    cons, norm, resc = DEFAULTS[method]
    if method == "ties":
        keeps = [keep_topk(d, dd) for d, dd in zip(ds, dens)]
    elif method.startswith("dare"):
        keeps = [keep_dare(d.size, dd, seed, i, name) for i, (d, dd) in enumerate(zip(ds, dens))]
    elif method.startswith("breadcrumbs"):
        gam = per(kw.get("gamma"), 0.01)
        keeps = [keep_breadcrumbs(d, dd, g) for d, dd, g in zip(ds, dens, gam)]
    else:
        eps = per(kw.get("epsilon"), 0.15)
        keeps = [keep_della(d, shape, dd, e, seed, i, name) for i, (d, dd, e) in enumerate(zip(ds, dens, eps))]
    scales = [rescale_factor(d, k, "l1" if resc else None, dd) for d, k, dd in zip(ds, keeps, dens)]
    return ref_gta(base, xs, w, keeps, scales, cons, norm, 1.0).reshape(shape)


def folder_reference(method, kw, base, xs, name, shape, seed):
    return reference(method, kw, base, xs, name, seed).reshape(shape)


ALL = ["ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce"]


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("density", [0.3, 0.5, 1.0])
def test_every_method_sign_cases(mf, method, density):
    rng = np.random.default_rng(17)
    base = rng.standard_normal((24, 30)).astype(np.float32)
    d = np.abs(rng.standard_normal((24, 30))).astype(np.float32) * 0.1 + 0.01
    s = np.sign(rng.standard_normal((24, 30))).astype(np.float32)
    cases = {
        "all_agree": [base + d, base + 2 * d, base + 0.5 * d],
        "all_disagree": [base + d, base - d],
        "mixed_signs": [base + s * d, base - 0.3 * d, base + d * s[::-1]],
        "zero_deltas": [base.copy(), base.copy()],
        "one_zero": [base.copy(), base - d],
        "colinear": [base + s * d, base + 3 * s * d],
    }
    for name, xs in cases.items():
        if method == "sce":
            kw = {"select_topk": density}
        else:
            kw = {"weights": [1.0, 0.6, 0.8][: len(xs)], "density": density}
            if method.startswith("della") and 0 < density < 1:
                kw["epsilon"] = 0.2
        got = getattr(mf, method)(base, xs, seed=3, **kw)
        close(got, reference(method, kw, base, xs, seed=3), what=f"{method} {name} density={density}")
        if name == "zero_deltas":
            np.testing.assert_array_equal(got, base)


@pytest.mark.parametrize("method", list(FOLDER_METHODS))
def test_folder_merge_tensor_by_tensor(mf, llama_f32, tmp_path, method):
    kw = FOLDER_METHODS[method]
    out = tmp_path / "out"
    fam = llama_f32
    getattr(mf, method)(str(fam.base), [str(fam.a), str(fam.b)], out=str(out), seed=4, **kw)
    got = read_folder_f32(out)
    tb, ta, tbb = read_folder_f32(fam.base), read_folder_f32(fam.a), read_folder_f32(fam.b)
    assert set(got) == set(tb)
    for name, g in got.items():
        ref = folder_reference(method, kw, tb[name], [ta[name], tbb[name]], name, tb[name].shape, 4)
        close(g, ref, what=f"{method} {name}")


# --------------------------------------------------------------------------- mergekit parity
PARITY = {
    # method: (per-model parameters, global parameters, tolerance on |ours - mergekit| / (1 + |mergekit|)).
    # Measured: bit-identical except ties with L1 rescale (norms summed in f64 here, f32 in
    # torch) and sce (variance/weights in f64 here), both <= 2e-8.
    "ties": ([{"weight": 0.7, "density": 0.6}, {"weight": 0.5, "density": 0.4}], {}, 1e-7),
    "ties_opts": ([{"weight": 1.0, "density": 0.3}, {"weight": 0.6, "density": 0.7}],
                  {"normalize": False, "rescale": True, "lambda": 0.8, "int8_mask": True}, 1e-7),
    "breadcrumbs": ([{"weight": 1.0, "density": 0.8, "gamma": 0.05}, {"weight": 0.5, "density": 0.7, "gamma": 0.1}], {}, 1e-7),
    "breadcrumbs_ties": ([{"weight": 0.8, "density": 0.6, "gamma": 0.05}, {"weight": 0.6, "density": 0.9, "gamma": 0.05}],
                         {"normalize": True}, 1e-7),
    "sce": ([{}, {}], {"select_topk": 0.4}, 1e-7),
    "sce_all": ([{}, {}], {}, 1e-7),
    # random methods: density 1 keeps everything (deterministic); statistics below otherwise
    "dare_ties": ([{"weight": 0.7, "density": 1.0}, {"weight": 0.5, "density": 1.0}], {}, 1e-7),
    "dare_linear": ([{"weight": 0.7, "density": 1.0}, {"weight": 0.5, "density": 1.0}], {"normalize": True}, 1e-7),
    "della": ([{"weight": 0.7, "density": 1.0}, {"weight": 0.5, "density": 1.0}], {}, 1e-7),
    "della_linear": ([{"weight": 0.7, "density": 1.0}, {"weight": 0.5, "density": 1.0}], {}, 1e-7),
    "dare_linear_stats": ([{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}], {}, None),
    "della_linear_stats": ([{"weight": 1.0, "density": 0.5, "epsilon": 0.2}, {"weight": 1.0, "density": 0.5, "epsilon": 0.2}], {}, None),
}


def _method_of(key):
    for suffix in ("_opts", "_all", "_stats"):
        key = key.removesuffix(suffix)
    return key


@pytest.fixture(scope="module")
def mergekit_outputs(llama_f32, tmp_path_factory):
    pytest.importorskip("mergekit")
    import yaml

    root = tmp_path_factory.mktemp("mergekit")
    fam = llama_f32
    jobs = []
    for key, (per_model, glob, _) in PARITY.items():
        cfg = {
            "merge_method": _method_of(key),
            "base_model": str(fam.base),
            "models": [{"model": str(p), "parameters": pm} for p, pm in zip([fam.a, fam.b], per_model)],
            "dtype": "float32",
        }
        if glob:
            cfg["parameters"] = glob
        f = root / f"{key}.yml"
        f.write_text(yaml.safe_dump(cfg))
        jobs.append((str(f), str(root / key)))
    # `mergekit-yaml CFG OUT --lazy-unpickle` for each config, in one interpreter.
    code = textwrap.dedent(
        """
        import json, sys
        from mergekit.scripts.run_yaml import main
        for cfg, out in json.loads(sys.argv[1]):
            main([cfg, out, "--lazy-unpickle", "--quiet", "--random-seed", "0"], standalone_mode=False)
        """
    )
    r = subprocess.run([sys.executable, "-c", code, json.dumps(jobs)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return {key: root / key for key in PARITY}


@pytest.mark.parametrize("key", list(PARITY))
def test_mergekit_parity(mf, llama_f32, tmp_path, mergekit_outputs, key):
    per_model, glob, tol = PARITY[key]
    fam = llama_f32
    params = dict(glob)
    for k in ("weight", "density", "gamma", "epsilon"):
        if k in per_model[0]:
            params[k] = [pm[k] for pm in per_model]
    out = tmp_path / "out"
    mf.merge(_method_of(key), [str(fam.a), str(fam.b)], base=str(fam.base), params=params, out=str(out), seed=0)
    ours = read_folder_f32(out)
    theirs = read_folder_f32(mergekit_outputs[key])
    assert set(ours) == set(theirs)
    if tol is not None:
        worst = 0.0
        for name in ours:
            a, b = ours[name].astype(np.float64), theirs[name].astype(np.float64)
            err = np.abs(a - b) / (1.0 + np.abs(b))
            worst = max(worst, float(err.max()))
            assert err.max() <= tol, f"{key} {name}: max rel err {err.max():.3g}"
        print(f"{key}: worst relative difference to mergekit {worst:.3g}")
        return
    # random drops: compare statistics of the (independently drawn) masks
    base = read_folder_f32(fam.base)
    for name in ours:
        if ours[name].size < 1000:
            continue
        b = base[name]
        fo, ft = (ours[name] == b).mean(), (theirs[name] == b).mean()
        # both models dropped w.p. 0.5 each: an element stays at base w.p. ~0.25
        assert abs(fo - 0.25) < 0.05 and abs(ft - 0.25) < 0.05, (name, fo, ft)
        l1o, l1t = np.abs(ours[name] - b).sum(), np.abs(theirs[name] - b).sum()
        assert abs(l1o / l1t - 1) < 0.1, (name, l1o, l1t)


# --------------------------------------------------------------------------- memory
def test_whole_tensor_memory_stays_bounded():
    """3 models, one 4M-element matrix: thresholds, masks and statistics must cost at most about
    one whole-tensor buffer more than a plain task_arithmetic merge (peak RSS growth)."""
    code = textwrap.dedent(
        """
        import resource, numpy as np, merge_fast as mf
        shape = (1024, 4096)
        rng = np.random.default_rng(0)
        base = np.empty(shape, np.float32); rng.standard_normal(out=base, dtype=np.float32)
        xs = []
        for _ in range(3):
            x = np.empty(shape, np.float32); rng.standard_normal(out=x, dtype=np.float32)
            x *= 0.01; x += base; xs.append(x)
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = mf.task_arithmetic(base, xs); del out  # warm-up: thread pool, allocator, one output
        before = peak()
        for f in (lambda: mf.ties(base, xs, density=0.3, rescale=True), lambda: mf.breadcrumbs_ties(base, xs, density=0.5),
                  lambda: mf.della(base, xs, density=0.5), lambda: mf.sce(base, xs, select_topk=0.3)):
            out = f(); del out
        print((peak() - before) / base.nbytes)
        """
    )
    # Large blocks straight from mmap, so freed buffers leave the RSS at once (glibc otherwise
    # keeps blocks under 32 MB on its heap and the peak would measure the allocator).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    buffers = float(r.stdout.strip().splitlines()[-1])
    print(f"peak RSS growth: {buffers:.2f} whole-tensor buffers")
    assert buffers < 1.0, f"peak memory grew by {buffers:.2f} whole-tensor buffers"
