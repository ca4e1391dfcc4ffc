"""Issue 8, "no panic / no silently wrong numbers": parameter ranges (declared once, in the
Rust kernels), non-finite inputs refused the same way by every method, weights whose sum
overflows, empty checkpoints, non-float buffers copied through, mixed input dtypes noted."""
from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest

from conftest import BF16, st_read, st_read_header, st_write
from merge_fast import _core

RNG = np.random.default_rng(8)

# method -> (takes a base, number of non-base inputs, parameters): a valid call of each.
# Derived from the method's spec (below); these rows refine the methods that need a
# particular call (required parameters, auxiliary inputs, a ranged default).
HAND = {
    "linear": (False, 2, {}),
    "task_arithmetic": (True, 2, {}),
    "slerp": (True, 1, {"t": 0.3}),
    "ties": (True, 2, {"density": 0.5}),
    "dare_ties": (True, 2, {"density": 0.5}),
    "dare_linear": (True, 2, {"density": 0.5}),
    "breadcrumbs": (True, 2, {"density": 0.5, "gamma": 0.05}),
    "breadcrumbs_ties": (True, 2, {"density": 0.5, "gamma": 0.05}),
    "della": (True, 2, {"density": 0.5, "epsilon": 0.1}),
    "della_linear": (True, 2, {"density": 0.5, "epsilon": 0.1}),
    "sce": (True, 2, {"select_topk": 0.5}),
    "model_stock": (True, 2, {}),
    "nuslerp": (True, 2, {"weight": [1.0, 2.0]}),
    "multislerp": (False, 2, {"weight": [1.0, 2.0]}),
    "karcher": (False, 2, {}),
    "nearswap": (True, 1, {"t": 0.5}),
    "ram": (True, 2, {}),
    "ramplus_tl": (True, 2, {}),
    "arcee_fusion": (True, 1, {}),
    "passthrough": (False, 1, {}),
    "fisher_weighted": (False, 4, {}),  # two models, then their Fishers
    "fisher_dampened": (True, 2, {}),  # one fine-tune, then the base's Fisher
    "tsv_merge": (True, 2, {}),
    "iso_c": (True, 2, {}),
    "iso_cts": (True, 2, {}),
    "regmean": (False, 4, {}),  # two weights, then their Gram matrices
}



def _from_spec(spec: dict) -> tuple:
    """A valid call from the spec: the base when required, two models (within the declared
    counts), and each required parameter at the middle of its declared range."""
    lo, hi = spec["min_models"], spec["max_models"]
    n = max(lo, min(2, hi if hi is not None else 2))
    params = {}
    for p in spec["params"]:
        if p["required"]:
            a, _, b, _ = p["range"] or (0.0, False, 1.0, False)
            v = (max(a, -1.0) + min(b, 1.0)) / 2
            params[p["name"]] = [v] * n if p["per_model"] else v
    return spec["base"] == "required", n, params


SPECS = {s["name"]: s for s in _core.method_specs()}
CASES = {name: HAND.get(name) or _from_spec(spec) for name, spec in SPECS.items()}


def test_cases_cover_every_method(mf):
    assert set(CASES) == set(mf._core.METHODS)
    for name, (has_base, n, params) in HAND.items():  # the refined rows agree with the specs
        spec = SPECS[name]
        assert has_base == (spec["base"] == "required") or spec["base"] in ("optional", "ignored"), name
        assert n >= spec["min_models"] and (spec["max_models"] is None or n <= spec["max_models"]), name
        assert set(params) <= {p["name"] for p in spec["params"]}, name


