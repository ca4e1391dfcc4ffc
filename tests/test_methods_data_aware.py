"""Fisher-weighted and Fisher-dampened merges against numpy formulas written here."""
from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import read_folder_f32, st_read_header


def ref_fisher_weighted(models, fishers, weights=None, eps=1e-8, normalize="none"):
    n = len(models)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    f = [np.asarray(x, np.float64) for x in fishers]
    if normalize == "mean":
        f = [x / x.mean() if x.mean() > 0 else x for x in f]
    num = sum(w[i] * (f[i] + eps) * models[i].astype(np.float64) for i in range(n))
    den = sum(w[i] * (f[i] + eps) for i in range(n))
    return num / den


def fhat(f, mode):
    f = np.asarray(f, np.float64)
    if mode == "log":
        f = np.log(np.maximum(f, 0) + 1e-30)
    lo, hi = f.min(), f.max()
    return np.zeros_like(f) if hi <= lo else (f - lo) / (hi - lo)


def ref_fisher_dampened(base, models, fisher, scale=1.0, layer=0.0, mode="log", weights=None):
    w = np.ones(len(models)) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum()
    b = base.astype(np.float64)
    delta = sum(wi * (m.astype(np.float64) - b) for wi, m in zip(w, models))
    return b + scale * (1 - fhat(fisher, mode)) * (1 - layer) * delta


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def test_fisher_weighted_arrays(mf, rng):
    a, b, c = rng.standard_normal((3, 300, 7)).astype(np.float32)
    # Fishers spanning orders of magnitude, with exact zeros.
    fs = (rng.random((3, 300, 7)) ** 6).astype(np.float32)
    fs[0, :10] = 0
    for kw in [{}, {"weights": [1, 2, 0.5]}, {"epsilon": 0.0}, {"fisher_normalize": "mean"}]:
        got = mf.fisher_weighted([a, b, c], list(fs), **kw)
        ref = ref_fisher_weighted([a, b, c], fs, kw.get("weights"), kw.get("epsilon", 1e-8), kw.get("fisher_normalize", "none"))
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6, err_msg=str(kw))


def test_fisher_weighted_zero_fisher_falls_back(mf, rng):
    a, b = rng.standard_normal((2, 50)).astype(np.float32)
    z = np.zeros(50, np.float32)
    # ε alone: the plain average.
    np.testing.assert_allclose(mf.fisher_weighted([a, b], [z, z]), (a + b) / 2, rtol=1e-5, atol=1e-7)
    # ε = 0 and no Fisher anywhere: the weighted average, not NaN.
    np.testing.assert_allclose(mf.fisher_weighted([a, b], [z, z], weights=[3, 1], epsilon=0.0), (3 * a + b) / 4, rtol=1e-5, atol=1e-7)
    # One model confident where the other has no information: it wins there.
    fa = np.ones(50, np.float32)
    np.testing.assert_allclose(mf.fisher_weighted([a, b], [fa, z], epsilon=0.0), a, rtol=1e-6)


def test_fisher_weighted_rejects_negative_fisher(mf, rng):
    a, b = rng.standard_normal((2, 20)).astype(np.float32)
    f = np.ones(20, np.float32)
    g = f.copy()
    g[3] = -1
    f[5] = -2
    # The first offending element (then model) is named.
    with pytest.raises(mf.NumericalError, match=r"Fisher of model #1 is negative \(-1\) at element 3"):
        mf.fisher_weighted([a, b], [f, g])


