"""``pytorch_model*.bin`` checkpoints: converted once (torch, weights_only) into a safetensors
cache and merged as usual; the numbers must equal the same merge of the safetensors copy."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import read_folder_native

import merge_fast as mf

torch = pytest.importorskip("torch")

SIDE = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path / "hf" / "merge_fast" / "bin-cache"


def save_bin(src: Path, dst: Path, shards: int = 1, legacy: bool = False) -> Path:
    """The layout transformers 4.x writes with safe_serialization=False: pytorch_model.bin, or
    pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json."""
    model = read_folder_native(src)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in model.items()}
    dst.mkdir(parents=True)
    for f in SIDE:
        if (src / f).is_file():
            (dst / f).write_bytes((src / f).read_bytes())
    kw = {"_use_new_zipfile_serialization": False} if legacy else {}
    if shards == 1:
        torch.save(sd, dst / "pytorch_model.bin", **kw)
        return dst
    names = sorted(sd)
    wm = {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in names[i::shards]}
        torch.save(part, dst / fname, **kw)
        wm.update({k: fname for k in part})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return dst


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = read_folder_native(a), read_folder_native(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].tobytes() == tb[k].tobytes(), k


@pytest.mark.parametrize("shards,legacy", [(1, False), (3, False), (1, True)])
def test_bin_checkpoint_merges_like_its_safetensors_copy(llama_f32, tmp_path, cache, shards, legacy):
    fam = llama_f32
    a_bin = save_bin(fam.a, tmp_path / "a_bin", shards, legacy)
    mf.slerp(a_bin, fam.b, t=0.3, out=tmp_path / "from_bin")
    mf.slerp(fam.a, fam.b, t=0.3, out=tmp_path / "from_st")
    assert_same_tensors(tmp_path / "from_bin", tmp_path / "from_st")
    # config.json came from the .bin folder (the first model), through the converted copy
    assert json.loads((tmp_path / "from_bin" / "config.json").read_text())["merge_fast_test_id"].endswith("-a")
    converted = list(cache.iterdir())
    assert len(converted) == 1 and not list(a_bin.glob("*.safetensors"))  # the input folder is untouched
    assert len(list(converted[0].glob("*.safetensors"))) == shards
    # The next run reuses the conversion.
    marker = converted[0] / ".merge-fast-converted"
    stamp = marker.stat().st_mtime_ns
    mf.run({"merge_method": "linear", "models": [{"model": str(a_bin), "parameters": {"weight": 1.0}}]}, tmp_path / "again")
    assert marker.stat().st_mtime_ns == stamp and list(cache.iterdir()) == converted
    assert_same_tensors(tmp_path / "again", fam.a)


class Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused(llama_f32, tmp_path, cache):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((llama_f32.a / "config.json").read_bytes())
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "x": Evil(str(marker))}, bad / "pytorch_model.bin")
    with pytest.raises(mf.MergeError) as ei:
        mf.linear([bad, llama_f32.b], out=tmp_path / "out")
    assert "pytorch_model.bin" in str(ei.value) and "weights_only" in str(ei.value)
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert not cache.exists() or not list(cache.iterdir())  # no half conversion left


def test_without_torch_says_how_to_install(llama_f32, tmp_path):
    a_bin = save_bin(llama_f32.a, tmp_path / "a_bin")
    code = ("import sys; sys.modules['torch'] = None\n"
            "import merge_fast as mf\n"
            f"try:\n    mf.linear([{str(a_bin)!r}, {str(llama_f32.b)!r}], out={str(tmp_path / 'out')!r})\n"
            "except mf.ConfigError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={"HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "PATH": "/usr/bin:/bin"})
    assert "pip install torch" in r.stdout and "a_bin" in r.stdout, r.stdout + r.stderr
    assert not (tmp_path / "out").exists()


def test_bin_lora_adapter(llama_f32, tmp_path, cache):
    """adapter_model.bin (older peft) is converted like model weights."""
    rng = np.random.default_rng(2)
    base = read_folder_native(llama_f32.base)
    q = "model.layers.0.self_attn.q_proj.weight"
    lt = {f"base_model.model.{q[:-7]}.lora_A.weight": rng.standard_normal((2, base[q].shape[1])).astype(np.float32),
          f"base_model.model.{q[:-7]}.lora_B.weight": rng.standard_normal((base[q].shape[0], 2)).astype(np.float32)}
    ad = tmp_path / "adapter"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                        "target_modules": ["q_proj"]}))
    torch.save({k: torch.from_numpy(v) for k, v in lt.items()}, ad / "adapter_model.bin")
    mf.lora.apply(llama_f32.base, ad, tmp_path / "out")
    got = read_folder_native(tmp_path / "out")
    b, a = lt[f"base_model.model.{q[:-7]}.lora_B.weight"], lt[f"base_model.model.{q[:-7]}.lora_A.weight"]
    np.testing.assert_allclose(got[q], base[q] + 2.0 * (b.astype(np.float64) @ a), rtol=1e-5, atol=1e-5)
    k = "model.layers.0.self_attn.k_proj.weight"
    assert got[k].tobytes() == base[k].tobytes()