def inputs(method, shape=(6, 50)):
    has_base, n, params = CASES[method]
    if method == "regmean":  # square weights, then Grams XᵀX (mf.merge takes one shape);
        # its own generator: the shared RNG's sequence stays as the other tests expect
        r = np.random.default_rng(50)
        xs = [r.standard_normal((50, 50)).astype(np.float32) for _ in range(4)]
        return None, xs[:2] + [(x.T @ x).astype(np.float32) for x in xs[2:]], params
    base = RNG.standard_normal(shape).astype(np.float32)
    xs = [(base + 0.1 * RNG.standard_normal(shape)).astype(np.float32) for _ in range(n)]
    if method.startswith("fisher"):  # Fishers are non-negative
        k = 2 if method == "fisher_weighted" else 1
        xs[-k:] = [np.abs(x) for x in xs[-k:]]
    return (base if has_base else None), xs, params


# ------------------------------------------------------------------ non-finite inputs
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("method", sorted(CASES))
def test_every_method_refuses_non_finite_input(mf, method, value):
    base, xs, params = inputs(method)
    assert np.isfinite(mf.merge(method, xs, base=base, params=params)).all()  # the valid call
    bad = xs[0].copy()
    bad.flat[57] = value
    before = bad.tobytes()
    with pytest.raises(mf.NumericalError) as ei:
        mf.merge(method, [bad] + xs[1:], base=base, params=params)
    msg = str(ei.value)
    assert "'array'" in msg and "model #0" in msg and "element 57" in msg, msg
    assert bad.tobytes() == before
    if base is not None:  # in the base too
        b = base.copy()
        b.flat[3] = value
        with pytest.raises(mf.NumericalError, match=r"the base .*element 3"):
            mf.merge(method, xs, base=b, params=params)


def folder(root, name, tensors):
    d = root / name
    d.mkdir()
    st_write(d / "model.safetensors", tensors)
    return d


@pytest.mark.parametrize("method,params", [("karcher", {}), ("ties", {"density": 0.5}), ("ram", {}),
                                           ("breadcrumbs", {"density": 0.5})])
def test_folder_merge_names_tensor_model_and_element(mf, tmp_path, method, params):
    w = RNG.standard_normal((3, 4)).astype(np.float32)
    bad = w + 1
    bad[1, 2] = np.nan
    base = folder(tmp_path, "base", {"w": w})
    a = folder(tmp_path, "a", {"w": w + 0.5})
    b = folder(tmp_path, "b", {"w": bad})
    out = tmp_path / "out"
    with pytest.raises(mf.NumericalError) as ei:
        if method == "karcher":
            mf.merge(method, [str(a), str(b)], params=params, out=str(out))
        else:
            mf.merge(method, [str(a), str(b)], base=str(base), params=params, out=str(out))
    msg = str(ei.value)
    assert "'w'" in msg and "model #1" in msg and str(b) in msg and "element 6" in msg, msg
    assert not out.exists()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_passthrough_folder_writes_the_input_bytes(mf, tmp_path, dtype):
    """Passthrough without a scale copies the stored bytes (no widening and rounding back):
    every value, -0.0 and subnormals included, comes out bit for bit; with a scale the kernel
    runs; a NaN is refused naming tensor, model and element, as on every merge path."""
    np_dt = BF16 if dtype == "bfloat16" else np.dtype(dtype)
    w = (RNG.standard_normal((300, 700)) * 0.02).astype(np.float32)
    w.flat[:4] = [0.0, -0.0, 1e-40, -6e-39]
    w = w.astype(np_dt)
    src = folder(tmp_path, "a", {"w": w, "v": w[0]})
    out = tmp_path / "out"
    mf.merge("passthrough", [str(src)], out=str(out))
    _, got = st_read(out / "model.safetensors")
    assert got["w"].dtype == np_dt and got["w"].tobytes() == w.tobytes()
    assert got["v"].tobytes() == w[0].tobytes()
    mf.merge("passthrough", [str(src)], params={"scale": 2.0}, out=str(out), overwrite=True)
    _, got = st_read(out / "model.safetensors")
    assert np.array_equal(got["w"].astype(np.float32), (w.astype(np.float32) * 2).astype(np_dt).astype(np.float32))
    bad = w.copy()
    bad.flat[100_000] = np.nan  # in the second engine chunk
    src2 = folder(tmp_path, "b", {"w": bad, "v": w[0]})
    with pytest.raises(mf.NumericalError) as ei:
        mf.merge("passthrough", [str(src2)], out=str(tmp_path / "out2"))
    msg = str(ei.value)
    assert "'w'" in msg and "model #0" in msg and "element 100000" in msg and "NaN" in msg, msg
    assert not (tmp_path / "out2").exists()


