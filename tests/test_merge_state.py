"""Mergeable partial merges (mf.partial / combine / finalize): states combined in every order
and grouping, with duplicates and subsets, equal the one-shot merge (float64 round-off in the
state; identical bytes after the cast on bf16 models); the join refuses a partial overlap and
mismatched methods, parameters or bases. References: numpy formulas over an independent
safetensors reader, and the engine's own one-shot merge."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

import merge_fast as mf
from merge_fast.merge_state import _State, read_state_info

from conftest import BF16, build_model_dirs, read_folder_f32, read_folder_native, st_write

W = {"a": 1.0, "b": 2.0, "c": 0.5, "d": 1.5}


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    root = tmp_path_factory.mktemp("four")
    dirs = build_model_dirs(root / "m", "llama", "bfloat16", names=("base", "a", "b", "c", "d"))
    rng = np.random.default_rng(0)
    fishers = {}
    for k in "abcd":
        t = read_folder_f32(dirs[k])
        fishers[k] = root / f"fisher_{k}.safetensors"
        st_write(fishers[k], {n: (rng.random(v.shape) ** 3 + 1e-4).astype(np.float32) for n, v in t.items()})
    return dirs, fishers


def _arrays(state):
    s = _State(state)
    return {n: (np.array(s.array(f"num.{n}")), np.array(s.array(f"den.{n}"))) for n in s.info["tensors"]}


def _close(x, y, rtol=1e-12):
    assert x.keys() == y.keys()
    for n in x:
        for a, b in zip(x[n], y[n]):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-15, err_msg=n)


def _brackets(items):
    """Every binary bracketing of a sequence (Catalan many)."""
    if len(items) == 1:
        yield items[0]
        return
    for k in range(1, len(items)):
        for left in _brackets(items[:k]):
            for right in _brackets(items[k:]):
                yield (left, right)


def _combine_tree(tree, tmp: Path, counter=itertools.count()):
    if not isinstance(tree, tuple):
        return tree
    parts = [_combine_tree(t, tmp, counter) for t in tree]
    return mf.combine(parts, out=tmp / f"c{next(counter)}")


def test_linear_every_order_and_grouping(four, tmp_path):
    dirs, _ = four
    singles = {k: mf.partial([dirs[k]], weights=[W[k]], out=tmp_path / f"s_{k}") for k in "abcd"}
    # Reference state from the formula: Σ w θ and Σ w.
    f = {k: read_folder_f32(dirs[k]) for k in "abcd"}
    ref = {n: (sum(W[k] * f[k][n].astype(np.float64) for k in "abcd"), np.array(sum(W.values())))
           for n in f["a"]}
    one = mf.partial([dirs[k] for k in "abcd"], weights=[W[k] for k in "abcd"], out=tmp_path / "one")
    _close(_arrays(one), ref)
    info = read_state_info(one)
    assert [i["id"] for i in info["inputs"]] == [str(dirs[k].resolve()) for k in "abcd"]
    # Every order in one call, and every bracketing of two orders.
    for perm in itertools.permutations("abcd"):
        got = mf.combine([singles[k] for k in perm], out=tmp_path / ("p" + "".join(perm)))
        _close(_arrays(got), ref)
    trees = 0
    for perm in ("abcd", "dbca"):
        for tree in _brackets([singles[k] for k in perm]):
            _close(_arrays(_combine_tree(tree, tmp_path)), ref)
            trees += 1
    assert trees == 10
    # The join: duplicates and subsets change nothing (bitwise: the covered states are dropped).
    ab = mf.combine([singles["a"], singles["b"]], out=tmp_path / "ab")
    for extra in ([ab], [singles["a"]], [singles["b"], ab, singles["a"]]):
        same = mf.combine([ab, *extra], out=tmp_path / f"j{len(list(tmp_path.iterdir()))}")
        a1, a2 = _arrays(ab), _arrays(same)
        assert all(np.array_equal(a1[n][0], a2[n][0]) and np.array_equal(a1[n][1], a2[n][1]) for n in a1)
    abcd = mf.combine([ab, singles["c"], mf.combine([singles["d"], singles["c"]], out=tmp_path / "dc")],
                      out=tmp_path / "abcd")
    # Finalized: identical bytes to the one-shot bf16 merge.
    shot = mf.linear([dirs[k] for k in "abcd"], weights=[W[k] for k in "abcd"], out=tmp_path / "shot")
    fin = mf.finalize(abcd, out=tmp_path / "fin")
    got, want = read_folder_native(fin.path), read_folder_native(shot.path)
    assert got.keys() == want.keys()
    for n in want:
        assert got[n].dtype == want[n].dtype == BF16
        # Exactly the float64 formula rounded once to f32 and once to bf16 (as the engine casts),
        # which is also what the one-shot merge writes (it sums in f64 too).
        exact = (ref[n][0] / ref[n][1]).astype(np.float32).astype(BF16)
        assert np.array_equal(got[n].view(np.uint16), exact.view(np.uint16)), n
        assert np.array_equal(want[n].view(np.uint16), exact.view(np.uint16)), n
    assert (fin.path / "config.json").is_file() and (fin.path / "tokenizer.json").is_file()


def test_partial_overlap_and_mismatches_are_errors(four, tmp_path):
    dirs, _ = four
    ab = mf.partial([dirs["a"], dirs["b"]], weights=[1, 2], out=tmp_path / "ab")
    bc = mf.partial([dirs["b"], dirs["c"]], weights=[2, 0.5], out=tmp_path / "bc")
    with pytest.raises(mf.ConfigError, match=r"share the inputs \['[^']*/b'\]"):
        mf.combine([ab, bc], out=tmp_path / "x")
    b3 = mf.partial([dirs["b"]], weights=[3], out=tmp_path / "b3")
    with pytest.raises(mf.ConfigError, match="different weights"):
        mf.combine([ab, b3], out=tmp_path / "x")
    un = mf.partial([dirs["c"]], params={"normalize": False}, out=tmp_path / "un")
    with pytest.raises(mf.ConfigError, match="different params"):
        mf.combine([ab, un], out=tmp_path / "x")
    ta = mf.partial([dirs["c"]], method="task_arithmetic", base=dirs["base"], out=tmp_path / "ta")
    ta2 = mf.partial([dirs["d"]], method="task_arithmetic", base=dirs["a"], out=tmp_path / "ta2")
    with pytest.raises(mf.ConfigError, match="different method"):
        mf.combine([ab, ta], out=tmp_path / "x")
    with pytest.raises(mf.ConfigError, match="different base"):
        mf.combine([ta, ta2], out=tmp_path / "x")
    with pytest.raises(mf.InvalidCheckpoint, match="not a merge state"):
        mf.combine([ab, dirs["a"]], out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_task_arithmetic_states_equal_one_shot(four, tmp_path):
    dirs, _ = four
    kw = dict(method="task_arithmetic", base=dirs["base"], params={"lambda": 0.7})
    s = [mf.partial([dirs[k]], weights=[W[k]], out=tmp_path / k, **kw) for k in "abc"]
    st = mf.combine([s[2], mf.combine([s[1], s[0]], out=tmp_path / "ba")], out=tmp_path / "abc")
    f = {k: read_folder_f32(dirs[k]) for k in ("base", "a", "b", "c")}
    ref = {n: (sum(W[k] * (f[k][n].astype(np.float64) - f["base"][n]) for k in "abc"),
               np.array(W["a"] + W["b"] + W["c"])) for n in f["a"]}
    _close(_arrays(st), ref)
    fin = mf.finalize(st, out=tmp_path / "fin")
    shot = mf.task_arithmetic(dirs["base"], [dirs[k] for k in "abc"], [W[k] for k in "abc"], lam=0.7,
                              out=tmp_path / "shot")
    got, want = read_folder_native(fin.path), read_folder_native(shot.path)
    for n in want:
        assert np.array_equal(got[n].view(np.uint16), want[n].view(np.uint16)), n
    # The base is part of the state's identity.
    with pytest.raises(mf.ConfigError, match="not the state's base"):
        mf.finalize(st, base=dirs["a"], out=tmp_path / "fin2")


def test_fisher_weighted_states_equal_one_shot(four, tmp_path):
    dirs, fishers = four
    kw = dict(method="fisher_weighted", params={"epsilon": 1e-6})
    s = [mf.partial([dirs[k]], fishers=[fishers[k]], weights=[W[k]], out=tmp_path / k, **kw) for k in "abcd"]
    st = mf.combine([mf.combine(s[2:], out=tmp_path / "cd"), mf.combine(s[:2], out=tmp_path / "ab"), s[3]],
                    out=tmp_path / "all")
    f = {k: read_folder_f32(dirs[k]) for k in "abcd"}
    from conftest import st_read
    F = {k: st_read(fishers[k])[1] for k in "abcd"}
    ref = {}
    for n in f["a"]:
        c = {k: W[k] * (F[k][n].astype(np.float64) + 1e-6) for k in "abcd"}
        ref[n] = (sum(c[k] * f[k][n] for k in "abcd"), sum(c.values()))
    _close(_arrays(st), ref)
    fin = mf.finalize(st, out=tmp_path / "fin")
    shot = mf.fisher_weighted([dirs[k] for k in "abcd"], [fishers[k] for k in "abcd"],
                              [W[k] for k in "abcd"], epsilon=1e-6, out=tmp_path / "shot")
    got, want = read_folder_native(fin.path), read_folder_native(shot.path)
    diff = sum(int((got[n].view(np.uint16) != want[n].view(np.uint16)).sum()) for n in want)
    assert diff == 0, f"{diff} elements differ after the cast"
    meta = json.loads((fin.path / "config.json").read_text())
    assert meta["model_type"] == "llama"


def test_regmean_states_equal_one_shot(four, tmp_path):
    dirs, _ = four
    f = {k: read_folder_f32(dirs[k]) for k in "abcd"}
    rng = np.random.default_rng(3)
    lin = [n for n, v in f["a"].items() if v.ndim == 2 and "embed" not in n and "lm_head" not in n]
    assert any("q_proj" in n for n in lin)
    G, grams = {}, {}
    for k in "abcd":
        G[k] = {}
        for n in lin:
            x = rng.standard_normal((3 * f["a"][n].shape[1] // 2, f["a"][n].shape[1]))
            G[k][n] = (x.T @ x).astype(np.float32)
        grams[k] = tmp_path / f"gram_{k}.safetensors"
        st_write(grams[k], G[k])
    kw = dict(method="regmean", params={"alpha": 0.7})
    s = {k: mf.partial([dirs[k]], grams=[grams[k]], weights=[W[k]], out=tmp_path / k, **kw) for k in "abcd"}
    ab = mf.partial([dirs["a"], dirs["b"]], grams=[grams["a"], grams["b"]], weights=[W["a"], W["b"]],
                    out=tmp_path / "ab0", **kw)
    # orders, groupings and duplicates agree
    one = mf.combine([s["d"], s["c"], s["b"], s["a"]], out=tmp_path / "one")
    two = mf.combine([mf.combine([s["c"], s["d"], s["c"]], out=tmp_path / "cd"), ab, s["a"]], out=tmp_path / "two")
    x, y = _State(one), _State(two)
    for n in f["a"]:
        parts = ("num", "den", "lin") if n in lin else ("num", "den")
        for p in parts:
            np.testing.assert_allclose(x.array(f"{p}.{n}"), y.array(f"{p}.{n}"), rtol=1e-12, atol=1e-12)
    # the state holds Σ w W G̃ and Σ w G̃ (numpy float64 here)
    n = lin[0]
    sh = lambda g: 0.7 * g + 0.3 * np.diag(np.diag(g))  # noqa: E731
    np.testing.assert_allclose(x.array(f"num.{n}"), sum(W[k] * f[k][n].astype(np.float64) @ sh(G[k][n].astype(np.float64))
                                                         for k in "abcd"), rtol=1e-10)
    np.testing.assert_allclose(x.array(f"den.{n}"), sum(W[k] * sh(G[k][n].astype(np.float64)) for k in "abcd"), rtol=1e-12)
    with pytest.raises(mf.ConfigError, match="regmean needs one Gram file per model"):
        mf.partial([dirs["a"]], out=tmp_path / "bad", **kw)
    # finalize = the one-shot Rust merge, after the cast to bf16
    fin = mf.finalize(two, out=tmp_path / "fin")
    shot = mf.regmean([dirs[k] for k in "abcd"], [grams[k] for k in "abcd"], [W[k] for k in "abcd"], alpha=0.7,
                      out=tmp_path / "shot")
    got, want = read_folder_f32(fin.path), read_folder_f32(shot.path)
    assert got.keys() == want.keys()
    for n in want:
        if n in lin:  # RegMean tensors: the same float64 solve, identical after the cast
            assert np.array_equal(got[n], want[n]), n
        else:  # averaged (as linear states: float64 vs the one-shot float32 sum, one bf16 step at most)
            np.testing.assert_allclose(got[n], want[n], rtol=2 ** -7, atol=1e-6, err_msg=n)
