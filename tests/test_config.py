"""mergekit-style YAML configs: parameter resolution against hand-worked values, the
example config shapes from mergekit's docs on tiny models, the CLI, and bad configs (each
a ConfigError naming the key/line, with nothing written)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

import merge_fast as mf
from merge_fast import _core
from merge_fast.config.params import evaluate, interpolate_t

from conftest import build_model_dirs, read_folder_f32

N_LAYERS = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg_models")
    d = build_model_dirs(root / "llama", "llama", names=("base", "a", "b"), layers=N_LAYERS)
    d.update(build_model_dirs(root / "wide", "llama", names=("wide",), layers=N_LAYERS, hidden=48, seed=5))
    return d


@pytest.fixture(scope="module")
def tensors(models):
    return {k: read_folder_f32(v) for k, v in models.items() if k != "wide"}


def write_cfg(tmp_path: Path, text: str, **paths) -> Path:
    f = tmp_path / "merge.yml"
    f.write_text(textwrap.dedent(text).format(**{k: str(v) for k, v in paths.items()}))
    return f


def load_logits_finite(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        out = m(torch.tensor([[1, 5, 7, 9]])).logits
    assert torch.isfinite(out).all()
    return m


# ---------------------------------------------------------------------------------------
# parameter resolution, hand-worked
# ---------------------------------------------------------------------------------------
def test_gradient_interpolation_hand_values():
    g = [0.0, 0.5, 0.3, 0.7, 1.0]
    # t = i/(n-1) over 5 anchors: t=0.1 -> scaled 0.4 between 0.0 and 0.5 -> 0.2
    assert evaluate(g, "x", 0.1, "float") == pytest.approx(0.2)
    assert evaluate(g, "x", 0.0, "float") == 0.0
    assert evaluate(g, "x", 1.0, "float") == 1.0
    assert evaluate(g, "x", 0.5, "float") == pytest.approx(0.3)  # exactly anchor 2
    assert evaluate(g, "x", 0.6, "float") == pytest.approx(0.3 + 0.4 * 0.4)  # scaled 2.4
    assert evaluate([1, 0], "x", 1 / 3, "float") == pytest.approx(2 / 3)
    # booleans pick an anchor, no interpolation
    assert evaluate([True, False], "x", 0.4, "bool") is True
    assert evaluate([True, False], "x", 1.0, "bool") is False
    # YAML's 1e-3 arrives as a string: numeric parameters read it as a number
    assert evaluate("1e-3", "x", 0.0, "float") == pytest.approx(1e-3)
    assert interpolate_t(0, 4) == 0.0 and interpolate_t(3, 4) == 1.0 and interpolate_t(0, 1) == 1.0


def test_filter_precedence_first_match_wins():
    s = [{"filter": "self_attn", "value": 0.1}, {"filter": "attn", "value": 0.2}, {"value": 0.9}]
    assert evaluate(s, "model.layers.0.self_attn.q_proj.weight", 0, "float") == 0.1
    assert evaluate(s, "model.layers.0.cross_attn.q.weight", 0, "float") == 0.2
    assert evaluate(s, "model.layers.0.mlp.up_proj.weight", 0, "float") == 0.9
    # no catch-all: None (the next scope is asked)
    assert evaluate([{"filter": "mlp", "value": 1}], "lm_head.weight", 0, "float") is None
    # filter + gradient
    assert evaluate([{"filter": "mlp", "value": [0, 1]}], "x.mlp.y", 0.25, "float") == pytest.approx(0.25)
    # regex extension
    r = [{"regex": r"layers\.[01]\.", "value": 0.3}, {"value": 0.6}]
    assert evaluate(r, "model.layers.1.mlp.w", 0, "float") == 0.3
    assert evaluate(r, "model.layers.11.mlp.w", 0, "float") == 0.6


def test_scope_precedence_and_non_layer_t(models, tmp_path):
    """Source > slice > global for per-model parameters; gradients at t = 0 outside layers."""
    cfg = write_cfg(tmp_path, """
        slices:
          - sources:
              - model: {a}
                layer_range: [0, 4]
                parameters:
                  weight: [2.0, 4.0]
              - model: {b}
                layer_range: [0, 4]
            parameters:
              weight:
                - filter: mlp
                  value: 3.0
          - sources:
              - model: {a}
                layer_range: [0, 1]
              - model: {b}
                layer_range: [3, 4]
        merge_method: linear
        parameters:
          weight: 1.0
          normalize: false
        """, a=models["a"], b=models["b"])
    plan = mf.config.plan(cfg)
    by = {t.name: t for t in plan.tensors}
    # non-layer tensors: t = 0 -> a gets 2.0; b: the slice filter does not match -> global 1.0
    assert by["model.embed_tokens.weight"].params["weight"] == [2.0, 1.0]
    assert by["lm_head.weight"].params["weight"] == [1.0, 1.0]  # last slice: only the global
    # layer 2 of 4 in slice 0: t = 2/3 -> a: 2 + 2*(2/3); b on mlp: slice filter 3.0
    w = by["model.layers.2.mlp.up_proj.weight"].params["weight"]
    assert w == pytest.approx([2 + 2 * 2 / 3, 3.0])
    assert by["model.layers.2.self_attn.q_proj.weight"].params["weight"] == pytest.approx([2 + 4 / 3, 1.0])
    assert by["model.layers.0.self_attn.q_proj.weight"].params["normalize"] is False
    # second slice: output layer 4 from a's layer 0 and b's layer 3
    t4 = by["model.layers.4.mlp.up_proj.weight"]
    assert [s["tensor"] for s in t4.inputs] == ["model.layers.0.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"]
    assert plan.out_layers == 5


# ---------------------------------------------------------------------------------------
# mergekit's example configs on tiny models
# ---------------------------------------------------------------------------------------
def test_ties_style_config_with_gradients_and_mlp_filters(models, tensors, tmp_path):
    """mergekit's ties example (density/weight gradients, mlp filters); with task_arithmetic
    (the same parameters minus density) while ties is not available."""
    has_ties = "ties" in _core.METHODS
    method = "ties" if has_ties else "task_arithmetic"
    pa = {"weight": 1.0}
    pb = {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}
    if has_ties:
        pa["density"] = pb["density"] = [1, 0.7, 0.1]
    cfg = {
        "models": [{"model": str(models["base"])}, {"model": str(models["a"]), "parameters": pa},
                   {"model": str(models["b"]), "parameters": pb}],
        "merge_method": method,
        "base_model": str(models["base"]),
        "parameters": {"normalize": True},
        "dtype": "float32",
    }
    out = tmp_path / "out"
    mf.run(cfg, out=out)
    got = read_folder_f32(out)
    load_logits_finite(out)
    if not has_ties:
        base, a, b = tensors["base"], tensors["a"], tensors["b"]
        for name in ["model.layers.1.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"]:
            wb = 0.5 if "mlp" in name else 0.0
            ref = base[name] + (1.0 * (a[name] - base[name]) + wb * (b[name] - base[name])) / (1.0 + wb)
            np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=1e-6)
    assert (out / "README.md").is_file() and (out / "mergekit_config.yml").is_file()
    assert method in (out / "README.md").read_text()


def test_gradient_slerp_per_attention_and_mlp(models, tensors, tmp_path):
    cfg = write_cfg(tmp_path, """
        slices:
          - sources:
              - model: {a}
                layer_range: [0, 4]
              - model: {b}
                layer_range: [0, 4]
        merge_method: slerp
        base_model: {a}
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        dtype: float32
        """, a=models["a"], b=models["b"])
    out = tmp_path / "out"
    mf.run(cfg, out=out, write_model_card=False)
    got = read_folder_f32(out)
    load_logits_finite(out)
    a, b = tensors["a"], tensors["b"]
    # layer 3 of 4: t = 1 -> self_attn takes b, mlp takes a; layer 0: the reverse
    np.testing.assert_allclose(got["model.layers.3.self_attn.q_proj.weight"], b["model.layers.3.self_attn.q_proj.weight"], atol=1e-6)
    np.testing.assert_allclose(got["model.layers.3.mlp.up_proj.weight"], a["model.layers.3.mlp.up_proj.weight"], atol=1e-6)
    np.testing.assert_allclose(got["model.layers.0.self_attn.q_proj.weight"], a["model.layers.0.self_attn.q_proj.weight"], atol=1e-6)
    # non-layer tensors: the catch-all 0.5 (t = 0 matters only for gradients)
    plan = mf.config.plan(cfg)
    by = {t.name: t for t in plan.tensors}
    assert by["model.norm.weight"].params == {"t": 0.5}
    assert by["model.layers.1.self_attn.k_proj.weight"].params["t"] == pytest.approx(0.5 + (4 / 3 - 1) * (0.3 - 0.5))  # t=1/3: anchors 1-2
    assert not (out / "README.md").exists()


def test_passthrough_frankenmerge_overlapping_ranges(models, tensors, tmp_path):
    cfg = write_cfg(tmp_path, """
        slices:
          - sources:
              - model: {a}
                layer_range: [0, 3]
          - sources:
              - model: {b}
                layer_range: [1, 4]
        merge_method: passthrough
        dtype: bfloat16
        """, a=models["a"], b=models["b"])
    out = tmp_path / "out"
    mf.run(cfg, out=out)
    cj = json.loads((out / "config.json").read_text())
    assert cj["num_hidden_layers"] == 6
    assert cj.get("dtype", cj.get("torch_dtype")) == "bfloat16"
    got = read_folder_f32(out)
    a, b = tensors["a"], tensors["b"]
    import ml_dtypes

    def bf(x):
        return x.astype(ml_dtypes.bfloat16).astype(np.float32)

    for out_i, (src, src_i) in enumerate([("a", 0), ("a", 1), ("a", 2), ("b", 1), ("b", 2), ("b", 3)]):
        n = f"model.layers.{out_i}.mlp.down_proj.weight"
        np.testing.assert_array_equal(got[n], bf(tensors[src][f"model.layers.{src_i}.mlp.down_proj.weight"]))
    np.testing.assert_array_equal(got["model.embed_tokens.weight"], bf(a["model.embed_tokens.weight"]))
    np.testing.assert_array_equal(got["lm_head.weight"], bf(b["lm_head.weight"]))
    m = load_logits_finite(out)
    assert m.config.num_hidden_layers == 6


def test_linear_models_with_weights_and_tokenizer_options(models, tensors, tmp_path):
    cfg = {
        "models": [{"model": str(models["a"]), "parameters": {"weight": 0.25}},
                   {"model": str(models["b"]), "parameters": {"weight": 0.75}}],
        "merge_method": "linear",
        "tokenizer_source": str(models["b"]),
        "chat_template": "chatml",
        "out_dtype": "float16",
    }
    out = tmp_path / "out"
    mf.run(cfg, out=out)
    got = read_folder_f32(out)
    n = "model.layers.2.self_attn.v_proj.weight"
    ref = 0.25 * tensors["a"][n] + 0.75 * tensors["b"][n]
    np.testing.assert_allclose(got[n], ref.astype(np.float16).astype(np.float32), rtol=2e-3, atol=1e-4)
    assert "im_start" in (out / "chat_template.jinja").read_text()
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    # the config is saved beside the card, as YAML
    import yaml

    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["merge_method"] == "linear"
    # --no-copy-tokenizer stops only the plain copy: a tokenizer the config asks for is
    # written (mergekit 0.1.5 does the same), with its chat template
    out2 = tmp_path / "out2"
    mf.run(cfg, out=out2, copy_tokenizer=False, write_model_card=False)
    assert (out2 / "tokenizer.json").read_bytes() == (models["b"] / "tokenizer.json").read_bytes()
    assert "im_start" in (out2 / "chat_template.jinja").read_text() and not (out2 / "README.md").exists()
    out3 = tmp_path / "out3"
    with pytest.warns(mf.MergeWarning, match="chat_template"):
        mf.run({k: v for k, v in cfg.items() if k != "tokenizer_source"}, out=out3, copy_tokenizer=False)
    assert not (out3 / "tokenizer.json").exists() and not (out3 / "chat_template.jinja").exists()


def test_cli_run_with_mergekit_flags(models, tmp_path, capsys):
    from merge_fast.cli import main

    cfg = write_cfg(tmp_path, """
        merge_method: task_arithmetic
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: 0.5}}
        parameters: {{lambda: 1.5e-0, int8_mask: true}}
        """, base=models["base"], a=models["a"])
    out = tmp_path / "out"
    rc = main(["run", str(cfg), str(out), "--out-shard-size", "20K", "--no-copy-tokenizer", "--allow-crimes",
               "--random-seed", "3", "--lazy-unpickle", "--low-cpu-memory", "--cuda", "--threads", "1", "-q",
               "--write-model-card"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "CPU" in err
    assert (out / "model.safetensors.index.json").is_file()  # sharded at 20 KB
    assert not (out / "tokenizer.json").exists()
    assert (out / "README.md").is_file()
    load_logits_finite(out)


# ---------------------------------------------------------------------------------------
# bad configs: ConfigError naming the key and line, nothing written
# ---------------------------------------------------------------------------------------
BAD = {
    "unknown_method": ("""
        merge_method: frobnicate
        models:
          - model: {a}
        """, "line 2", "merge_method"),
    "unknown_param": ("""
        merge_method: linear
        models:
          - model: {a}
            parameters:
              weight: 1
              wieght: 2
          - model: {b}
            parameters:
              weight: 1
        """, "line 7", "wieght"),
    "missing_required": ("""
        merge_method: linear
        models:
          - model: {a}
            parameters:
              weight: 1
          - model: {b}
        """, "line 7", "weight"),
    "slerp_missing_t": ("""
        merge_method: slerp
        base_model: {a}
        models:
          - model: {a}
          - model: {b}
        """, "parameters", "'t'"),
    "layer_range_oob": ("""
        merge_method: passthrough
        slices:
          - sources:
              - model: {a}
                layer_range: [2, 9]
        """, "line 6", "out of bounds"),
    "layer_range_lengths": ("""
        merge_method: linear
        parameters: {{weight: 1}}
        slices:
          - sources:
              - model: {a}
                layer_range: [0, 2]
              - model: {b}
                layer_range: [0, 3]
        """, "line 5", "same number of layers"),
    "shape_mismatch": ("""
        merge_method: linear
        parameters: {{weight: 1}}
        models:
          - model: {a}
          - model: {wide}
        """, "models", "shape mismatch"),
    "missing_folder": ("""
        merge_method: linear
        parameters: {{weight: 1}}
        models:
          - model: {a}
          - model: /nonexistent/model
        """, "line 6", "not found"),
    "shared_param_per_model": ("""
        merge_method: slerp
        base_model: {a}
        models:
          - model: {a}
          - model: {b}
            parameters:
              t: 0.5
        """, "line 8", "shared"),
    "bad_layer_range": ("""
        merge_method: passthrough
        slices:
          - sources:
              - model: {a}
                layer_range: [3, 1]
        """, "line 6", "layer_range"),
    "unknown_top_key": ("""
        merge_method: linear
        modles:
          - model: {a}
        """, "line 3", "modles"),
    "base_not_in_slice": ("""
        merge_method: task_arithmetic
        base_model: {base}
        slices:
          - sources:
              - model: {a}
                layer_range: [0, 4]
                parameters: {{weight: 1}}
        """, "line 5", "base model"),
    "bad_gradient": ("""
        merge_method: linear
        models:
          - model: {a}
            parameters:
              weight: [1, {{filter: x, value: 2}}]
        """, "line 6", "mix"),
}


# Keys mergekit ignores: warnings by default, errors under strict.
STRICT_ONLY = {"unknown_param", "shared_param_per_model", "unknown_top_key"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_configs_raise_config_error_and_write_nothing(models, tmp_path, case):
    text, where, what = BAD[case]
    cfg = write_cfg(tmp_path, text, a=models["a"], b=models["b"], base=models["base"], wide=models["wide"])
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(mf.ConfigError) as ei:
        mf.run(cfg, out=out, strict=case in STRICT_ONLY)
    msg = str(ei.value)
    assert where in msg and what in msg, msg
    assert "merge.yml" in msg
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp folders left


def test_cli_bad_config_exit_code(models, tmp_path, capsys):
    from merge_fast.cli import main

    cfg = write_cfg(tmp_path, BAD["unknown_param"][0], a=models["a"], b=models["b"])
    assert main(["run", str(cfg), str(tmp_path / "out"), "-q", "--strict"]) == 1
    assert "wieght" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_engine_row_gather_source(models, tensors, tmp_path):
    """The `rows` source (vocabulary permutations): each output row is the mean of the
    listed (source, row) pairs, zeros when the list is empty."""
    import json as _json

    name = "model.embed_tokens.weight"
    a, b = tensors["a"][name], tensors["b"][name]
    rows = [[[0, (i + 1) % a.shape[0]]] for i in range(a.shape[0])]
    rows[3] = [[0, 5], [1, 7]]
    rows[4] = []
    plan = {"inputs": [str(models["a"]), str(models["b"])], "tensors": [{
        "name": name, "method": "linear", "params": {"weight": [1.0]},
        "inputs": [{"kind": "rows", "sources": [{"kind": "tensor", "input": 0, "tensor": name},
                                                 {"kind": "tensor", "input": 1, "tensor": name}],
                    "shape": list(a.shape), "rows": rows}]}]}
    out = tmp_path / "rows"
    out.mkdir()
    _core.execute_plan(_json.dumps(plan), str(out))
    got = read_folder_f32(out)[name]
    ref = np.roll(a, -1, axis=0)
    ref[3] = (a[5] + b[7]) / 2
    ref[4] = 0
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


def _other_vocab_model(root: Path) -> Path:
    """A llama model with a different tokenizer: t0..t99 then u0..u35 (136 tokens)."""
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = build_model_dirs(root, "llama", names=("y",), layers=N_LAYERS, vocab=136, seed=7)["y"]
    vocab = {f"t{i}": i for i in range(100)} | {f"u{i}": 100 + i for i in range(36)}
    tok = Tokenizer(tmodels.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1", bos_token="t2", pad_token="t3")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).unlink(missing_ok=True)
    fast.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def other_vocab(tmp_path_factory):
    return _other_vocab_model(tmp_path_factory.mktemp("vocab"))


def test_tokenizer_union_permutes_embedding_rows(models, tensors, other_vocab, tmp_path):
    from transformers import AutoTokenizer

    y = read_folder_f32(other_vocab)
    a = tensors["a"]
    cfg = {"merge_method": "linear", "tokenizer_source": "union",
           "models": [{"model": str(models["a"]), "parameters": {"weight": 0.5}},
                      {"model": str(other_vocab), "parameters": {"weight": 0.5}}]}
    # without tokenizer_source the vocabularies clash
    with pytest.raises(mf.ConfigError, match="tokenizer_source"):
        mf.config.plan(cfg | {"tokenizer_source": None})
    out = tmp_path / "out"
    mf.run(cfg, out=out)
    tok = AutoTokenizer.from_pretrained(str(out))
    v = tok.get_vocab()
    assert len(v) == 164 and json.loads((out / "config.json").read_text())["vocab_size"] == 164
    got = read_folder_f32(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        e = got[name]
        assert e.shape[0] == 164
        np.testing.assert_allclose(e[v["t5"]], 0.5 * a[name][5] + 0.5 * y[name][5], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(e[v["t110"]], a[name][110], rtol=1e-6, atol=1e-7)  # only in a
        np.testing.assert_allclose(e[v["u3"]], y[name][103], rtol=1e-6, atol=1e-7)  # only in y
    load_logits_finite(out)


def test_tokenizer_source_model_permutes_to_its_vocabulary(models, tensors, other_vocab, tmp_path):
    y = read_folder_f32(other_vocab)
    a = tensors["a"]
    cfg = {"merge_method": "linear", "tokenizer_source": str(other_vocab), "parameters": {"weight": 1.0},
           "models": [{"model": str(models["a"])}, {"model": str(other_vocab)}]}
    out = tmp_path / "out"
    mf.run(cfg, out=out)
    got = read_folder_f32(out)["model.embed_tokens.weight"]
    assert got.shape[0] == 136
    name = "model.embed_tokens.weight"
    np.testing.assert_allclose(got[7], 0.5 * (a[name][7] + y[name][7]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got[120], y[name][120], rtol=1e-6, atol=1e-7)  # u20: a lacks it
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 136
    assert (out / "tokenizer.json").read_bytes() == (other_vocab / "tokenizer.json").read_bytes()


def test_tokenizer_tokens_sources(models, tensors, other_vocab, tmp_path):
    """mergekit's tokenizer.tokens: a model's row, forced rows, zeros, another token's row,
    and a new token added to the tokenizer."""
    from transformers import AutoTokenizer

    y = read_folder_f32(other_vocab)
    a = tensors["a"]
    cfg = {"merge_method": "linear", "parameters": {"weight": 0.5},
           "models": [{"model": str(models["a"])}, {"model": str(other_vocab)}],
           "tokenizer": {"source": "union", "tokens": {
               "t5": {"source": str(other_vocab), "force": True},
               "t110": {"source": {"kind": "zero"}},
               "newtok": {"source": {"kind": "model_token", "model": str(other_vocab), "token": "u7"}},
           }}}
    out = tmp_path / "out"
    mf.run(cfg, out=out)
    v = AutoTokenizer.from_pretrained(str(out)).get_vocab()
    assert "newtok" in v and len(v) == 165
    e = read_folder_f32(out)["model.embed_tokens.weight"]
    n = "model.embed_tokens.weight"
    np.testing.assert_allclose(e[v["t5"]], y[n][5], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(e[v["t110"]], 0.5 * a[n][110], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(e[v["newtok"]], y[n][107], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(e[v["t6"]], 0.5 * (a[n][6] + y[n][6]), rtol=1e-6, atol=1e-7)
    # a token source that lacks the token: ConfigError at its key, nothing written
    bad = json.loads(json.dumps(cfg))
    bad["tokenizer"]["tokens"] = {"u3": {"source": str(models["a"])}}
    with pytest.raises(mf.ConfigError, match=r"tokenizer\.tokens\.u3"):
        mf.run(bad, out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_merge_fast_options_reach_the_kernel_from_configs(tmp_path, models):
    """merge_fast's own sparsification options (here the paper's 1/density DARE rescale)
    work from a config exactly as from the Python API."""
    base, a, b = (str(models[k]) for k in ("base", "a", "b"))
    cfg = textwrap.dedent(f"""
        merge_method: dare_ties
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: 0.5, density: 0.5}}
          - model: {b}
            parameters: {{weight: 0.5, density: 0.5}}
        parameters:
          rescale_mode: density
        dtype: float32
        """)
    mf.run(cfg, tmp_path / "cfg", write_model_card=False)
    mf.dare_ties(base, [a, b], weights=[0.5, 0.5], density=[0.5, 0.5], rescale_mode="density", out=str(tmp_path / "api"))
    x, y = read_folder_f32(tmp_path / "cfg"), read_folder_f32(tmp_path / "api")
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    with pytest.raises(mf.ConfigError, match="rescale_mode"):
        mf.run(cfg.replace("rescale_mode: density", "rescale_mode: 3"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
