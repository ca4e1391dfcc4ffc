"""``modules:`` configs (mergekit's per-module form for vision-language models) on a tiny
Gemma-3 multimodal model, whose tensors sit under two module prefixes
(``language_model.`` and ``vision_tower.``, plus the projector): each module merged with its
own models/slices and parameters, gradients over its own layers, checked against numpy."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

import merge_fast as mf

from conftest import read_folder_f32


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    import arch_models

    root = tmp_path_factory.mktemp("vlm")
    a = arch_models.build("gemma3_mm", str(root / "a"), seed=1)
    arch_models.build("gemma3_mm", str(root / "b"), seed=2)
    return root / "a", root / "b", a.config


def test_modules_config_merges_each_module_by_its_own_rules(vlm, tmp_path):
    a, b, config = vlm
    text = textwrap.dedent(f"""
        merge_method: linear
        parameters:
          normalize: false
        modules:
          text_decoder:
            models:
              - model: {a}
              - model: {b}
            parameters:
              weight: [0.2, 0.8]
          vision_tower:
            slices:
              - sources:
                  - model: {b}
                    layer_range: [0, 1]
                    parameters: {{weight: 1.0}}
          multi_modal_projector:
            models:
              - model: {a}
                parameters: {{weight: 0.5}}
              - model: {b}
                parameters: {{weight: 0.25}}
        """)
    mf.run(text, out=tmp_path / "out")
    ta, tb, got = read_folder_f32(a), read_folder_f32(b), read_folder_f32(tmp_path / "out")
    assert sorted(got) == sorted(ta)
    n_text = config["text_config"]["num_hidden_layers"]
    assert n_text == 2
    for k in ta:
        if k.startswith("language_model."):
            # t = i / (n - 1) over the text layers; tensors outside layers use t = 0
            layer = int(k.split("layers.")[1].split(".")[0]) if ".layers." in k else 0
            w = 0.2 + 0.6 * layer / (n_text - 1)
            want = w * ta[k] + w * tb[k]
        elif k.startswith("vision_tower."):
            want = tb[k]
        else:
            assert k.startswith("multi_modal_projector.")
            want = 0.5 * ta[k] + 0.25 * tb[k]
        np.testing.assert_allclose(got[k], want, rtol=1e-6, atol=1e-7, err_msg=k)
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["text_config"]["num_hidden_layers"] == 2
    assert out_cfg["vision_config"]["num_hidden_layers"] == 1


def test_modules_layer_counts_and_missing_modules(vlm, tmp_path):
    a, b, _ = vlm
    text = textwrap.dedent(f"""
        merge_method: passthrough
        modules:
          text_decoder:
            slices:
              - sources: [{{model: {a}, layer_range: [0, 2]}}]
              - sources: [{{model: {b}, layer_range: [1, 2]}}]
        """)
    with pytest.warns(mf.MergeWarning, match="belong to no module"):
        mf.run(text, out=tmp_path / "out")
    tb, got = read_folder_f32(b), read_folder_f32(tmp_path / "out")
    assert not any(k.startswith(("vision_tower.", "multi_modal_projector.")) for k in got)  # as mergekit
    k2 = "language_model.model.layers.2.mlp.up_proj.weight"
    np.testing.assert_array_equal(got[k2], tb["language_model.model.layers.1.mlp.up_proj.weight"])
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["text_config"]["num_hidden_layers"] == 3
    with pytest.raises(mf.ConfigError, match="exactly one of 'models', 'slices' or 'modules'"):
        mf.run(text + f"models: [{{model: {a}}}]\n", out=tmp_path / "o2")
