"""RegMean (Jin et al. 2023) against a numpy float64 formula written here: arrays, folders
(Gram files keyed by weight name, other tensors averaged), configs, and bad inputs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import read_folder_f32, st_write


def shrink(g, alpha):
    g = np.asarray(g, np.float64)
    return alpha * g + (1 - alpha) * np.diag(np.diag(g))


def ref_regmean(ws, gs, alpha=0.9, weights=None):
    """W* = (Σ w_i W_i G̃_i)(Σ w_i G̃_i)⁻¹, numpy float64, no ridge."""
    w = np.ones(len(ws)) if weights is None else np.asarray(weights, np.float64)
    num = sum(wi * np.asarray(W, np.float64) @ shrink(G, alpha) for wi, W, G in zip(w, ws, gs))
    den = sum(wi * shrink(G, alpha) for wi, G in zip(w, gs))
    return num @ np.linalg.inv(den)


def gram(rng, t, d, dead=()):
    x = rng.standard_normal((t, d))
    x[:, list(dead)] = 0
    return (x.T @ x).astype(np.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(11)


def test_regmean_arrays_match_numpy(mf, rng):
    ws = list(rng.standard_normal((3, 6, 5)).astype(np.float32))
    gs = [gram(rng, 40, 5), gram(rng, 12, 5), gram(rng, 7, 5)]
    for kw in [{}, {"reduce_non_diagonal_ratio": 0.5}, {"alpha": 1.0}, {"reduce_non_diagonal_ratio": 0.0},
               {"weights": [1.0, 3.0, 0.5]}]:
        got = mf.regmean(ws, gs, ridge=0.0, **kw)
        a = kw.get("reduce_non_diagonal_ratio", kw.get("alpha", 0.9))
        ref = ref_regmean(ws, gs, a, kw.get("weights"))
        assert got.shape == (6, 5) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5, err_msg=str(kw))
    # the default ridge (1e-6 of the mean diagonal) is invisible on well-posed Grams
    np.testing.assert_allclose(mf.regmean(ws, gs), ref_regmean(ws, gs), rtol=1e-4, atol=1e-4)
    # the alias is the same parameter
    assert np.array_equal(mf.regmean(ws, gs, alpha=0.3), mf.regmean(ws, gs, reduce_non_diagonal_ratio=0.3))
    with pytest.raises(mf.ConfigError, match="not both"):
        mf.regmean(ws, gs, alpha=0.3, reduce_non_diagonal_ratio=0.5)
    # RegMean's defining property: with α = 1 the merge minimizes Σ_i |X_i W*ᵀ − X_i W_iᵀ|²,
    # i.e. no other matrix has a smaller total output error on the tasks' inputs
    xs = [rng.standard_normal((9, 5)) for _ in range(2)]
    g2 = [(x.T @ x).astype(np.float32) for x in xs]
    w2 = ws[:2]
    best = mf.regmean(w2, g2, alpha=1.0, ridge=0.0).astype(np.float64)
    err = lambda W: sum(np.sum((x @ W.T - x @ Wi.T.astype(np.float64)) ** 2) for x, Wi in zip(xs, w2))  # noqa: E731
    for _ in range(5):
        assert err(best) <= err(best + 1e-3 * rng.standard_normal(best.shape)) + 1e-9
    assert err(best) < err((w2[0] + w2[1]) / 2.0)


def test_regmean_fan_in_fan_out_and_torch_tensors(mf, rng):
    torch = pytest.importorskip("torch")
    ws = list(rng.standard_normal((2, 4, 7)).astype(np.float32))  # [in=4, out=7] (Conv1D)
    gs = [gram(rng, 20, 4), gram(rng, 20, 4)]
    got = mf.regmean(ws, gs, fan_in_fan_out=True, ridge=0.0)
    np.testing.assert_allclose(got, ref_regmean([w.T for w in ws], gs).T, rtol=1e-4, atol=1e-5)
    t = mf.regmean([torch.from_numpy(w.T.copy()) for w in ws], [torch.from_numpy(g) for g in gs], ridge=0.0)
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), got.T, rtol=1e-6, atol=1e-6)


def test_singular_grams_are_solved_by_the_ridge(mf, rng):
    # coordinates 3 and 5 are never excited by any task: Σ G̃ is singular there
    ws = list(rng.standard_normal((2, 4, 6)).astype(np.float32))
    gs = [gram(rng, 30, 6, dead=(3, 5)), gram(rng, 4, 6, dead=(3, 5))]
    got = mf.regmean(ws, gs, weights=[1.0, 3.0])
    live = [0, 1, 2, 4]
    ref_live = ref_regmean([w[:, live] for w in ws], [g[np.ix_(live, live)] for g in gs], weights=[1.0, 3.0])
    np.testing.assert_allclose(got[:, live], ref_live, rtol=1e-3, atol=1e-4)
    # unexcited input directions get the weighted mean of the models
    np.testing.assert_allclose(got[:, [3, 5]], (ws[0] + 3 * ws[1])[:, [3, 5]] / 4, rtol=1e-5, atol=1e-6)
    with pytest.raises(mf.NumericalError, match="positive definite.*ridge"):
        mf.regmean(ws, gs, ridge=0.0)


def test_bad_array_inputs(mf, rng):
    ws = list(rng.standard_normal((2, 3, 4)).astype(np.float32))
    g = gram(rng, 9, 4)
    with pytest.raises(mf.TensorMismatch, match=r"model #1 has shape \(3, 4\) and its Gram \(3, 3\)"):
        mf.regmean(ws, [g, g[:3, :3]])
    with pytest.raises(mf.TensorMismatch, match="2-D weights"):
        mf.regmean([w.reshape(-1) for w in ws], [g, g])
    with pytest.raises(mf.ConfigError, match="2 models but 1 Gram"):
        mf.regmean(ws, [g])
    bad = g.copy()
    bad[1, 1] = -1.0
    with pytest.raises(mf.NumericalError, match="negative diagonal"):
        mf.regmean(ws, [g, bad])


LIN = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"]
CONV = "transformer.h.0.mlp.c_fc.weight"  # stored [in, out]


def _family(tmp_path, rng, n=2):
    shapes = {LIN[0]: (6, 4), LIN[1]: (4, 6), CONV: (4, 5), "model.norm.weight": (4,),
              "model.embed_tokens.weight": (10, 4), "model.layers.0.mlp.up_proj.bias": (6,)}
    models, grams = [], []
    for i in range(n):
        d = tmp_path / f"m{i}"
        d.mkdir()
        t = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        st_write(d / "model.safetensors", t, {"format": "pt"})
        g = {LIN[0]: gram(rng, 15 + i, 4), LIN[1]: gram(rng, 20, 6), CONV: gram(rng, 9, 4)}
        gp = tmp_path / f"g{i}.safetensors"
        st_write(gp, g, {"format": "merge_fast.gram", "fan_in_fan_out": json.dumps([CONV])})
        models.append((d, t))
        grams.append((gp, g))
    return models, grams


def _check_folder(out, models, grams, weights=None, alpha=0.9):
    got = read_folder_f32(out)
    ts, gs = [t for _, t in models], [g for _, g in grams]
    assert sorted(got) == sorted(ts[0])
    for k in LIN:
        np.testing.assert_allclose(got[k], ref_regmean([t[k] for t in ts], [g[k] for g in gs], alpha, weights),
                                   rtol=1e-4, atol=1e-4, err_msg=k)
    np.testing.assert_allclose(got[CONV], ref_regmean([t[CONV].T for t in ts], [g[CONV] for g in gs], alpha, weights).T,
                               rtol=1e-4, atol=1e-4)
    w = np.ones(len(ts)) if weights is None else np.asarray(weights)
    for k in ("model.norm.weight", "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.bias"):
        np.testing.assert_allclose(got[k], sum(wi * t[k] for wi, t in zip(w, ts)) / w.sum(), rtol=1e-6, atol=1e-6)


def test_regmean_folders_and_config(mf, rng, tmp_path):
    models, grams = _family(tmp_path, rng)
    m = [str(d) for d, _ in models]
    g = [str(p) for p, _ in grams]
    mf.regmean(m, g, out=str(tmp_path / "out"))
    _check_folder(tmp_path / "out", models, grams)
    mf.regmean(m, g, weights=[2.0, 1.0], alpha=0.6, out=str(tmp_path / "out_w"))
    _check_folder(tmp_path / "out_w", models, grams, weights=[2.0, 1.0], alpha=0.6)
    cfg = f"""
