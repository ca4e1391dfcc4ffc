"""mergekit's behaviour by default for configs (issue 9): ignored keys warn (``strict``
refuses them, all in one message), the output dtype follows ``dtype``, model_stock's
formula is mergekit's own, multi-document (mergekit-multi) files run stage by stage.
mergekit 0.1.5 itself is the reference wherever it can run the same config."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

import merge_fast as mf

from conftest import build_model_dirs, read_folder_f32, st_read, st_write

N_LAYERS = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mkdef")
    d = build_model_dirs(root / "f32", "llama", names=("base", "a", "b"), layers=N_LAYERS, noise=0.02)
    d.update({f"{k}16": v for k, v in build_model_dirs(root / "bf16", "llama", dtype="bfloat16", names=("base", "a"),
                                                          layers=N_LAYERS, noise=0.02).items()})
    # "neg": a task vector pointing against a's, so the mean pairwise cosine of (a, b, neg)
    # is slightly negative for every tensor (noise-like task vectors)
    tb, ta = read_folder_f32(d["base"]), read_folder_f32(d["a"])
    rng = np.random.default_rng(7)
    neg = root / "neg"
    import shutil

    shutil.copytree(d["a"], neg)
    for f in neg.glob("*.safetensors"):
        f.unlink()
    (neg / "model.safetensors.index.json").unlink(missing_ok=True)
    st_write(neg / "model.safetensors", {k: (tb[k] - 0.3 * (ta[k] - tb[k]) + 0.02 * rng.standard_normal(tb[k].shape))
                                         .astype(np.float32) for k in tb})
    d["neg"] = neg
    return d


def cfg_file(tmp_path: Path, text: str, name: str = "merge.yml", **paths) -> Path:
    f = tmp_path / name
    f.write_text(textwrap.dedent(text).format(**{k: str(v) for k, v in paths.items()}))
    return f


def run_mergekit(text: str, out: Path) -> None:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    cfg = MergeConfiguration.model_validate(yaml.safe_load(text))
    run_merge(cfg, str(out), options=MergeOptions(quiet=True, random_seed=0), config_source=text)


def stored_dtypes(folder: Path) -> set:
    out = set()
    for f in folder.glob("*.safetensors"):
        _, t = st_read(f)
        out |= {str(v.dtype) for v in t.values()}
    return out


# ------------------------------------------------------------------ ignored keys
SLOPPY = """
    merge_method: model_stock
    base_model: {base}
    dype: float32
    select_topk: 0.5
    models:
      - model: {a}
        parameters:
          weight: 0.5
      - model: {b}
        parameters:
          weight: [{{filter: mlp, value: 1}}, {{pattern: attn, value: 0.5}}]
      - model: {neg}
    """


def test_ignored_keys_warn_once_each_and_run(models, tmp_path):
    f = cfg_file(tmp_path, SLOPPY, **models)
    with pytest.warns(mf.MergeWarning) as rec:
        mf.run(f, out=tmp_path / "out")
    msgs = [str(w.message) for w in rec if issubclass(w.category, mf.MergeWarning)]
    by_key = {k: [m for m in msgs if f"unknown key '{k}'" in m] for k in ("dype", "select_topk", "weight", "pattern")}
    assert all(len(v) == 1 for v in by_key.values()), msgs  # once per key name
    assert "line 4" in by_key["dype"][0] and "did you mean 'dtype'" in by_key["dype"][0]
    assert "line 5" in by_key["select_topk"][0]
    assert "line 9" in by_key["weight"][0] and "1 more place" in by_key["weight"][0]
    assert "did you mean 'filter'" in by_key["pattern"][0]
    # mergekit ignores the same keys, so the outputs agree
    run_mergekit(f.read_text(), tmp_path / "mk")
    ref, got = read_folder_f32(tmp_path / "mk"), read_folder_f32(tmp_path / "out")
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_strict_reports_every_problem_in_one_message(models, tmp_path):
    f = cfg_file(tmp_path, SLOPPY + "    out_dtype: float8\n", **models)
    with pytest.raises(mf.ConfigError) as ei:
        mf.run(f, out=tmp_path / "out", strict=True)
    msg = str(ei.value)
    for part in ("dype", "select_topk", "weight", "pattern", "out_dtype", "6 problems"):
        assert part in msg, msg
    assert not (tmp_path / "out").exists()
    # structural errors are collected too, without strict
    bad = cfg_file(tmp_path, """
        merge_method: ties
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: [1, {{filter: x, value: 2}}]}}
          - model: {b}
            layer_range: 3
          - parameters: {{weight: 1}}
        dtype: float8
        """, name="bad.yml", **models)
    with pytest.raises(mf.ConfigError) as ei:
        mf.run(bad, out=tmp_path / "out")
    msg = str(ei.value)
    assert "3 problems" in msg and "line 6" in msg and "line 9" in msg and "line 10" in msg, msg


def test_cli_strict_and_warning_lines(models, tmp_path, capsys):
    from merge_fast.cli import main

    f = cfg_file(tmp_path, SLOPPY, **models)
    assert main(["run", str(f), str(tmp_path / "o1"), "-q"]) == 0
    err = capsys.readouterr().err
    assert "merge-fast: warning:" in err and "dype" in err
    assert main(["run", str(f), str(tmp_path / "o2"), "-q", "--strict"]) == 1
    assert "dype" in capsys.readouterr().err and not (tmp_path / "o2").exists()


# ------------------------------------------------------------------ model_stock
def test_model_stock_matches_mergekit_on_negative_cosines(models, tmp_path):
    text = textwrap.dedent("""
        merge_method: model_stock
        base_model: {base}
        models:
          - model: {a}
          - model: {b}
          - model: {neg}
        dtype: float32
        """).format(**{k: str(v) for k, v in models.items()})
    run_mergekit(text, tmp_path / "mk")
    mf.run(text, out=tmp_path / "mf")
    ref, got = read_folder_f32(tmp_path / "mk"), read_folder_f32(tmp_path / "mf")
    base = read_folder_f32(models["base"])
    moved_away = 0
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
        moved_away += not np.array_equal(got[k], base[k])
    assert moved_away == len(ref)  # the old clamp returned the base for all of these
    # the clamp is an option
    mf.run(text + "parameters: {clamp_cosine: true}\n", out=tmp_path / "clamped")
    cl = read_folder_f32(tmp_path / "clamped")
    n = "model.layers.1.mlp.up_proj.weight"
    np.testing.assert_array_equal(cl[n], base[n])


# ------------------------------------------------------------------ output dtype
@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16", "float16"])
def test_output_dtype_follows_dtype_like_mergekit(models, tmp_path, dtype):
    text = textwrap.dedent("""
        merge_method: linear
        models:
          - model: {base16}
            parameters: {{weight: 0.5}}
          - model: {a16}
            parameters: {{weight: 0.5}}
        """).format(**{k: str(v) for k, v in models.items()}) + (f"dtype: {dtype}\n" if dtype else "")
    run_mergekit(text, tmp_path / "mk")
    mf.run(text, out=tmp_path / "mf")
    want = stored_dtypes(tmp_path / "mk")
    assert len(want) == 1
    assert stored_dtypes(tmp_path / "mf") == want
    mk_cfg = json.loads((tmp_path / "mk" / "config.json").read_text())
    mf_cfg = json.loads((tmp_path / "mf" / "config.json").read_text())
    key = "torch_dtype" if "torch_dtype" in mk_cfg else "dtype"
    assert mf_cfg.get(key) == mk_cfg.get(key)


# ------------------------------------------------------------------ multi-stage files
STAGE1 = """
    merge_method: slerp
    base_model: {base}
    models:
      - model: {base}
      - model: {a}
    parameters:
      t: [0, 0.5, 1]
    dtype: float32
    """
STAGE2 = """
    merge_method: task_arithmetic
    base_model: {base}
    models:
      - model: {first}
        parameters: {{weight: 0.7}}
      - model: {b}
        parameters: {{weight: 0.3}}
    dtype: float32
    """


def test_two_stage_file_equals_the_two_configs_by_hand(models, tmp_path):
    p = {k: str(v) for k, v in models.items()}
    s1 = textwrap.dedent(STAGE1).format(**p)
    by_hand = tmp_path / "hand"
    mf.run(s1, out=by_hand / "first")
    mf.run(textwrap.dedent(STAGE2).format(**p, first=by_hand / "first"), out=by_hand / "final")
    # the final stage comes first in the file and names the other: order is by dependency
    multi = (textwrap.dedent(STAGE2).format(**p, first="slerped") + "---\n" + s1 + "name: slerped\n")
    f = tmp_path / "multi.yml"
    f.write_text(multi)
    from merge_fast.cli import main

    assert main(["run", str(f), str(tmp_path / "out"), "-q"]) == 0
    ref, got = read_folder_f32(by_hand / "final"), read_folder_f32(tmp_path / "out")
    assert sorted(ref) == sorted(got)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["hand", "multi.yml", "out"]  # intermediates removed
    # --stage: only that stage (and what it needs)
    mf.run(f, out=tmp_path / "only1", stage="slerped")
    ref1, got1 = read_folder_f32(by_hand / "first"), read_folder_f32(tmp_path / "only1")
    for k in ref1:
        np.testing.assert_array_equal(got1[k], ref1[k], err_msg=k)
    # mf.run takes the text as well, and a list of dicts
    import yaml

    mf.run(multi, out=tmp_path / "from_text")
    mf.run(list(yaml.safe_load_all(multi)), out=tmp_path / "from_dicts")
    for k in ref:
        np.testing.assert_array_equal(read_folder_f32(tmp_path / "from_text")[k], ref[k], err_msg=k)
        np.testing.assert_array_equal(read_folder_f32(tmp_path / "from_dicts")[k], ref[k], err_msg=k)


def test_multi_stage_errors(models, tmp_path):
    p = {k: str(v) for k, v in models.items()}
    s1 = textwrap.dedent(STAGE1).format(**p)
    cyc = (textwrap.dedent(STAGE2).format(**p, first="two") + "name: one\n---\n"
           + textwrap.dedent(STAGE2).format(**p, first="one") + "name: two\n---\n" + s1)
    with pytest.raises(mf.ConfigError, match="cycle: one -> two -> one|cycle: two -> one -> two"):
        mf.run(cyc, out=tmp_path / "out")
    two = s1 + "name: x\n---\n" + s1 + "name: y\n"
    with pytest.raises(mf.ConfigError, match="several final stages"):
        mf.run(two, out=tmp_path / "out")
    with pytest.raises(mf.ConfigError, match="no stage named 'z'"):
        mf.run(two, out=tmp_path / "out", stage="z")
    with pytest.raises(mf.ConfigError, match="two stages are named 'x'"):
        mf.run(s1 + "name: x\n---\n" + s1 + "name: x\n", out=tmp_path / "out")
    # a broken later stage is found before the first stage runs
    bad = s1 + "name: x\n---\n" + textwrap.dedent(STAGE2).format(**p, first="x") + "out_dtype: float8\n"
    with pytest.raises(mf.ConfigError, match="stage \\(unnamed\\)"):
        mf.run(bad, out=tmp_path / "out")
    assert sorted(x.name for x in tmp_path.iterdir()) == []


def test_sce_with_extra_parameters_runs_like_mergekit(models, tmp_path):
    """Public sce configs carry ties-style parameters sce does not take; mergekit ignores them."""
    text = textwrap.dedent("""
        merge_method: sce
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: 0.6, density: 0.5, epsilon: 0.1}}
          - model: {b}
            parameters: {{weight: 0.4, density: 0.5, gamma: 0.01}}
        parameters:
          select_topk: 0.5
          normalize: true
          lambda: 1.1
          rescale: false
        dtype: float32
        """).format(**{k: str(v) for k, v in models.items()})
    with pytest.warns(mf.MergeWarning) as rec:
        mf.run(text, out=tmp_path / "mf")
    warned = {k for k in ("weight", "density", "epsilon", "gamma", "normalize", "lambda", "rescale")
              if any(f"unknown key '{k}'" in str(w.message) for w in rec)}
    assert warned == {"weight", "density", "epsilon", "gamma", "normalize", "lambda", "rescale"}
    run_mergekit(text, tmp_path / "mk")
    ref, got = read_folder_f32(tmp_path / "mk"), read_folder_f32(tmp_path / "mf")
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_model_stock_singularity_keeps_the_base_with_a_warning(models, tmp_path):
    tb, ta = read_folder_f32(models["base"]), read_folder_f32(models["a"])
    opp = tmp_path / "opp"
    import shutil

    shutil.copytree(models["a"], opp)
    for f in opp.glob("*.safetensors"):
        f.unlink()
    (opp / "model.safetensors.index.json").unlink(missing_ok=True)
    # exactly opposite task vectors: cos = -1 = -1/(N-1) for N = 2, the pole of t
    st_write(opp / "model.safetensors", {k: (2 * tb[k].astype(np.float64) - ta[k]).astype(np.float32) for k in tb})
    text = f"merge_method: model_stock\nbase_model: {models['base']}\nmodels:\n  - model: {models['a']}\n  - model: {opp}\n"
    with pytest.warns(mf.MergeWarning, match="singularity"):
        mf.run(text, out=tmp_path / "out")
    got = read_folder_f32(tmp_path / "out")
    n = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(got[n], tb[n])
