"""PEFT LoRA adapters as inputs: W + scale·B·A computed in Rust range by range, checked
against numpy and against peft's own merge_and_unload; bad adapters -> ConfigError."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import merge_fast as mf

from conftest import build_model_dirs, read_folder_f32, st_write

Q = "model.layers.{i}.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_models")
    return build_model_dirs(root, "llama", names=("base", "a"), layers=2)


@pytest.fixture(scope="module")
def base_t(models):
    return read_folder_f32(models["base"])


def make_adapter(folder: Path, base_t: dict, r=4, alpha=8, rslora=False, modules=("q_proj", "v_proj"),
                 drop=None, bad_rank=False, config_r=None, extra_target=None, seed=0):
    """A hand-written PEFT adapter (raw safetensors, independent of peft)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, w in base_t.items():
        mod = name[: -len(".weight")]
        if not name.endswith(".weight") or mod.rsplit(".", 1)[-1] not in modules:
            continue
        out_f, in_f = w.shape
        a = rng.normal(0, 0.1, (r, in_f)).astype(np.float32)
        b = rng.normal(0, 0.1, (out_f, r + (1 if bad_rank else 0))).astype(np.float32)
        tensors[f"base_model.model.{mod}.lora_A.weight"] = a
        tensors[f"base_model.model.{mod}.lora_B.weight"] = b
    if drop:
        tensors.pop(drop)
    st_write(folder / "adapter_model.safetensors", tensors)
    targets = list(modules) + ([extra_target] if extra_target else [])
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": config_r or r, "lora_alpha": alpha, "use_rslora": rslora,
        "target_modules": targets, "base_model_name_or_path": "base"}))
    return tensors


def numpy_merge(base_t, tensors, scale):
    out = dict(base_t)
    for k, a in tensors.items():
        if ".lora_A." not in k:
            continue
        mod = k[len("base_model.model."): -len(".lora_A.weight")]
        b = tensors[k.replace("lora_A", "lora_B")]
        out[mod + ".weight"] = base_t[mod + ".weight"].astype(np.float64) + scale * (b.astype(np.float64) @ a)
    return out


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_matches_numpy_reference(models, base_t, tmp_path, rslora):
    ad = tmp_path / "adapter"
    lt = make_adapter(ad, base_t, r=4, alpha=8, rslora=rslora)
    scale = 8 / math.sqrt(4) if rslora else 8 / 4
    out = tmp_path / "out"
    mf.lora.apply(models["base"], ad, out)
    got = read_folder_f32(out)
    ref = numpy_merge(base_t, lt, scale)
    assert set(got) == set(ref)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert not np.allclose(got[Q.format(i=0)], base_t[Q.format(i=0)])


def test_lora_reference_in_config_merge(models, base_t, tmp_path):
    """`base+adapter` inside a linear merge: the adapted weights enter the average."""
    ad = tmp_path / "adapter"
    lt = make_adapter(ad, base_t)
    a_t = read_folder_f32(models["a"])
    cfg = {"merge_method": "linear",
           "models": [{"model": f"{models['base']}+{ad}", "parameters": {"weight": 0.3}},
                      {"model": {"model": str(models["a"])}, "parameters": {"weight": 0.7}}]}
    out = tmp_path / "out"
    mf.run(cfg, out=out)
    got = read_folder_f32(out)
    adapted = numpy_merge(base_t, lt, 2.0)
    for k in (Q.format(i=1), "lm_head.weight"):
        np.testing.assert_allclose(got[k], 0.3 * adapted[k] + 0.7 * a_t[k], rtol=1e-5, atol=1e-6)
    assert "LoRA" in (out / "README.md").read_text()