# ------------------------------------------------------------------ parameter ranges
BAD_PARAMS = [
    ("ramplus_tl", {"alpha": -0.5}, "alpha"),  # panicked in Rust (clamp min > max)
    ("ramplus_tl", {"r": -1.0}, "'r'"),
    ("ram", {"epsilon": -1e-3}, "epsilon"),
    ("slerp", {"t": 1.5}, "'t'"),
    ("slerp", {"t": -0.1}, "'t'"),
    ("nearswap", {"t": -1.0}, "'t'"),
    ("ties", {"density": 0.0}, "density"),  # silently returned the base
    ("ties", {"density": -0.2}, "density"),
    ("ties", {"density": 1.5}, "density"),
    ("dare_linear", {"density": [0.5, 0.0]}, "model #1"),
    ("breadcrumbs", {"density": 0.5, "gamma": 1.5}, "gamma"),
    ("della", {"density": 0.5, "epsilon": -0.1}, "epsilon"),
    ("sce", {"select_topk": 0.0}, "select_topk"),
    ("karcher", {"max_iter": 2.5}, "max_iter"),
    ("karcher", {"max_iter": -1}, "max_iter"),
    ("karcher", {"tol": -1.0}, "tol"),
    ("multislerp", {"weight": [1.0, 2.0], "eps": -1.0}, "eps"),
    ("fisher_weighted", {"epsilon": -1.0}, "epsilon"),
    ("fisher_dampened", {"layer_importance": 2.0}, "layer_importance"),
    ("regmean", {"reduce_non_diagonal_ratio": 1.5}, "reduce_non_diagonal_ratio"),
    ("regmean", {"weight": [1.0, -1.0]}, "weight"),
    ("regmean", {"ridge": -1e-3}, "ridge"),
    ("linear", {"weight": [1e308, 1.0], "normalize": False}, "weight"),  # overflows float32
    ("task_arithmetic", {"weight": [1e39, 1.0]}, "weight"),
    ("passthrough", {"scale": 1e39}, "scale"),
]


@pytest.mark.parametrize("method,params,named", BAD_PARAMS, ids=[f"{m}-{list(p)[-1]}-{i}" for i, (m, p, _) in enumerate(BAD_PARAMS)])
def test_out_of_range_parameter_is_config_error(mf, method, params, named):
    base, xs, good = inputs(method)
    with pytest.raises(mf.ConfigError) as ei:
        mf.merge(method, xs, base=base, params={**good, **params})
    assert named in str(ei.value), str(ei.value)


def test_ramplus_alpha_negative_is_no_longer_a_panic(mf):
    base, xs, _ = inputs("ramplus_tl")
    try:
        mf.ramplus_tl(base, xs, alpha=-1.0)
    except Exception as e:  # noqa: BLE001 - the point is which class escapes
        assert isinstance(e, mf.ConfigError) and "parameter 'alpha' must be in [0, ∞), got -1" in str(e)
    else:
        raise AssertionError("accepted alpha < 0")


def test_config_range_error_names_the_line(mf, tmp_path):
    w = RNG.standard_normal((3, 4)).astype(np.float32)
    dirs = {n: folder(tmp_path, n, {"model.layers.0.w": w + i}) for i, n in enumerate(["base", "a", "b"])}
    cfg = tmp_path / "merge.yml"
    cfg.write_text(textwrap.dedent(f"""\
        merge_method: ties
        base_model: {dirs['base']}
        models:
          - model: {dirs['a']}
            parameters:
              weight: 1.0
              density: 0.5
          - model: {dirs['b']}
            parameters:
              weight: 1.0
              density: 0
        """))
    out = tmp_path / "out"
    with pytest.raises(mf.ConfigError) as ei:
        mf.run(str(cfg), out=str(out))
    msg = str(ei.value)
    assert "'density' must be in (0, 1]" in msg and "line" in msg, msg
    assert not out.exists()


