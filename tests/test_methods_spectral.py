"""tsv_merge (TSV-M), iso_c and iso_cts against float64 numpy implementations of the
formulas written here (FusionBench's recipes), on arrays and on model folders."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import read_folder_native

import merge_fast as mf
from merge_fast import ConfigError


def f64(x):
    return np.asarray(x, dtype=np.float64)


def polar(a):
    p, _, qt = np.linalg.svd(a, full_matrices=False)
    return p @ qt


def ref_mean(base, xs, alpha):
    b = f64(base)
    return b + alpha * np.mean([f64(x) - b for x in xs], axis=0)


def ref_tsv(base, xs, alpha=1.0):
    """alpha: a number (scales the result) or one per model (scales each Δ_i first)."""
    b = f64(base)
    if not np.isscalar(alpha):
        xs, alpha = [b + a * (f64(x) - b) for a, x in zip(alpha, xs)], 1.0
    if b.ndim != 2:
        return ref_mean(base, xs, alpha)
    t, r = len(xs), min(b.shape)
    k = r // t
    us, ss, vs = [], [], []
    for x in xs:
        u, s, vt = np.linalg.svd(f64(x) - b, full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vt[:k])
    u, s, vt = np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vs, 0)
    return b + alpha * polar(u) @ np.diag(s) @ polar(vt.T).T


def ref_iso_c(base, xs, scaling_factor=1.0):
    b = f64(base)
    if b.ndim != 2:
        return ref_mean(base, xs, scaling_factor)
    u, s, vt = np.linalg.svd(sum(f64(x) - b for x in xs), full_matrices=False)
    return b + scaling_factor * s.mean() * u @ vt


def ref_iso_cts(base, xs, scaling_factor=1.0, common_space_fraction=0.8):
    b = f64(base)
    if b.ndim != 2:
        return ref_mean(base, xs, scaling_factor)
    t, r = len(xs), min(b.shape)
    k = round((r - int(r * common_space_fraction)) / t)  # Python's round: half to even
    if t * k > r:
        k -= 1
    c = r - t * k
    ds = [f64(x) - b for x in xs]
    u, s, vt = np.linalg.svd(sum(ds), full_matrices=False)
    uc = u[:, :c]
    us, ss, vs = [uc], [s[:c]], [vt[:c]]
    for d in ds:
        ui, si, vti = np.linalg.svd(d - uc @ uc.T @ d, full_matrices=False)
        us.append(ui[:, :k]), ss.append(si[:k]), vs.append(vti[:k])
    uu, sall, vv = np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vs, 0)
    return b + scaling_factor * sall.mean() * polar(uu) @ polar(vv.T).T


REFS = {"tsv_merge": ref_tsv, "iso_c": ref_iso_c, "iso_cts": ref_iso_cts}
CALLS = {"tsv_merge": mf.tsv_merge, "iso_c": mf.iso_c, "iso_cts": mf.iso_cts}


def close(got, ref, what, rtol=2e-5):
    got = np.asarray(got)
    assert got.shape == ref.shape and got.dtype == np.float32, what
    scale = np.abs(ref).max()
    err = np.abs(f64(got) - ref).max()
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol} * {scale:.3g}"


def task_set(shape, t, seed, rank=None):
    """A base and `t` fine-tunes; with `rank`, each delta has that exact rank."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(np.float32)
    xs = []
    for _ in range(t):
        if rank is None or len(shape) != 2:
            d = rng.standard_normal(shape)
        else:
            d = rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))
        xs.append((base + 0.1 * d).astype(np.float32))
    return base, xs


@pytest.mark.parametrize("name", list(REFS))
@pytest.mark.parametrize("shape,t", [((12, 9), 2), ((9, 20), 3), ((16, 16), 4), ((30, 7), 1)])
def test_arrays_match_numpy(name, shape, t):
    base, xs = task_set(shape, t, seed=hash((name, shape, t)) % 2**32)
    got = CALLS[name](base, xs)
    close(got, REFS[name](base, xs), f"{name} {shape} T={t}")


def test_parameters_scale_and_split():
    base, xs = task_set((24, 18), 3, seed=5)
    close(mf.tsv_merge(base, xs, alpha=0.3), ref_tsv(base, xs, 0.3), "tsv alpha")
    close(mf.tsv_merge(base, xs, alpha=[0.3, 1.2, -0.5]), ref_tsv(base, xs, [0.3, 1.2, -0.5]), "tsv per-model alpha")
    b1, x1 = task_set((19,), 3, seed=6)
    close(mf.tsv_merge(b1, x1, alpha=[0.3, 1.2, -0.5]), ref_tsv(b1, x1, [0.3, 1.2, -0.5]), "tsv per-model alpha 1-D")
    close(mf.iso_c(base, xs, scaling_factor=1.5), ref_iso_c(base, xs, 1.5), "iso_c scale")
    for f in (0.0, 0.25, 0.5, 1.0):
        close(mf.iso_cts(base, xs, scaling_factor=0.7, common_space_fraction=f),
              ref_iso_cts(base, xs, 0.7, f), f"iso_cts fraction {f}")
    # common_space_fraction = 1: no task-specific directions, Iso-CTS is Iso-C.
    close(mf.iso_cts(base, xs, common_space_fraction=1.0), ref_iso_c(base, xs), "iso_cts f=1 == iso_c")


