"""Parity harness: the SAME config run by mergekit (0.1.5, in-process) and by merge_fast on
tiny random-init models, for every mergekit method merge_fast currently has
(``merge_fast._core.METHODS``; passthrough also runs through its linear fallback).

Deterministic methods are compared element by element within a per-method tolerance
(float32 compute on both sides). Randomized methods (DARE, DELLA) cannot share mergekit's
torch random stream, so for them the harness checks names/shapes and that the merged task
vectors have the same size (relative norm within the tolerance).
"""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

import merge_fast as mf
from merge_fast import _core

from conftest import build_model_dirs, read_folder_f32, st_write

try:  # the harness needs mergekit itself
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    MERGEKIT_ERR = None
except Exception as e:  # pragma: no cover - depends on the environment
    MERGEKIT_ERR = f"{type(e).__name__}: {e}"

N_LAYERS = 4
F = "{filter: mlp, value: %s}"

# method -> (config template, (rtol, atol) for exact methods, or ("stat", rel) for random ones)
CASES = {
    "linear": ("""
        merge_method: linear
        models:
          - model: {a}
            parameters: {{weight: [{{filter: mlp, value: 0.6}}, {{value: 0.3}}]}}
          - model: {b}
            parameters: {{weight: 0.7}}
        parameters: {{normalize: true}}
        """, (1e-6, 1e-7)),
    "task_arithmetic": ("""
        merge_method: task_arithmetic
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: [1.0, 0.5]}}
          - model: {b}
            parameters: {{weight: [{{filter: self_attn, value: 0.2}}, {{value: 0.7}}]}}
        parameters: {{lambda: 0.8}}
        """, (1e-6, 1e-7)),
    "slerp": ("""
        merge_method: slerp
        base_model: {a}
        slices:
          - sources:
              - model: {a}
                layer_range: [0, 4]
              - model: {b}
                layer_range: [0, 4]
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        """, (2e-5, 1e-6)),
    "passthrough": ("""
        merge_method: passthrough
        slices:
          - sources:
              - model: {a}
                layer_range: [0, 3]
                parameters:
                  scale:
                    - filter: o_proj
                      value: 0.0
                    - filter: down_proj
                      value: 0.5
                    - value: 1.0
          - sources:
              - model: {b}
                layer_range: [1, 4]
        """, (0.0, 0.0)),
    "ties": ("""
        merge_method: ties
        base_model: {base}
        models:
          - model: {base}
          - model: {a}
            parameters: {{density: [1, 0.7, 0.1], weight: 1.0}}
          - model: {b}
            parameters:
              density: 0.5
              weight: [{{filter: mlp, value: 0.5}}, {{value: 0}}]
        parameters: {{normalize: true}}
        """, (1e-5, 1e-6)),
    "breadcrumbs": ("""
        merge_method: breadcrumbs
        base_model: {base}
        models:
          - model: {a}
            parameters: {{density: 0.8, gamma: 0.05, weight: 0.6}}
          - model: {b}
            parameters: {{density: 0.7, gamma: 0.02, weight: 0.4}}
        """, (1e-5, 1e-6)),
    "breadcrumbs_ties": ("""
        merge_method: breadcrumbs_ties
        base_model: {base}
        models:
          - model: {a}
            parameters: {{density: 0.8, gamma: 0.05, weight: 0.6}}
          - model: {b}
            parameters: {{density: 0.7, gamma: 0.02, weight: 0.4}}
        """, (1e-5, 1e-6)),
    "dare_ties": ("""
        merge_method: dare_ties
        base_model: {base}
        models:
          - model: {a}
            parameters: {{density: 0.5, weight: 0.6}}
          - model: {b}
            parameters: {{density: 0.5, weight: 0.4}}
        """, ("stat", 0.05)),
    "dare_linear": ("""
        merge_method: dare_linear
        base_model: {base}
        models:
          - model: {a}
            parameters: {{density: 0.5, weight: 0.6}}
          - model: {b}
            parameters: {{density: 0.5, weight: 0.4}}
        """, ("stat", 0.05)),
    "della": ("""
        merge_method: della
        base_model: {base}
        models:
          - model: {a}
            parameters: {{density: 0.6, epsilon: 0.1, weight: 0.6}}
          - model: {b}
            parameters: {{density: 0.6, epsilon: 0.1, weight: 0.4}}
        parameters: {{lambda: 1.0}}
        """, ("stat", 0.05)),
    "della_linear": ("""
        merge_method: della_linear
        base_model: {base}
        models:
          - model: {a}
            parameters: {{density: 0.6, epsilon: 0.1, weight: 0.6}}
          - model: {b}
            parameters: {{density: 0.6, epsilon: 0.1, weight: 0.4}}
        """, ("stat", 0.05)),
    "sce": ("""
        merge_method: sce
        base_model: {base}
        models:
          - model: {a}
          - model: {b}
        parameters: {{select_topk: 0.5}}
        """, (1e-5, 1e-6)),
    "model_stock": ("""
        merge_method: model_stock
        base_model: {base}
        models:
          - model: {a}
          - model: {c}
        """, (1e-5, 1e-6)),
    "nuslerp": ("""
        merge_method: nuslerp
        models:
          - model: {a}
            parameters: {{weight: 0.4}}
          - model: {b}
            parameters: {{weight: 0.6}}
        """, (2e-5, 1e-6)),
    "multislerp": ("""
        merge_method: multislerp
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: 0.4}}
          - model: {b}
            parameters: {{weight: 0.6}}
        """, (2e-5, 1e-6)),
    "karcher": ("""
        merge_method: karcher
        models:
          - model: {a}
          - model: {b}
        parameters: {{max_iter: 20, tol: 1.0e-7}}
        """, (1e-4, 1e-6)),
    "nearswap": ("""
        merge_method: nearswap
        base_model: {a}
        models:
          - model: {a}
          - model: {b}
        parameters: {{t: 0.01}}
        """, (1e-5, 1e-6)),
    "ram": ("""
        merge_method: ram
        base_model: {base}
        models:
          - model: {a}
          - model: {b}
        """, (1e-5, 1e-6)),
    "ramplus_tl": ("""
        merge_method: ramplus_tl
        base_model: {base}
        models:
          - model: {a}
          - model: {b}
        """, (1e-5, 1e-6)),
    "arcee_fusion": ("""
        merge_method: arcee_fusion
        base_model: {a}
        models:
          - model: {a}
          - model: {b}
        """, ("select", 0.005)),
}


