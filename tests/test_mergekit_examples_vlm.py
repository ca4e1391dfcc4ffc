"""mergekit's two vision-language examples (tests/data/mergekit_examples/vlm) through
`merge-fast run`, on tiny random Qwen2-VL models (Florence-2 needs remote code, so it is
swapped for Qwen2-VL as well). mergekit 0.1.5 cannot run either with this transformers
(its Qwen2-VL config has no top-level `num_hidden_layers`), so the references are worked
by hand: linear against a numpy average, and ties on the tensors outside the layers,
where the gradients sit at t = 0 (model weight 1, density 1; the base's weight 0), so
the merge is `base + Δ` of the model, every sign agreeing with it."""
from __future__ import annotations


import numpy as np
import pytest

import merge_fast as mf

from conftest import REPO_ROOT, read_folder_f32

VLM = REPO_ROOT / "tests" / "data" / "mergekit_examples" / "vlm"


@pytest.fixture(scope="module")
def vlm_models(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, in_chans=3,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        vocab_size=256, hidden_size=64, bos_token_id=1, eos_token_id=2)
    root = tmp_path_factory.mktemp("vlm")
    out = {}
    for i, name in enumerate(["a", "b"]):
        torch.manual_seed(i)
        Qwen2VLForConditionalGeneration(cfg).save_pretrained(root / name)
        out[name] = root / name
    return out


def _config(name: str, models: dict) -> str:
    text = (VLM / name).read_text()
    for hub, local in (("Qwen/Qwen2-VL-7B-Instruct", "a"), ("impactframes/Qwen2-VL-7B-Captioner", "b"),
                       ("maxiw/Florence-2-ScreenQA-base", "a"), ("microsoft/Florence-2-base", "b")):
        text = text.replace(hub, str(models[local]))
    return text


def test_vlm_linear(vlm_models, tmp_path):
    out = tmp_path / "out"
    mf.run(_config("vlm-linear.yml", vlm_models), out=out)
    a, b, got = (read_folder_f32(p) for p in (vlm_models["a"], vlm_models["b"], out))
    assert set(got) == set(a) and len(got) > 40  # vision tower and language model alike
    for k in got:
        np.testing.assert_allclose(got[k], (a[k].astype(np.float64) + b[k]) / 2, rtol=1e-6, atol=1e-7, err_msg=k)


def test_vlm_ties(vlm_models, tmp_path):
    out = tmp_path / "out"
    mf.run(_config("vlm-ties.yml", vlm_models), out=out)
    a, b, got = (read_folder_f32(p) for p in (vlm_models["a"], vlm_models["b"], out))
    assert set(got) == set(a)
    outside = [k for k in got if "layers." not in k and "blocks." not in k and got[k].ndim == 2]
    assert any("embed_tokens" in k for k in outside)
    for k in outside:  # base + (model − base) in float32, written as float16
        ref = (b[k] + (a[k] - b[k])).astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(got[k], ref, err_msg=k)
    inside = [k for k in got if "layers.1." in k and k.endswith("proj.weight")]
    assert inside and all(not np.array_equal(got[k], a[k].astype(np.float16).astype(np.float32)) for k in inside)