# ------------------------------------------------------------------ weights
def test_weights_whose_sum_overflows(mf):
    a = RNG.standard_normal(40).astype(np.float32)
    b = RNG.standard_normal(40).astype(np.float32)
    # was all zeros: 1e308 + 1e308 = inf in float64, w / inf = 0
    np.testing.assert_allclose(mf.linear([a, b], weights=[1e308, 1e308]), (a + b) / 2, rtol=1e-6)
    np.testing.assert_allclose(mf.linear([a, b], weights=[1e308, 3e307]), (a + 0.3 * b) / 1.3, rtol=1e-6)
    base = RNG.standard_normal(40).astype(np.float32)
    np.testing.assert_allclose(mf.merge("multislerp", [a, b], params={"weight": [1e308, 1e308]}),
                               mf.merge("multislerp", [a, b], params={"weight": [1.0, 1.0]}), rtol=1e-6)
    np.testing.assert_allclose(mf.merge("nuslerp", [a, b], base=base, params={"weight": [1e308, 1e308]}),
                               mf.merge("nuslerp", [a, b], base=base, params={"weight": [1.0, 1.0]}), rtol=1e-6)
    fa, fb = np.abs(a) + 0.1, np.abs(b) + 0.1
    np.testing.assert_allclose(mf.merge("fisher_weighted", [a, b, fa, fb], params={"weight": [1e308, 1e308]}),
                               (fa * a + fb * b) / (fa + fb), rtol=1e-5)


# ------------------------------------------------------------------ empty checkpoints
def test_checkpoint_without_tensors_is_invalid(mf, tmp_path):
    a = folder(tmp_path, "a", {"w": np.ones(3, np.float32)})
    empty = folder(tmp_path, "empty", {})
    out = tmp_path / "out"
    with pytest.raises(mf.InvalidCheckpoint, match=r"empty[/\\]model\.safetensors: holds no tensors"):
        mf.linear([str(a), str(empty)], out=str(out))
    assert not out.exists()


# ------------------------------------------------------------------ non-float buffers
INTS = {
    "position_ids": np.arange(12, dtype=np.int64).reshape(1, 12),
    "quant.zeros": np.array([3, 250, 7], np.uint8),
    "mask": np.array([True, False, True, True]),
    "quant.scales_i32": np.array([-5, 1 << 20], np.int32),
}


def int_models(tmp_path, n=3, names=("base", "a", "b")):
    out = []
    for i, name in enumerate(names[:n]):
        t = {"model.layers.0.w": RNG.standard_normal((4, 5)).astype(np.float32), **INTS}
        out.append(folder(tmp_path, name, t))
    return out


@pytest.mark.parametrize("method,params,with_base", [
    ("linear", {}, False), ("slerp", {"t": 0.4}, True), ("ties", {"density": 0.5}, True),
    ("karcher", {}, False), ("passthrough", {}, False), ("task_arithmetic", {}, True)])
def test_integer_buffers_are_copied_unchanged(mf, tmp_path, method, params, with_base):
    base, a, b = int_models(tmp_path)
    models = [str(a)] if method in ("slerp", "passthrough") else [str(a), str(b)]
    out = tmp_path / "out"
    mf.merge(method, models, base=str(base) if with_base else None, params=params, out=str(out))
    header = st_read_header(out / "model.safetensors")[0]
    _, got = st_read(out / "model.safetensors")
    for k, v in INTS.items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k
    assert {header[k]["dtype"] for k in INTS} == {"I64", "U8", "BOOL", "I32"}
    assert got["model.layers.0.w"].dtype == np.float32