def test_every_available_mergekit_method_has_a_parity_case():
    from merge_fast.config.methods import MERGEKIT_METHODS

    ours = [m for m in _core.METHODS if m not in MERGEKIT_METHODS]
    print(f"methods without a mergekit counterpart (no parity possible): {ours}")
    missing = [m for m in _core.METHODS if m in MERGEKIT_METHODS and m not in CASES]
    assert not missing, f"add parity cases for {missing}"


def _available(method: str) -> bool:
    return method in _core.METHODS or method == "passthrough"  # passthrough: linear fallback


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    if MERGEKIT_ERR is not None:
        print(f"SKIP parity: mergekit cannot be imported ({MERGEKIT_ERR})")
        pytest.skip(f"mergekit cannot be imported: {MERGEKIT_ERR}")
    root = tmp_path_factory.mktemp("parity")
    d = build_model_dirs(root, "llama", names=("base", "a", "b"), layers=N_LAYERS, noise=0.02)
    # "c": a fine-tune whose task vector agrees with a's (cos > 0), so model_stock's t is
    # well away from 0 (negative cosines: tests/test_config_mergekit_defaults.py).
    import shutil

    tb, ta, tbb = (read_folder_f32(d[k]) for k in ("base", "a", "b"))
    c = root / "c"
    shutil.copytree(d["a"], c)
    (c / "model.safetensors").unlink()
    st_write(c / "model.safetensors", {k: (tb[k] + 0.8 * (ta[k] - tb[k]) + 0.4 * (tbb[k] - tb[k])).astype(np.float32) for k in tb})
    d["c"] = c
    return d