@pytest.mark.parametrize("mode", ["log", "minmax", "rank"])
def test_fisher_dampened_arrays(mf, rng, mode):
    base, a, b = rng.standard_normal((3, 5000)).astype(np.float32)
    fisher = (rng.random(5000) ** 8).astype(np.float32)
    got = mf.fisher_dampened(base, [a, b], fisher, scale=0.7, normalization=mode, layer_importance=0.3)
    if mode == "rank":
        # Quantile rank, from 1024 interpolated quantiles: within ~1/1000 of the exact rank.
        ranks = np.argsort(np.argsort(fisher)) / (fisher.size - 1)
        b64 = base.astype(np.float64)
        delta = ((a - b64) + (b - b64)) / 2
        ref = b64 + 0.7 * (1 - ranks) * 0.7 * delta
        np.testing.assert_allclose(got, ref, atol=2e-3 * np.abs(delta).max())
    else:
        ref = ref_fisher_dampened(base, [a, b], fisher, 0.7, 0.3, mode)
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6)


def test_fisher_dampened_extremes(mf, rng):
    base, a = rng.standard_normal((2, 100)).astype(np.float32)
    fisher = rng.random(100).astype(np.float32)
    # Most important entry keeps θ_IT exactly; least important takes the whole delta.
    got = mf.fisher_dampened(base, [a], fisher, normalization="minmax")
    i, j = fisher.argmax(), fisher.argmin()
    assert got[i] == base[i]
    np.testing.assert_allclose(got[j], a[j], rtol=1e-5, atol=1e-7)
    # A fully important layer keeps the base everywhere; a constant Fisher does not dampen.
    np.testing.assert_array_equal(mf.fisher_dampened(base, [a], fisher, layer_importance=1.0), base)
    np.testing.assert_allclose(mf.fisher_dampened(base, [a], np.full(100, 3.0, np.float32)), a, rtol=1e-5, atol=1e-7)


def _write_fisher(model_dir, path, rng, layer_scale=None, drop=()):
    tensors = read_folder_f32(model_dir)
    out = {}
    for name, t in tensors.items():
        if name in drop:
            continue
        f = (rng.random(t.shape) ** 4).astype(np.float32)
        if layer_scale is not None:
            f *= layer_scale(name)
        out[name] = f
    save_file(out, str(path))
    return out


def test_fisher_weighted_folders(mf, model_family, tmp_path, rng):
    fam = model_family("llama", "bfloat16")
    fa = _write_fisher(fam.a, tmp_path / "fa.safetensors", rng)
    fb = _write_fisher(fam.b, tmp_path / "fb.safetensors", rng)
    r = mf.fisher_weighted([str(fam.a), str(fam.b)], [str(tmp_path / "fa.safetensors"), str(tmp_path / "fb.safetensors")],
                           weights=[1.0, 2.0], out=str(tmp_path / "out"))
    assert r.tensors_written == len(fa)
    A, B, O = read_folder_f32(fam.a), read_folder_f32(fam.b), read_folder_f32(tmp_path / "out")
    import ml_dtypes

    for name in A:
        ref = ref_fisher_weighted([A[name], B[name]], [fa[name], fb[name]], [1.0, 2.0])
        ref_bf16 = ref.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
        # One bf16 rounding of a value computed in f32 vs f64: at most one bf16 ulp apart.
        np.testing.assert_allclose(O[name], ref_bf16, rtol=2 ** -7, atol=1e-6, err_msg=name)


class _FsPath(os.PathLike):
    """An os.PathLike that is not a pathlib.Path: its str() is not the path."""

    def __init__(self, p):
        self.p = str(p)

    def __fspath__(self):
        return self.p


def test_fisher_weighted_folders_os_pathlike(mf, model_family, tmp_path, rng):
    # Model and Fisher paths went through str(), which turns such an object into its repr
    # (then looked up as a hub repo id): they must be read where os.fspath points.
    fam = model_family("llama", "float32")
    _write_fisher(fam.a, tmp_path / "fa.safetensors", rng)
    _write_fisher(fam.b, tmp_path / "fb.safetensors", rng)
    fishers = [tmp_path / "fa.safetensors", tmp_path / "fb.safetensors"]
    mf.fisher_weighted([_FsPath(fam.a), _FsPath(fam.b)], [_FsPath(f) for f in fishers], out=_FsPath(tmp_path / "o"))
    mf.fisher_weighted([str(fam.a), str(fam.b)], [str(f) for f in fishers], out=str(tmp_path / "ref"))
    got, ref = read_folder_f32(tmp_path / "o"), read_folder_f32(tmp_path / "ref")
    assert sorted(got) == sorted(ref) and all(np.array_equal(got[k], ref[k]) for k in ref)
    # the recipe in the metadata names the same folders
    assert st_read_header(tmp_path / "o" / "model.safetensors")[0]["__metadata__"] == \
        st_read_header(tmp_path / "ref" / "model.safetensors")[0]["__metadata__"]


