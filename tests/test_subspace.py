"""Subspace masks against numpy.linalg.svd."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from safetensors import safe_open


def _pair(tmp_path, rng, shapes):
    it, pt = {}, {}
    for name, (m, n, r) in shapes.items():
        base = rng.standard_normal((m, n)).astype(np.float32)
        # A low-rank "instruction tuning" delta with a decaying spectrum, plus small noise.
        U = np.linalg.qr(rng.standard_normal((m, r)))[0]
        V = np.linalg.qr(rng.standard_normal((n, r)))[0]
        s = 2.0 ** -np.arange(r)
        delta = (U * s) @ V.T + 1e-4 * rng.standard_normal((m, n))
        pt[name] = base
        it[name] = (base + delta).astype(np.float32)
    it["model.norm.weight"] = pt["model.norm.weight"] = np.ones(8, np.float32)
    (tmp_path / "it").mkdir()
    (tmp_path / "pt").mkdir()
    save_file(it, str(tmp_path / "it" / "model.safetensors"))
    save_file(pt, str(tmp_path / "pt" / "model.safetensors"))
    return it, pt


def test_masks_match_numpy_svd(tmp_path):
    import merge_fast as mf
    from merge_fast.subspace import subspace_masks

    rng = np.random.default_rng(0)
    shapes = {"model.layers.0.q.weight": (96, 64, 12), "model.layers.0.down.weight": (40, 200, 10)}
    it, pt = _pair(tmp_path, rng, shapes)
    r = 4
    info = subspace_masks(tmp_path / "it", tmp_path / "pt", r, tmp_path / "masks.safetensors")
    assert set(info) == set(shapes)  # the 1-D norm is skipped
    masks = load_file(str(tmp_path / "masks.safetensors"))
    for name in shapes:
        d = it[name].astype(np.float64) - pt[name].astype(np.float64)
        U, S, Vt = np.linalg.svd(d, full_matrices=False)
        u, v = masks[name + ".U"], masks[name + ".V"]
        assert u.shape == (d.shape[0], r) and v.shape == (d.shape[1], r)
        for i in range(r):
            # Singular vectors are defined up to sign.
            assert abs(abs(float(u[:, i] @ U[:, i])) - 1) < 1e-4, (name, i)
            assert abs(abs(float(v[:, i] @ Vt[i])) - 1) < 1e-4, (name, i)
        rank, energy, _exact = info[name]
        assert rank == r
        assert energy == pytest.approx((S[:r] ** 2).sum() / (S ** 2).sum(), abs=1e-4)
    with safe_open(str(tmp_path / "masks.safetensors"), "np") as f:
        meta = f.metadata()
    assert meta["rank"] == "4" and "energy" in meta
    # Deterministic: the same seed writes the same bytes.
    subspace_masks(tmp_path / "it", tmp_path / "pt", r, tmp_path / "m2.safetensors")
    assert (tmp_path / "masks.safetensors").read_bytes() == (tmp_path / "m2.safetensors").read_bytes()
    # A filter, and errors.
    only = subspace_masks(tmp_path / "it", tmp_path / "pt", 2, tmp_path / "m3.safetensors", include=r"\.q\.")
    assert list(only) == ["model.layers.0.q.weight"]
    with pytest.raises(mf.ConfigError):
        subspace_masks(tmp_path / "it", tmp_path / "pt", 0, tmp_path / "m4.safetensors")
    assert not (tmp_path / "m4.safetensors").exists()


def test_masks_shape_mismatch_named(tmp_path):
    import merge_fast as mf
    from merge_fast.subspace import subspace_masks

    for d, n in (("it", 8), ("pt", 9)):
        (tmp_path / d).mkdir()
        save_file({"w": np.ones((n, 4), np.float32)}, str(tmp_path / d / "model.safetensors"))
    with pytest.raises(mf.TensorMismatch, match="'w'"):
        subspace_masks(tmp_path / "it", tmp_path / "pt", 2, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    assert not list(tmp_path.glob(".m.safetensors*"))
