"""LoRA extraction (mf.extract_lora / merge-fast extract-lora): round trips through our
``base+adapter`` input path and through peft (PeftModel.from_pretrained, forward passes,
merge_and_unload), and reported errors against numpy's truncated SVD (Eckart–Young)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import read_folder_native

import merge_fast as mf
from merge_fast import ConfigError
from merge_fast.cli import main as cli_main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

RANK = 4


def _load(path):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def low_rank_ft(model_family, tmp_path_factory):
    """The tiny Llama base and a fine-tune whose every linear weight moved by an exact
    rank-≤3 delta; the embeddings, lm_head and one norm moved by full-rank noise."""
    fam = model_family("llama", "float32", False)
    model = _load(fam.base)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name and "lm_head" not in name:
                k = 1 + len(name) % 3
                p.add_(0.05 * torch.randn(p.shape[0], k, generator=g) @ torch.randn(k, p.shape[1], generator=g))
            elif "embed" in name or "lm_head" in name or name.endswith("layers.0.input_layernorm.weight"):
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    d = tmp_path_factory.mktemp("lora_extract") / "ft"
    model.save_pretrained(str(d))
    return fam, d


def test_low_rank_delta_round_trips_through_our_reader_and_peft(low_rank_ft, tmp_path):
    fam, ft = low_rank_ft
    adapter = tmp_path / "adapter"
    errors = mf.extract_lora(fam.base, ft, RANK, adapter)
    assert len(errors) >= 14 and max(errors.values()) < 1e-5, errors
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == RANK and cfg["lora_alpha"] == RANK and cfg["peft_type"] == "LORA"
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= set(cfg["target_modules"])
    # Embeddings and lm_head at full rank (as mergekit), the changed norm too; unchanged norms not.
    assert cfg["modules_to_save"] == ["lm_head", "model.embed_tokens", "model.layers.0.input_layernorm"]
    meta = mf.Checkpoint(str(adapter / "adapter_model.safetensors")).metadata()
    assert json.loads(meta["merge_fast.lora_errors"]) == pytest.approx(errors)

    want = read_folder_native(ft)
    # 1. Our base+adapter input path.
    res = mf.lora.apply(fam.base, adapter, tmp_path / "ours")
    got = read_folder_native(res.path if hasattr(res, "path") else tmp_path / "ours")
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        assert np.abs(got[k] - w).max() <= 1e-6 * max(1.0, np.abs(w).max()), k
    # 2. peft: forward passes agree with the fine-tune, and merge_and_unload gives its weights.
    pm = peft.PeftModel.from_pretrained(_load(fam.base), str(adapter)).eval()
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _load(ft)(ids).logits
        out = pm(ids).logits
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), (out - ref).abs().max()
    merged = pm.merge_and_unload().state_dict()
    for k, w in want.items():
        assert np.abs(merged[k].numpy() - w).max() <= 1e-6 * max(1.0, np.abs(w).max()), k


def test_full_rank_delta_error_is_the_eckart_young_error(model_family, tmp_path):
    fam = model_family("llama", "float32", False)
    base, ft = read_folder_native(fam.base), read_folder_native(fam.a)
    exact = mf.extract_lora(fam.base, fam.a, 3, tmp_path / "exact", exact=True)
    rand = mf.extract_lora(fam.base, fam.a, 3, tmp_path / "rand", seed=1)
    assert exact.keys() == rand.keys() and len(exact) >= 14
    for k in exact:
        d = ft[k].astype(np.float64) - base[k].astype(np.float64)
        s = np.linalg.svd(d, compute_uv=False)
        optimal = np.sqrt((s[3:] ** 2).sum() / (s ** 2).sum())
        assert exact[k] == pytest.approx(optimal, rel=1e-4), k
        # Randomized (seeded): never better than optimal, and close to it.
        assert optimal * (1 - 1e-4) <= rand[k] <= optimal * 1.1, (k, rand[k], optimal)
    # Seeded: the same seed gives the same bytes.
    again = tmp_path / "rand2"
    mf.extract_lora(fam.base, fam.a, 3, again, seed=1)
    assert (again / "adapter_model.safetensors").read_bytes() == (tmp_path / "rand" / "adapter_model.safetensors").read_bytes()


def test_energy_threshold_cli_and_errors(low_rank_ft, tmp_path):
    fam, ft = low_rank_ft
    out = tmp_path / "cli"
    assert cli_main(["extract-lora", str(fam.base), str(ft), "--rank", "8", "--energy", "0.999", "-o", str(out), "-q"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    ck = mf.Checkpoint(str(out / "adapter_model.safetensors"))
    shapes = {n: s for n, _, s in ck.tensors()}
    # Deltas of rank 1-3: the threshold keeps exactly their rank, recorded in rank_pattern.
    base, want = read_folder_native(fam.base), read_folder_native(ft)
    for mod, k in cfg["rank_pattern"].items():
        w = mod + ".weight"
        assert k == np.linalg.matrix_rank(want[w].astype(np.float64) - base[w], tol=1e-4), mod
        assert shapes[f"base_model.model.{mod}.lora_A.weight"] == [k, base[w].shape[1]]
        assert cfg["alpha_pattern"][mod] == k
    assert len(cfg["rank_pattern"]) >= 14
    got = read_folder_native(mf.lora.apply(fam.base, out, tmp_path / "m").path)
    for k, w in want.items():
        assert np.abs(got[k] - w).max() <= 1e-6 * max(1.0, np.abs(w).max()), k
    with pytest.raises(ConfigError, match="rank"):
        mf.extract_lora(fam.base, ft, 0, tmp_path / "bad")
    with pytest.raises(ConfigError, match="energy"):
        mf.extract_lora(fam.base, ft, 2, tmp_path / "bad", energy=1.5)
    assert not (tmp_path / "bad").exists()


def _peft_adapter(base_dir, path, r, alpha, targets, seed):
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    pm = peft.get_peft_model(_load(base_dir), cfg)
    pm.save_pretrained(str(path))


def test_merge_adapters_matches_peft_add_weighted_adapter_svd(llama_f32, tmp_path):
    from peft.utils import get_peft_model_state_dict

    base = llama_f32.base
    # Different ranks and alphas (scales 2 and 0.75), partly different target modules.
    _peft_adapter(base, tmp_path / "a1", 2, 4, ["q_proj", "v_proj", "down_proj"], 1)
    _peft_adapter(base, tmp_path / "a2", 4, 3, ["q_proj", "v_proj", "up_proj"], 2)
    ranks = mf.merge_lora_adapters([tmp_path / "a1", tmp_path / "a2"], [0.7, 0.4], tmp_path / "ours", rank=3)
    assert set(ranks.values()) == {3} and len(ranks) == 8

    pm = peft.PeftModel.from_pretrained(_load(base), str(tmp_path / "a1"), adapter_name="a1")
    pm.load_adapter(str(tmp_path / "a2"), adapter_name="a2")
    pm.add_weighted_adapter(["a1", "a2"], [0.7, 0.4], "m", combination_type="svd", svd_rank=3)
    theirs = {k: v.detach().double().numpy() for k, v in get_peft_model_state_dict(pm, adapter_name="m").items()}
    ck = mf.Checkpoint(str(tmp_path / "ours" / "adapter_model.safetensors"))
    ours = {n: ck.read_f32(n).reshape(s).astype(np.float64) for n, _, s in ck.tensors()}
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        if ".lora_A" not in name:
            continue
        bname = name.replace("lora_A", "lora_B")
        got, want = ours[bname] @ ours[name], theirs[bname] @ theirs[name]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), name
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 3
    # The CLI writes the same bytes.
    assert cli_main(["merge-loras", str(tmp_path / "a1"), str(tmp_path / "a2"), "--weights", "0.7", "0.4",
                     "--rank", "3", "-o", str(tmp_path / "cli"), "-q"]) == 0
    name = "adapter_model.safetensors"
    assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "ours" / name).read_bytes()
    # peft loads ours, and it acts as peft's merged adapter does.
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    pm.set_adapter("m")
    with torch.no_grad():
        want_logits = pm(ids).logits
        got_logits = peft.PeftModel.from_pretrained(_load(base), str(tmp_path / "ours")).eval()(ids).logits
    assert torch.allclose(got_logits, want_logits, atol=1e-4, rtol=1e-4)


def test_gpt2_conv1d_weights_use_fan_in_fan_out(tmp_path):
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=128, n_positions=32)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    base.save_pretrained(str(tmp_path / "base"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if p.ndim == 2 and "wte" not in name and "wpe" not in name:
                p.add_(0.05 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g))
    base.save_pretrained(str(tmp_path / "ft"))
    errors = mf.extract_lora(tmp_path / "base", tmp_path / "ft", 2, tmp_path / "ad")
    assert max(errors.values()) < 1e-5 and any("c_attn" in k for k in errors)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    pm = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "base")),
                                        str(tmp_path / "ad")).eval()
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "ft")).eval()(ids).logits
        assert torch.allclose(pm(ids).logits, ref, atol=1e-4, rtol=1e-4)
    got = read_folder_native(mf.lora.apply(tmp_path / "base", tmp_path / "ad", tmp_path / "m").path)
    want = read_folder_native(tmp_path / "ft")
    for k, w in want.items():
        assert np.abs(got[k] - w).max() <= 1e-6 * max(1.0, np.abs(w).max()), k


def test_changed_bias_saves_its_module_at_full_rank(model_family, tmp_path):
    """Qwen2's q/k/v projections have biases; a changed bias cannot be a LoRA, so (as for
    norms) its module is saved whole and target_modules switch to full names so PEFT does
    not also wrap it."""
    fam = model_family("qwen2", "float32", False)
    errors = mf.extract_lora(fam.base, fam.a, 2, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert "model.layers.0.self_attn.q_proj" in cfg["modules_to_save"]
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "o_proj", "up_proj"]
    # Had only some q_proj been saved whole, the short name would catch it: full names then.
    from merge_fast.lora_extract import _targets
    assert _targets(["m.0.q_proj", "m.0.o_proj"], ["m.1.q_proj"]) == ["m.0.o_proj", "m.0.q_proj"]
    assert not any("q_proj" in k for k in errors)
    pm = peft.PeftModel.from_pretrained(_load(fam.base), str(tmp_path / "ad")).eval()
    merged = pm.merge_and_unload().state_dict()
    ours = read_folder_native(mf.lora.apply(fam.base, tmp_path / "ad", tmp_path / "m").path)
    want = read_folder_native(fam.a)
    for k in want:
        if "q_proj" in k or "norm" in k or "embed" in k or "lm_head" in k:
            assert np.array_equal(ours[k], want[k]), k  # saved whole
        assert np.abs(merged[k].numpy() - ours[k]).max() <= 1e-6 * max(1.0, np.abs(ours[k]).max()), k