def test_fisher_dampened_folders_layer_importance(mf, model_family, tmp_path, rng):
    from merge_fast.methods.data_aware import layer_importance, layer_of

    fam = model_family("llama", "float32")
    # Layer 1 is ten times more important than layer 0.
    scale = lambda n: 10.0 if layer_of(n) == 1 else 1.0  # noqa: E731
    F = _write_fisher(fam.base, tmp_path / "f.safetensors", rng, layer_scale=scale)
    imp = layer_importance(tmp_path / "f.safetensors")
    means = {}
    for n, f in F.items():
        if layer_of(n) is not None:
            s = means.setdefault(layer_of(n), [0.0, 0])
            s[0] += f.astype(np.float64).sum()
            s[1] += f.size
    lm = {k: s / c for k, (s, c) in means.items()}
    lo, hi = min(lm.values()), max(lm.values())
    for n in F:
        L = layer_of(n)
        expect = (lm[L] - lo) / (hi - lo) if L is not None else min(max((F[n].astype(np.float64).mean() - lo) / (hi - lo), 0), 1)
        assert imp[n] == pytest.approx(expect, abs=1e-9), n
    assert {imp[n] for n in F if layer_of(n) == 1} == {1.0}

    r = mf.fisher_dampened(str(fam.base), [str(fam.a), str(fam.b)], str(tmp_path / "f.safetensors"), scale=0.5, out=str(tmp_path / "out"))
    base, A, B, O = (read_folder_f32(d) for d in (fam.base, fam.a, fam.b, tmp_path / "out"))
    for n in base:
        ref = ref_fisher_dampened(base[n], [A[n], B[n]], F[n], 0.5, imp[n])
        np.testing.assert_allclose(O[n], ref, rtol=1e-5, atol=1e-6, err_msg=n)
    # Layer 1 tensors are fully protected.
    for n in base:
        if layer_of(n) == 1:
            np.testing.assert_array_equal(O[n], base[n])
    assert r.tensors_written == len(base)


def test_layer_importance_single_layer(tmp_path, rng):
    from merge_fast.methods.data_aware import layer_importance

    save_file({"model.layers.0.w": rng.random(10).astype(np.float32), "model.norm.weight": rng.random(4).astype(np.float32)},
              str(tmp_path / "f.safetensors"))
    assert layer_importance(tmp_path / "f.safetensors") == {"model.layers.0.w": 0.0, "model.norm.weight": 0.0}


def test_checkpoint_sum_matches_exact_sum(mf, tmp_path, rng):
    # Several engine chunks (summed in parallel) of values over many magnitudes, against the
    # exactly rounded sum.
    import math
    from merge_fast import _core

    x = (rng.standard_normal(300_001) * 10.0 ** rng.integers(-8, 4, 300_001)).astype(np.float32)
    save_file({"a": x, "empty": np.zeros((0,), np.float32)}, str(tmp_path / "f.safetensors"))
    ck = _core.Checkpoint(str(tmp_path / "f.safetensors"))
    want = math.fsum(x.astype(np.float64))
    assert ck.sum("a") == pytest.approx(want, rel=1e-12, abs=1e-12 * float(np.abs(x.astype(np.float64)).sum()))
    assert ck.sum("empty") == 0.0
    with pytest.raises(mf.MergeError, match="nope"):
        ck.sum("nope")