def test_lora_reference_in_python_folder_merge(models, base_t, tmp_path, monkeypatch):
    """`base+adapter` in a folder function (mf.linear): the adapted weights enter the average
    as in a config, the adapter and base are protected as inputs, and the cached adapted copy
    is reused by the next call."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    ad = tmp_path / "adapter"
    lt = make_adapter(ad, base_t, seed=3)
    a_t = read_folder_f32(models["a"])
    ref = f"{models['base']}+{ad}"
    out = tmp_path / "out"
    mf.linear([ref, str(models["a"])], weights=[0.3, 0.7], out=str(out))
    got = read_folder_f32(out)
    adapted = numpy_merge(base_t, lt, 2.0)
    for k in (Q.format(i=1), "lm_head.weight"):
        np.testing.assert_allclose(got[k], 0.3 * adapted[k] + 0.7 * a_t[k], rtol=1e-5, atol=1e-6)
    cached = list((tmp_path / "hf" / "merge_fast" / "lora-cache").iterdir())
    assert len(cached) == 1
    stamp = (cached[0] / "config.json").stat().st_mtime_ns
    mf.linear([ref, str(models["a"])], weights=[0.3, 0.7], out=str(tmp_path / "out2"))
    assert (cached[0] / "config.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert (tmp_path / "out2" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    with pytest.raises(mf.ConfigError, match="adapter"):
        mf.linear([ref, str(models["a"])], out=str(ad / "inside"))


def test_lora_matches_peft_merge_and_unload(models, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(str(models["base"]))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], use_rslora=True)
    pm = get_peft_model(m, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    ad = tmp_path / "adapter"
    pm.save_pretrained(str(ad))
    ref = {k: v.float().numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    out = tmp_path / "out"
    mf.lora.apply(models["base"], ad, out)
    got = read_folder_f32(out)
    assert set(got) == set(ref)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("case", ["missing_b", "rank_mismatch", "config_r", "target_not_in_base", "no_config"])
def test_bad_adapters(models, base_t, tmp_path, case):
    ad = tmp_path / "adapter"
    kw = {
        "missing_b": dict(drop="base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"),
        "rank_mismatch": dict(bad_rank=True),
        "config_r": dict(config_r=8),
        "target_not_in_base": dict(extra_target="c_attn"),
        "no_config": {},
    }[case]
    make_adapter(ad, base_t, **kw)
    if case == "no_config":
        (ad / "adapter_config.json").unlink()
    want = {"missing_b": "no lora_B", "rank_mismatch": "rank mismatch", "config_r": "r = 8",
            "target_not_in_base": "c_attn", "no_config": "adapter_config.json"}[case]
    out = tmp_path / "out"
    with pytest.raises(mf.ConfigError, match=want):
        mf.run({"merge_method": "passthrough", "models": [{"model": f"{models['base']}+{ad}"}]}, out=out)
    assert not out.exists()


def test_adapter_not_fitting_base_is_refused(models, base_t, tmp_path):
    ad = tmp_path / "adapter"
    t = make_adapter(ad, base_t)
    # a factor whose width does not match the base weight
    k = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    t[k] = np.zeros((4, 7), np.float32)
    st_write(ad / "adapter_model.safetensors", t)
    with pytest.raises(mf.ConfigError, match="do not fit"):
        mf.lora.read_adapter(ad, {n: v.shape for n, v in base_t.items()})


def test_adapter_trained_on_bare_backbone_names(models, base_t, tmp_path):
    """PEFT names without the LM's `model.` prefix are matched to the base's tensors."""
    ad = tmp_path / "adapter"
    t = make_adapter(ad, base_t)
    renamed = {k.replace("base_model.model.model.", "base_model.model."): v for k, v in t.items()}
    st_write(ad / "adapter_model.safetensors", renamed)
    out = tmp_path / "out"
    mf.lora.apply(models["base"], ad, out)
    got = read_folder_f32(out)
    ref = numpy_merge(base_t, t, 2.0)
    np.testing.assert_allclose(got[Q.format(i=1)], ref[Q.format(i=1)], rtol=1e-5, atol=1e-6)