def test_tasks_in_orthogonal_subspaces_are_kept_exactly():
    """Hand-worked: with r = 6 and T = 3, each task keeps k = 2 triplets. Deltas of rank 2
    on mutually orthogonal left and right subspaces are their own truncations and their
    stacks are already orthonormal, so TSV-M returns the plain sum (task arithmetic)."""
    rng = np.random.default_rng(3)
    q1, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    q2, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    base = rng.standard_normal((8, 6)).astype(np.float32)
    ds = [q1[:, 2 * i:2 * i + 2] @ np.diag([3.0 - i, 0.5]) @ q2[:, 2 * i:2 * i + 2].T for i in range(3)]
    xs = [(base + d).astype(np.float32) for d in ds]
    close(mf.tsv_merge(base, xs), f64(base) + sum(ds), "TSV-M of orthogonal rank-2 tasks", rtol=1e-5)


@pytest.mark.parametrize("name", list(REFS))
def test_one_dimensional_tensors_get_the_mean_task_vector(name):
    base, xs = task_set((37,), 3, seed=11)
    key = "alpha" if name == "tsv_merge" else "scaling_factor"
    got = CALLS[name](base, xs, **{key: 2.0})
    close(got, f64(base) + 2.0 * np.mean([f64(x) - f64(base) for x in xs], axis=0), f"{name} 1-D")


@pytest.mark.parametrize("name", list(REFS))
def test_deterministic_across_threads(name):
    base, xs = task_set((70, 50), 3, seed=2)
    one = CALLS[name](base, xs, threads=1)
    two = CALLS[name](base, xs, threads=2)
    assert one.tobytes() == two.tobytes()
    assert CALLS[name](base, xs, threads=2).tobytes() == two.tobytes()


def test_bad_parameters_are_config_errors():
    base, xs = task_set((6, 5), 2, seed=1)
    with pytest.raises(ConfigError, match="common_space_fraction"):
        mf.iso_cts(base, xs, common_space_fraction=1.5)
    with pytest.raises(ConfigError, match="base"):
        mf.merge("tsv_merge", xs)
    with pytest.raises(ConfigError, match="unknown parameter"):
        mf.merge("iso_c", xs, base=base, params={"alpha": 1.0})


@pytest.fixture(scope="module")
def folders(model_family):
    fam = model_family("llama", "float32", False)
    return fam, {n: read_folder_native(p) for n, p in (("base", fam.base), ("a", fam.a), ("b", fam.b))}


@pytest.mark.parametrize("name", list(REFS))
def test_folders_tensor_by_tensor_and_config(name, folders, tmp_path):
    fam, T = folders
    params = {"alpha": 0.8} if name == "tsv_merge" else {"scaling_factor": 0.8}
    res = CALLS[name](fam.base, [fam.a, fam.b], out=tmp_path / "api", **params)
    got = read_folder_native(res.path if hasattr(res, "path") else tmp_path / "api")
    assert sorted(got) == sorted(T["base"])
    n2 = 0
    for k, b in T["base"].items():
        ref = REFS[name](b, [T["a"][k], T["b"][k]], 0.8)
        close(got[k], ref, f"{name} {k}")
        n2 += b.ndim == 2
    assert n2 >= 10
    # The same merge from a config.
    cfg = {"merge_method": name, "base_model": str(fam.base), "models": [{"model": str(fam.a)}, {"model": str(fam.b)}],
           "parameters": params, "dtype": "float32"}
    mf.run(cfg, tmp_path / "cfg", write_model_card=False)
    via_cfg = read_folder_native(tmp_path / "cfg")
    for k in got:
        assert via_cfg[k].tobytes() == got[k].tobytes(), k


def test_cli_subcommands_equal_the_api(folders, tmp_path):
    from merge_fast.cli import main

    fam, _ = folders
    models = [str(fam.base), str(fam.a), str(fam.b)]
    cases = [("tsv-merge", ["--alpha", "0.5"], mf.tsv_merge, {"alpha": 0.5}),
             ("iso-c", ["--scaling-factor", "1.5"], mf.iso_c, {"scaling_factor": 1.5}),
             ("iso-cts", ["--scaling-factor", "1.5", "--common-space-fraction", "0.5"], mf.iso_cts,
              {"scaling_factor": 1.5, "common_space_fraction": 0.5})]
    for cmd, flags, fn, kw in cases:
        assert main([cmd, *models, *flags, "-o", str(tmp_path / cmd), "-q"]) == 0
        fn(fam.base, [fam.a, fam.b], out=tmp_path / f"api-{cmd}", **kw)
        got, want = read_folder_native(tmp_path / cmd), read_folder_native(tmp_path / f"api-{cmd}")
        assert sorted(got) == sorted(want)
        assert all(got[k].tobytes() == want[k].tobytes() for k in got), cmd


@pytest.mark.parametrize("name", list(REFS))
def test_non_finite_task_vector_is_a_numerical_error(name):
    base, xs = task_set((6, 5), 2, seed=4)
    xs[1][2, 3] = np.inf
    with pytest.raises(mf.NumericalError, match="input model #1 is inf at element 13"):
        CALLS[name](base, xs)