def test_missing_fisher_tensors_named(mf, model_family, tmp_path, rng):
    fam = model_family("llama", "float32")
    names = list(read_folder_f32(fam.base))
    dropped = [names[3], names[5]]
    _write_fisher(fam.base, tmp_path / "f.safetensors", rng, drop=dropped)
    with pytest.raises(mf.TensorMismatch) as e:
        mf.fisher_dampened(str(fam.base), [str(fam.a)], str(tmp_path / "f.safetensors"), out=str(tmp_path / "out"))
    assert dropped[0] in str(e.value) and "f.safetensors" in str(e.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(mf.TensorMismatch):
        mf.fisher_weighted([str(fam.a), str(fam.b)], [str(tmp_path / "f.safetensors")] * 2, out=str(tmp_path / "out2"))
    assert not (tmp_path / "out2").exists()


def test_bad_parameters(mf, rng):
    a, b = rng.standard_normal((2, 10)).astype(np.float32)
    f = np.ones(10, np.float32)
    with pytest.raises(mf.ConfigError, match="normalization"):
        mf.fisher_dampened(a, [b], f, normalization="cubic")
    with pytest.raises(mf.ConfigError, match="Fishers"):
        mf.fisher_weighted([a, b], [f])
    with pytest.raises(mf.ConfigError, match="layer_importance"):
        mf.fisher_dampened(a, [b], f, layer_importance=1.5)


def test_cli_data_aware_commands(mf, model_family, tmp_path, rng, capsys):
    from merge_fast.cli import main

    fam = model_family("llama", "float32")
    _write_fisher(fam.a, tmp_path / "fa.safetensors", rng)
    _write_fisher(fam.b, tmp_path / "fb.safetensors", rng)
    assert main(["fisher-weighted", str(fam.a), str(fam.b), "--fishers", str(tmp_path / "fa.safetensors"),
                 str(tmp_path / "fb.safetensors"), "--weights", "1", "3", "-o", str(tmp_path / "cli"), "-q"]) == 0
    mf.fisher_weighted([str(fam.a), str(fam.b)], [str(tmp_path / "fa.safetensors"), str(tmp_path / "fb.safetensors")],
                       weights=[1, 3], out=str(tmp_path / "api"))
    cli, api = read_folder_f32(tmp_path / "cli"), read_folder_f32(tmp_path / "api")
    assert cli.keys() == api.keys() and all(np.array_equal(cli[k], api[k]) for k in cli)

    assert main(["fisher-dampened", str(fam.base), str(fam.a), "--fisher", str(tmp_path / "fa.safetensors"),
                 "--scale", "0.5", "-o", str(tmp_path / "damp"), "-q"]) == 0
    assert (tmp_path / "damp" / "model.safetensors").exists()
    assert main(["subspace-masks", str(fam.a), str(fam.base), "--rank", "2", "-o", str(tmp_path / "m.safetensors")]) == 0
    assert "masks for" in capsys.readouterr().out
    # Bad input: an error message, exit code 1, nothing written.
    assert main(["fisher-dampened", str(fam.base), str(fam.a), "--fisher", str(tmp_path / "nope.safetensors"),
                 "-o", str(tmp_path / "bad"), "-q"]) == 1
    assert not (tmp_path / "bad").exists()


def test_fisher_dampened_with_lora_deltas(mf, model_family, tmp_path, rng):
    """The Luchador recipe's deltas: LoRA adapters trained on θ_IT, Δ_i = B_i A_i α/r."""
    from test_lora import make_adapter, numpy_merge

    fam = model_family("llama", "float32")
    it = read_folder_f32(fam.base)
    ad1 = make_adapter(tmp_path / "ad1", it, r=4, alpha=8, seed=1)
    ad2 = make_adapter(tmp_path / "ad2", it, r=2, alpha=2, modules=("q_proj", "down_proj"), seed=2)
    F = _write_fisher(fam.base, tmp_path / "f.safetensors", rng)
    m1, m2 = numpy_merge(it, ad1, 8 / 4), numpy_merge(it, ad2, 2 / 2)
    r = mf.fisher_dampened(str(fam.base), [f"{fam.base}+{tmp_path / 'ad1'}", f"{fam.base}+{tmp_path / 'ad2'}"],
                           str(tmp_path / "f.safetensors"), scale=0.8, out=str(tmp_path / "out"))
    from merge_fast.methods.data_aware import layer_importance

    imp = layer_importance(tmp_path / "f.safetensors")
    O = read_folder_f32(tmp_path / "out")
    for n in it:
        ref = ref_fisher_dampened(it[n], [m1[n], m2[n]], F[n], 0.8, imp[n])
        np.testing.assert_allclose(O[n], ref, rtol=1e-5, atol=1e-6, err_msg=n)
    # Exactly the adapted tensors outside the most important layer (F̂_layer = 1) move.
    adapted = {n for n in it if not np.array_equal(m1[n], it[n]) or not np.array_equal(m2[n], it[n])}
    moved = {n for n in it if not np.array_equal(O[n], it[n])}
    assert moved == {n for n in adapted if imp[n] < 1.0} and len(moved) >= 3
    assert r.tensors_written == len(it)


def test_fisher_merges_from_configs(mf, model_family, tmp_path, rng):
    """merge_method: fisher_weighted / fisher_dampened in YAML give the Python API's bytes."""
    from test_lora import make_adapter

    fam = model_family("llama", "float32")
    _write_fisher(fam.a, tmp_path / "fa.safetensors", rng)
    _write_fisher(fam.b, tmp_path / "fb.safetensors", rng)
    cfg = f"""
merge_method: fisher_weighted
models:
  - model: {fam.a}
    parameters: {{fisher: {tmp_path / 'fa.safetensors'}, weight: 2.0}}
  - model: {fam.b}
    parameters: {{fisher: {tmp_path / 'fb.safetensors'}}}
parameters: {{epsilon: 1.0e-6}}
"""
    mf.run(cfg, tmp_path / "cfg_fw")
    mf.fisher_weighted([str(fam.a), str(fam.b)], [str(tmp_path / "fa.safetensors"), str(tmp_path / "fb.safetensors")],
                       weights=[2.0, 1.0], epsilon=1e-6, out=str(tmp_path / "api_fw"))
    x, y = read_folder_f32(tmp_path / "cfg_fw"), read_folder_f32(tmp_path / "api_fw")
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    assert (tmp_path / "cfg_fw" / "README.md").exists() and (tmp_path / "cfg_fw" / "mergekit_config.yml").exists()

    make_adapter(tmp_path / "ad", read_folder_f32(fam.base), seed=3)
    cfg = f"""
merge_method: fisher_dampened
base_model: {fam.base}
models:
  - model: {fam.a}
  - model: {fam.base}+{tmp_path / 'ad'}
parameters: {{fisher: {tmp_path / 'fa.safetensors'}, scale: 0.5, normalization: rank}}
"""
    mf.run(cfg, tmp_path / "cfg_fd")
    mf.fisher_dampened(str(fam.base), [str(fam.a), f"{fam.base}+{tmp_path / 'ad'}"], str(tmp_path / "fa.safetensors"),
                       scale=0.5, normalization="rank", out=str(tmp_path / "api_fd"))
    x, y = read_folder_f32(tmp_path / "cfg_fd"), read_folder_f32(tmp_path / "api_fd")
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)

    with pytest.raises(mf.ConfigError, match="line 7.*scael"):
        mf.run(cfg.replace("scale:", "scael:"), tmp_path / "bad")
    with pytest.raises(mf.ConfigError, match="parameters.fisher"):
        mf.run(cfg.replace(f"fisher: {tmp_path / 'fa.safetensors'}, ", ""), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