def test_integer_buffers_that_differ_are_named(mf, tmp_path):
    base, a, b = int_models(tmp_path)
    meta, t = st_read(b / "model.safetensors")
    t["position_ids"] = t["position_ids"].copy()
    t["position_ids"][0, 9] = 99
    st_write(b / "model.safetensors", t)
    out = tmp_path / "out"
    with pytest.raises(mf.TensorMismatch) as ei:
        mf.linear([str(a), str(b)], out=str(out))
    msg = str(ei.value)
    assert "'position_ids'" in msg and "element 9" in msg and str(b) in msg, msg
    assert not out.exists()


def test_integer_and_float_under_one_name_is_a_mismatch(mf, tmp_path):
    a = folder(tmp_path, "a", {"x": np.arange(4, dtype=np.int64)})
    b = folder(tmp_path, "b", {"x": np.arange(4, dtype=np.float32)})
    with pytest.raises(mf.TensorMismatch, match="'x'.*I64"):
        mf.linear([str(a), str(b)], out=str(tmp_path / "out"))


def test_integer_buffers_in_a_config_run(mf, tmp_path):
    base, a, b = int_models(tmp_path)
    cfg = {"merge_method": "ties", "base_model": str(base), "dtype": "bfloat16",
           "models": [{"model": str(a), "parameters": {"weight": 1.0, "density": 0.5}},
                      {"model": str(b), "parameters": {"weight": 0.5, "density": 0.7}}]}
    out = tmp_path / "out"
    mf.run(cfg, out=str(out))
    header = st_read_header(out / "model.safetensors")[0]
    _, got = st_read(out / "model.safetensors")
    for k, v in INTS.items():
        assert np.array_equal(got[k], v) and got[k].dtype == v.dtype, k
    assert header["model.layers.0.w"]["dtype"] == "BF16"  # floats follow dtype, buffers do not


# ------------------------------------------------------------------ mixed dtypes
def test_bf16_with_f32_is_accepted_with_warning_and_metadata(mf, tmp_path):
    w = RNG.standard_normal((4, 6)).astype(np.float32)
    a = folder(tmp_path, "a", {"w": w.astype(BF16)})
    b = folder(tmp_path, "b", {"w": w + 1})
    out = tmp_path / "out"
    with pytest.warns(mf.MergeWarning, match=r"different dtypes.*BF16.*F32.*written as BF16") as rec:
        res = mf.linear([str(a), str(b)], out=str(out))
    assert rec[0].filename == __file__
    assert len(res.notes) == 1
    meta = st_read_header(out / "model.safetensors")[0]["__metadata__"]
    assert json.loads(meta["merge_fast_input_dtypes"]) == {a.name: ["BF16"], b.name: ["F32"]}
    ref = (w.astype(BF16).astype(np.float32) + (w + 1)) / 2
    np.testing.assert_array_equal(st_read(out / "model.safetensors")[1]["w"], ref.astype(BF16))
    # same dtypes: no note, no metadata key
    c = folder(tmp_path, "c", {"w": w})
    res = mf.linear([str(b), str(c)], out=str(tmp_path / "out2"))
    assert res.notes == []
    assert "merge_fast_input_dtypes" not in st_read_header(tmp_path / "out2" / "model.safetensors")[0]["__metadata__"]


def test_inputs_untouched_after_errors(mf, tmp_path):
    base, a, b = int_models(tmp_path)
    snap = {p: os.stat(p / "model.safetensors").st_mtime_ns for p in (base, a, b)}
    data = {p: (p / "model.safetensors").read_bytes() for p in (base, a, b)}
    with pytest.raises(mf.ConfigError):
        mf.ties(str(base), [str(a), str(b)], density=0.0, out=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
    for p in (base, a, b):
        assert (p / "model.safetensors").read_bytes() == data[p]
        assert os.stat(p / "model.safetensors").st_mtime_ns == snap[p]
