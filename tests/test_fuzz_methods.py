"""Fuzzing every merge method (issue 8): random parameters (in range, at the edges, far out,
wrong types and lengths), input counts, shapes, dtypes and values (huge, tiny, zeros,
copies of the base, the odd NaN/inf), through the arrays API and a few folder merges.

Whatever the call, three things must hold:
- only ``merge_fast.MergeError`` subclasses escape (no PanicException, TypeError, ...);
- a result is returned only when it is finite, if the inputs were finite;
- the inputs are byte-identical afterwards (and a failed folder merge leaves no output).

Bounded for CI: ``derandomize=True`` (same examples on every run), fixed example counts.
Counts are printed at the end of the module (``pytest -s``).
"""
from __future__ import annotations

import collections
import hashlib

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import st_read, st_write

import merge_fast as mf

ARRAY_EXAMPLES = 60
FOLDER_EXAMPLES = 25
SETTINGS = dict(derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

COUNTS: collections.Counter = collections.Counter()
OUTCOMES: collections.Counter = collections.Counter()

# numbers a user (or a typo) may pass: in range, edges, far out, non-finite, not a number
EDGE = [0.0, 1.0, -1.0, 0.5, 1e-12, 1e-45, 2.0, 1e30, -1e30, 1e308, -1e308, 3.4e38, 65504.0, 7.0]
ODD = [float("nan"), float("inf"), "0.5", None, True, [0.5], {"a": 1}]


def number():
    return st.one_of(st.floats(-3, 3, allow_nan=False), st.sampled_from(EDGE), st.sampled_from(ODD))


def per_model(n):
    return st.one_of(number(), st.lists(st.one_of(st.floats(-3, 3, allow_nan=False), st.sampled_from(EDGE)),
                                        min_size=max(0, n - 1), max_size=n + 1))


def boolean():
    return st.one_of(st.booleans(), st.sampled_from([0, 1, 2, "yes", None]))


def choice(*names):
    return st.sampled_from(list(names) + ["bogus", 3])


GTA = {"weight": "pm", "density": "pm", "lambda": "num", "normalize": "bool", "rescale": "bool",
       "rescale_mode": choice("l1", "l2", "linf", "density", "none"), "int8_mask": "bool"}
TIES_EXTRA = {"consensus": choice("sum", "count"), "disjoint_mean": choice("weights", "count")}

# method -> (base rule, min, max non-base inputs, parameter kinds); "pm" per model.
# Every method is fuzzed from its spec (_core.method_specs(), below); this table refines
# the entries of the methods written before the specs (string choices, input counts).
HAND = {
    "linear": ("none", 1, 4, {"weight": "pm", "normalize": "bool"}),
    "task_arithmetic": ("base", 1, 3, {"weight": "pm", "lambda": "num", "normalize": "bool"}),
    "slerp": ("base", 1, 1, {"t": "num"}),
    "ties": ("base", 1, 3, {**GTA, **TIES_EXTRA}),
    "dare_ties": ("base", 1, 3, {**GTA, **TIES_EXTRA}),
    "dare_linear": ("base", 1, 3, GTA),
    "breadcrumbs": ("base", 1, 3, {**GTA, "gamma": "pm"}),
    "breadcrumbs_ties": ("base", 1, 3, {**GTA, **TIES_EXTRA, "gamma": "pm"}),
    "della": ("base", 1, 3, {**GTA, **TIES_EXTRA, "epsilon": "pm"}),
    "della_linear": ("base", 1, 3, {**GTA, "epsilon": "pm"}),
    "sce": ("base", 1, 3, {"select_topk": "num", "int8_mask": "bool"}),
    "model_stock": ("base", 2, 4, {"filter_wise": "bool"}),
    "nuslerp": ("maybe", 2, 2, {"weight": "pm", "nuslerp_row_wise": "bool", "nuslerp_flatten": "bool"}),
    "multislerp": ("maybe", 1, 4, {"weight": "pm", "normalize_weights": "bool", "eps": "num"}),
    "karcher": ("maybe", 1, 4, {"max_iter": "num", "tol": "num"}),
    "nearswap": ("base", 1, 1, {"t": "num"}),
    "ram": ("base", 1, 3, {"epsilon": "num"}),
    "ramplus_tl": ("base", 1, 3, {"r": "num", "alpha": "num", "epsilon": "num"}),
    "arcee_fusion": ("base", 1, 1, {}),
    "passthrough": ("none", 1, 1, {"scale": "pm"}),
    "fisher_weighted": ("none", 2, 4, {"weight": "pm", "epsilon": "num", "fisher_normalize": choice("none", "mean")}),
    "fisher_dampened": ("base", 2, 3, {"weight": "pm", "scale": "num", "layer_importance": "num",
                                        "normalization": choice("log", "minmax", "rank")}),
    "tsv_merge": ("base", 1, 3, {"alpha": "pm"}),
    "iso_c": ("base", 1, 3, {"scaling_factor": "num"}),
    "iso_cts": ("base", 1, 3, {"scaling_factor": "num", "common_space_fraction": "num"}),
    "regmean": ("none", 2, 4, {"weight": "pm", "reduce_non_diagonal_ratio": "num", "ridge": "num",
                               "fan_in_fan_out": "bool"}),
}


def _from_spec(spec: dict) -> tuple:
    rule = {"required": "base", "optional": "maybe", "ignored": "maybe"}.get(spec["base"], "none")
    lo = spec["min_models"]
    hi = spec["max_models"] if spec["max_models"] is not None else lo + 3
    kinds = {}
    for p in spec["params"]:
        if p["role"] == "config_only":
            continue
        if p["kind"] == "str":
            kinds[p["name"]] = choice(*([p["default"]] if p["default"] is not None else []))
        else:
            kinds[p["name"]] = "pm" if p["per_model"] else ("bool" if p["kind"] == "bool" else "num")
    return rule, lo, hi, kinds


SPECS = {s["name"]: s for s in mf._core.method_specs()}
METHODS = {name: HAND.get(name) or _from_spec(spec) for name, spec in SPECS.items()}


def test_hand_entries_agree_with_the_specs():
    """The refined rows name the spec's base rule and only parameters the kernel declares."""
    for name, (rule, lo, hi, kinds) in HAND.items():
        d_rule, d_lo, _, d_kinds = _from_spec(SPECS[name])
        assert rule == d_rule and lo >= d_lo, name
        assert set(kinds) <= set(d_kinds) | {"lambda"}, (name, set(kinds) - set(d_kinds))


# In-range values, drawn in "valid" examples (about two in three) so that most calls get
# past validation and exercise the kernels; the rest draw from anything above.
F = st.floats
VALID = {
    "weight": F(0.05, 2), "density": F(0.3, 1), "lambda": F(-2, 2), "t": F(0, 1), "gamma": F(0, 0.1),
    "select_topk": F(0.05, 1), "max_iter": st.integers(0, 20), "tol": F(0, 1e-3), "eps": F(0, 1e-6),
    "r": F(0, 1), "alpha": F(0, 1), "scale": F(-2, 2), "layer_importance": F(0, 1),
    "rescale_mode": st.sampled_from(["l1", "l2", "linf", "density", "none"]),
    "consensus": st.sampled_from(["sum", "count"]), "disjoint_mean": st.sampled_from(["weights", "count"]),
    "fisher_normalize": st.sampled_from(["none", "mean"]), "normalization": st.sampled_from(["log", "minmax", "rank"]),
    "scaling_factor": F(0, 2), "common_space_fraction": F(0, 1),
    "reduce_non_diagonal_ratio": F(0, 1), "ridge": F(0, 1e-3),
}
VALID_BY_METHOD = {
    ("della", "density"): F(0.3, 0.85), ("della_linear", "density"): F(0.3, 0.85),
    ("della", "epsilon"): F(0, 0.1), ("della_linear", "epsilon"): F(0, 0.1),
    ("ram", "epsilon"): F(0, 0.1), ("ramplus_tl", "epsilon"): F(0, 0.1), ("fisher_weighted", "epsilon"): F(1e-8, 1e-3),
}

def _valid_from_spec(method: str, key: str):
    """In-range floats from the declared range (finite part) of a parameter no table lists."""
    p = next((p for p in SPECS[method]["params"] if p["name"] == key), None)
    if p is None or p["kind"] != "float" or p["range"] is None:
        return None
    lo, _, hi, _ = p["range"]
    lo, hi = max(lo, -2.0), min(hi, 2.0)
    return F(lo, hi, exclude_min=True, exclude_max=True) if lo < hi else None


SHAPES = [(1,), (7,), (3, 5), (16, 9), (2, 3, 4), (1, 1), (65, 3), (40, 40)]
DTYPES = [np.float32, np.float16, np.float64, ml_dtypes.bfloat16]


def test_every_method_is_fuzzed():
    assert set(METHODS) == set(mf._core.METHODS) and set(HAND) <= set(METHODS)


@st.composite
def call(draw, method):
    rule, lo, hi, kinds = METHODS[method]
    valid = draw(st.integers(0, 2)) > 0
    n = draw(st.integers(lo, hi) if valid else st.integers(max(0, lo - 1), hi + 1))
    if method in ("fisher_weighted", "regmean") and valid:
        n = 2 * draw(st.integers(1, 2))  # models, then one Fisher (Gram) each
    has_base = {"base": True, "none": False, "maybe": draw(st.booleans())}[rule]
    if not valid and draw(st.integers(0, 9)) == 0:
        has_base = not has_base  # the wrong base rule, now and then
    params = {}
    required = {"slerp": ["t"], "nearswap": ["t"], "nuslerp": ["weight"], "multislerp": ["weight"]}.get(method, [])
    for key, kind in kinds.items():
        if not (draw(st.booleans()) or (valid and key in required)):
            continue
        if valid and kind != "bool":
            v = VALID_BY_METHOD.get((method, key), VALID.get(key)) or _valid_from_spec(method, key)
            if v is not None:
                count = n // 2 if method in ("fisher_weighted", "regmean") else (n - 1 if method == "fisher_dampened" else n)
                params[key] = draw(v) if kind != "pm" or draw(st.booleans()) else draw(st.lists(v, min_size=count, max_size=count))
                continue
        if valid and kind == "bool":
            params[key] = draw(st.booleans())
        elif kind == "pm":
            params[key] = draw(per_model(n))
        elif kind == "num":
            params[key] = draw(number())
        elif kind == "bool":
            params[key] = draw(boolean())
        else:
            params[key] = draw(kind)
    if key_typo := (not valid and draw(st.integers(0, 9)) == 0):
        params["no_such_param"] = 1.0
    del key_typo
    if valid and method == "dare_linear" and params.get("rescale") is False:
        params.pop("rescale_mode", None)
    if valid and method in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear") \
            and params.get("rescale") is False:
        params.pop("rescale_mode", None)
    shape = draw(st.sampled_from(SHAPES))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1.0, 1e-3, 1e-30, 1e4, 1e30, 0.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    old = np.seterr(over="ignore", invalid="ignore")  # huge values cast to float16 become inf inputs
    base = (rng.standard_normal(shape) * scale).astype(dtype)
    pattern = draw(st.sampled_from(["noise", "noise", "noise", "copy", "sparse", "huge_delta"]))
    xs = []
    for _ in range(n):
        if pattern == "copy":
            x = base.copy()
        elif pattern == "sparse":
            x = base.copy()
            x.flat[rng.integers(0, x.size)] = dtype(scale + 1.0)
        elif pattern == "huge_delta":
            x = (base.astype(np.float64) + rng.standard_normal(shape) * 1e4).astype(dtype)
        else:
            x = (base.astype(np.float64) + rng.standard_normal(shape) * max(scale, 1e-6) * 0.1).astype(dtype)
        xs.append(x)
    if method.startswith("fisher") and (valid or draw(st.booleans())):  # mostly non-negative Fishers
        xs = [np.abs(x) for x in xs]
    if method == "regmean" and valid and len(shape) == 2 and shape[0] == shape[1]:
        # Grams XᵀX (square weights: through mf.merge every input has the weights' shape)
        xs[n // 2:] = [(x.astype(np.float64).T @ x.astype(np.float64)).astype(dtype) for x in xs[n // 2:]]
    if xs and draw(st.integers(0, 14)) == 0:  # a non-finite element somewhere
        k = draw(st.integers(0, len(xs) - 1))
        xs[k] = xs[k].copy()
        xs[k].flat[rng.integers(0, xs[k].size)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    np.seterr(**old)
    threads = draw(st.sampled_from([None, 1, 3]))
    return (base if has_base else None), xs, params, threads, seed % 1000


def digest(arrays) -> list:
    return [hashlib.sha1(np.ascontiguousarray(a).view(np.uint8)).hexdigest() for a in arrays]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_arrays_api(method):
    @settings(max_examples=ARRAY_EXAMPLES, **SETTINGS)
    @given(call(method))
    def run(args):
        base, xs, params, threads, seed = args
        inputs = xs + ([base] if base is not None else [])
        before = digest(inputs)
        COUNTS[method] += 1
        try:
            out = mf.merge(method, xs, base=base, params=params, threads=threads, seed=seed)
        except mf.MergeError as e:
            assert str(e)
            OUTCOMES[(method, type(e).__name__)] += 1
        except BaseException as e:  # noqa: BLE001
            raise AssertionError(f"{method}: {type(e).__module__}.{type(e).__name__} escaped: {e!r}") from e
        else:
            OUTCOMES[(method, "ok")] += 1
            if all(np.isfinite(np.asarray(a, np.float64)).all() for a in inputs):
                assert np.isfinite(np.asarray(out, np.float64)).all(), f"{method}: non-finite output from finite inputs"
            assert out.shape == (base if base is not None else xs[0]).shape
        assert digest(inputs) == before, f"{method}: an input changed"

    run()


FOLDER_METHODS = ["linear", "ties", "slerp", "karcher", "passthrough", "della", "model_stock", "nuslerp"]
FOLDER_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


@settings(max_examples=FOLDER_EXAMPLES, **SETTINGS)
@given(method=st.sampled_from(FOLDER_METHODS), data=st.data())
def test_folder_merges(tmp_path_factory, method, data):
    base, xs, params, threads, seed = data.draw(call(method))
    root = tmp_path_factory.mktemp("fz")
    int_buf = data.draw(st.booleans())
    dtypes = [data.draw(st.sampled_from(sorted(FOLDER_DTYPES))) for _ in range(len(xs) + 1)]
    dirs = []
    for i, arr in enumerate(([base] if base is not None else []) + xs):
        d = root / f"m{i}"
        d.mkdir()
        with np.errstate(over="ignore"):
            w = np.asarray(arr, np.float32).astype(FOLDER_DTYPES[dtypes[i]])
        t = {"model.layers.0.w": w,
             "model.norm.weight": np.ones(3, np.float32)}
        if int_buf:
            t["position_ids"] = np.arange(5, dtype=np.int64)
        st_write(d / "model.safetensors", t)
        dirs.append(d)
    files = [d / "model.safetensors" for d in dirs]
    before = [f.read_bytes() for f in files]
    out = root / "out"
    COUNTS["folders:" + method] += 1
    b = str(dirs[0]) if base is not None else None
    models = [str(d) for d in (dirs[1:] if base is not None else dirs)]
    try:
        with _nowarn():
            mf.merge(method, models, base=b, params=params, out=str(out), threads=threads, seed=seed)
    except mf.MergeError as e:
        OUTCOMES[("folders:" + method, type(e).__name__)] += 1
        assert not out.exists(), f"failed merge left {out}"
    except BaseException as e:  # noqa: BLE001
        raise AssertionError(f"{method}: {type(e).__module__}.{type(e).__name__} escaped: {e!r}") from e
    else:
        OUTCOMES[("folders:" + method, "ok")] += 1
        _, got = st_read(out / "model.safetensors")
        finite = all(np.isfinite(np.asarray(st_read(f)[1]["model.layers.0.w"], np.float32)).all() for f in files)
        if finite:
            assert all(np.isfinite(np.asarray(v, np.float64)).all() for k, v in got.items() if k != "position_ids")
        if int_buf:
            assert np.array_equal(got["position_ids"], np.arange(5))
    assert [f.read_bytes() for f in files] == before, "an input file changed"


class _nowarn:
    """Mixed dtypes warn (MergeWarning); that is expected here, not a failure."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", mf.MergeWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_zz_report_counts():
    """Prints the example counts per method and outcome (run with -s); runs last."""
    lines = [f"{k}: {v} examples, " + ", ".join(f"{o}={c}" for (m, o), c in sorted(OUTCOMES.items()) if m == k)
             for k, v in sorted(COUNTS.items())]
    print("\nfuzz counts\n" + "\n".join(lines))
    assert sum(COUNTS.values()) > 0 or not COUNTS