merge_method: regmean
models:
  - model: {m[0]}
    parameters: {{gram: {g[0]}, weight: 2.0}}
  - model: {m[1]}
    parameters: {{gram: {g[1]}, weight: 1.0}}
parameters: {{reduce_non_diagonal_ratio: 0.6}}
"""
    mf.run(cfg, tmp_path / "cfg")
    x, y = read_folder_f32(tmp_path / "cfg"), read_folder_f32(tmp_path / "out_w")
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    with pytest.raises(mf.ConfigError, match="parameters.gram"):
        mf.run(cfg.replace(f"gram: {g[1]}, ", ""), tmp_path / "bad")
    with pytest.raises(mf.ConfigError, match="unknown parameter 'alfa'"):
        mf.run(cfg.replace("reduce_non_diagonal_ratio", "alfa"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_regmean_folder_bad_inputs(mf, rng, tmp_path):
    models, grams = _family(tmp_path, rng)
    m = [str(d) for d, _ in models]
    g = [str(p) for p, _ in grams]
    out = str(tmp_path / "bad")
    with pytest.raises(mf.ModelNotFound, match="nope.safetensors.*not found"):
        mf.regmean(m, [g[0], str(tmp_path / "nope.safetensors")], out=out)
    bad = dict(grams[1][1])
    bad[LIN[1]] = gram(rng, 5, 4)  # [4, 4] for a weight with in = 6
    st_write(tmp_path / "shape.safetensors", bad, {"fan_in_fan_out": json.dumps([CONV])})
    with pytest.raises(mf.TensorMismatch, match=rf"'{LIN[1]}'.*shape.safetensors.*\[4, 4\]"):
        mf.regmean(m, [g[0], str(tmp_path / "shape.safetensors")], out=out)
    part = {k: v for k, v in grams[1][1].items() if k != LIN[0]}
    st_write(tmp_path / "part.safetensors", part, {"fan_in_fan_out": json.dumps([CONV])})
    with pytest.raises(mf.TensorMismatch, match=rf"'{LIN[0]}'.*some files but not in others"):
        mf.regmean(m, [g[0], str(tmp_path / "part.safetensors")], out=out)
    extra = dict(grams[1][1], **{"lm_head.weight": gram(rng, 5, 4)})
    st_write(tmp_path / "extra.safetensors", extra, {"fan_in_fan_out": json.dumps([CONV])})
    with pytest.raises(mf.TensorMismatch, match="'lm_head.weight'.*extra.safetensors.*do not have"):
        mf.regmean(m, [g[0], str(tmp_path / "extra.safetensors")], out=out)
    # without the orientation metadata, the Conv1D Gram does not fit [out, in]
    st_write(tmp_path / "nometa.safetensors", grams[1][1], {})
    with pytest.raises(mf.TensorMismatch, match=CONV):
        mf.regmean(m, [g[0], str(tmp_path / "nometa.safetensors")], out=out)
    assert not (tmp_path / "bad").exists()


def test_regmean_result_does_not_depend_on_the_thread_count(mf, rng):
    # 150 output rows: three column blocks of the parallel solve
    ws = list(rng.standard_normal((3, 150, 20)).astype(np.float32))
    gs = [gram(rng, 25, 20) for _ in range(3)]
    one = mf.regmean(ws, gs, threads=1)
    assert np.array_equal(one, mf.regmean(ws, gs, threads=3))
    np.testing.assert_allclose(one, ref_regmean(ws, gs), rtol=1e-4, atol=1e-4)