@pytest.mark.parametrize("method", sorted(CASES))
def test_parity_with_mergekit(models, tmp_path, method):
    if not _available(method):
        print(f"SKIP {method}: not in merge_fast._core.METHODS yet")
        pytest.skip(f"{method} is not implemented in merge_fast yet")
    template, tol = CASES[method]
    import textwrap

    text = textwrap.dedent(template).format(**{k: str(v) for k, v in models.items()}) + "dtype: float32\n"
    cfg_file = tmp_path / "merge.yml"
    cfg_file.write_text(text)

    mk_out = tmp_path / "mergekit"
    mk_cfg = MergeConfiguration.model_validate(yaml.safe_load(text))
    run_merge(mk_cfg, str(mk_out), options=MergeOptions(quiet=True, random_seed=0), config_source=text)
    mf_out = tmp_path / "merge_fast"
    mf.run(cfg_file, out=mf_out, random_seed=0)

    ref, got = read_folder_f32(mk_out), read_folder_f32(mf_out)
    assert sorted(got) == sorted(ref), f"{method}: tensor names differ: {sorted(set(got) ^ set(ref))[:5]}"
    for k in ref:
        assert got[k].shape == ref[k].shape, k
    mk_cfg_json = json.loads((mk_out / "config.json").read_text())
    mf_cfg_json = json.loads((mf_out / "config.json").read_text())
    assert mf_cfg_json["num_hidden_layers"] == mk_cfg_json["num_hidden_layers"]

    if tol[0] == "stat":
        # over all matrices together (a 32-element norm vector is too small a sample)
        base = read_folder_f32(models["base"])
        big = [k for k in ref if ref[k].size >= 1024]
        d_ref = np.sqrt(sum(np.sum((ref[k] - base[k]) ** 2) for k in big))
        d_got = np.sqrt(sum(np.sum((got[k] - base[k]) ** 2) for k in big))
        assert abs(d_got - d_ref) <= tol[1] * d_ref, f"{method}: |Δ| {d_got} vs mergekit {d_ref}"
        print(f"parity {method}: statistical OK (|Δ| {d_got:.4g} vs mergekit {d_ref:.4g})")
        return
    if tol[0] == "select":
        # Each element is the base's or the model's: an importance within float32 round-off
        # of the quantile threshold may be selected differently (mergekit computes in f32
        # torch, whose rounding depends on the CPU's vector unit; we use f64), so a few
        # elements may take the other candidate; everything else is equal.
        a, b = read_folder_f32(models["a"]), read_folder_f32(models["b"])
        flips = total = 0
        for k in ref:
            off = ~np.isclose(got[k], ref[k], rtol=1e-5, atol=1e-6)
            cand = np.isclose(got[k], a[k], rtol=1e-5, atol=1e-6) | np.isclose(got[k], b[k], rtol=1e-5, atol=1e-6)
            assert cand[off].all(), f"{method}: {k} holds values that are neither input's"
            flips, total = flips + int(off.sum()), total + off.size
        assert flips <= tol[1] * total, f"{method}: {flips} of {total} elements selected differently"
        print(f"parity {method}: OK ({flips} of {total} elements selected differently at the threshold)")
        return
    rtol, atol = tol
    worst = max(float(np.max(np.abs(got[k] - ref[k]) / (atol + rtol * np.abs(ref[k])))) if atol + rtol > 0
                else float(np.max(np.abs(got[k] - ref[k]))) for k in ref)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=rtol, atol=atol, err_msg=f"{method}: {k}")
    print(f"parity {method}: OK (worst error/tolerance {worst:.3g})")


@pytest.mark.parametrize("source", ["union", "base", "model", "tokens"])
def test_tokenizer_source_parity_with_mergekit(models, tmp_path, source):
    """Models with different vocabularies: embedding/LM-head rows compared token by token
    (token ids of a union may be numbered differently; the rows per token must agree)."""
    from test_config import _other_vocab_model
    from transformers import AutoTokenizer

    y = _other_vocab_model(tmp_path / "vocab")
    ts = {"union": "union", "base": "base", "model": str(y), "tokens": "union"}[source]
    tok_cfg = f"tokenizer_source: {ts}"
    if source == "tokens":
        tok_cfg = textwrap.dedent(f"""\
            tokenizer:
              source: union
              tokens:
                t5: {{source: {y}, force: true}}
                t110: {{source: {{kind: zero}}}}
                u2: {{source: {{kind: model_token, model: {models['a']}, token_id: 9}}}}
                newtok: {{source: {{kind: model_token, model: {y}, token: u7}}}}
            """)
    text = textwrap.dedent(f"""
        merge_method: task_arithmetic
        base_model: {models['a']}
        models:
          - model: {y}
            parameters: {{weight: 0.5}}
        dtype: float32
        """) + tok_cfg + "\n"
    mk_out, mf_out = tmp_path / "mergekit", tmp_path / "merge_fast"
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(mk_out),
              options=MergeOptions(quiet=True), config_source=text)
    mf.run(text, out=mf_out)
    vk = AutoTokenizer.from_pretrained(str(mk_out)).get_vocab()
    vf = AutoTokenizer.from_pretrained(str(mf_out)).get_vocab()
    assert set(vk) == set(vf)
    ref, got = read_folder_f32(mk_out), read_folder_f32(mf_out)
    assert sorted(ref) == sorted(got)
    for name in ref:
        if ref[name].shape[0] == len(vk) and "embed" in name or "lm_head" in name:
            for tok, i in vk.items():
                np.testing.assert_allclose(got[name][vf[tok]], ref[name][i], rtol=1e-5, atol=1e-6, err_msg=f"{name} {tok}")
        else:
            np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert json.loads((mf_out / "config.json").read_text())["vocab_size"] == json.loads((mk_out / "config.json").read_text())["vocab_size"]
    print(f"parity tokenizer_source={source}: OK ({len(vk)} tokens)")
