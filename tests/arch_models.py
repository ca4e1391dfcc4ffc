"""Tiny random-init transformers models of every family merge_fast.arch supports.

Used by ``tests/test_arch_namespace.py``.  Everything is built locally (no hub access):
``build(family, dir)`` instantiates the family's own config/model classes with hidden
size 32-64, 2 layers and a small vocabulary (GQA wherever the family supports it), saves
with ``save_pretrained`` (safetensors) and returns the loaded tensors as numpy arrays.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

FAMILIES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
    "phi", "phi3", "gpt_neox", "opt", "gpt2", "bert",
)

#: What name-only detection can tell (llama / mistral / gemma share tensor names).
NAME_ONLY_FAMILY = {"mistral": "llama", "gemma": "llama"}

#: Gated-MLP families (have mlp.gate).
GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"}


def _specs() -> dict[str, tuple[Any, Any, dict[str, Any]]]:
    import transformers as T

    dec = dict(num_hidden_layers=2, vocab_size=96, max_position_embeddings=64)
    gqa = dict(dec, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)
    return {
        "llama": (T.LlamaConfig, T.LlamaForCausalLM, dict(gqa, attention_bias=True, mlp_bias=False)),
        "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(gqa)),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(gqa)),
        "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(gqa, head_dim=16)),
        "gemma": (T.GemmaConfig, T.GemmaForCausalLM, dict(gqa, head_dim=16)),
        "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, dict(gqa, head_dim=16)),
        "gemma3_text": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, dict(gqa, head_dim=16)),
        "phi": (T.PhiConfig, T.PhiForCausalLM, dict(gqa, qk_layernorm=True)),
        "phi3": (T.Phi3Config, T.Phi3ForCausalLM, dict(gqa, hidden_size=48, num_attention_heads=6,
                                                      num_key_value_heads=2, pad_token_id=0)),
        "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM,
                     dict(dec, hidden_size=32, intermediate_size=64, num_attention_heads=4, rotary_pct=0.5)),
        "opt": (T.OPTConfig, T.OPTForCausalLM, dict(dec, hidden_size=32, ffn_dim=64, num_attention_heads=4,
                                                    word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2,
                                                    eos_token_id=2)),
        "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, dict(n_embd=32, n_layer=2, n_head=4, vocab_size=96,
                                                       n_positions=64, bos_token_id=0, eos_token_id=0)),
        "bert": (T.BertConfig, T.BertModel, dict(dec, hidden_size=32, intermediate_size=64,
                                                 num_attention_heads=4)),
        # extra variants (not in FAMILIES): OPT-350m layout, Gemma-3 multimodal
        "opt_350m": (T.OPTConfig, T.OPTForCausalLM, dict(dec, hidden_size=32, ffn_dim=64, num_attention_heads=4,
                                                         word_embed_proj_dim=16, do_layer_norm_before=False,
                                                         pad_token_id=1, bos_token_id=2, eos_token_id=2)),
        "gemma3_mm": (T.Gemma3Config, T.Gemma3ForConditionalGeneration, dict(
            text_config=dict(gqa, head_dim=16, vocab_size=300),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                               image_size=28, patch_size=14),
            mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298)),
    }


@dataclass
class Built:
    family: str
    path: str
    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    model: Any  # the torch model (eval mode)


def load_tensors(path: str) -> dict[str, np.ndarray]:
    """Load a safetensors file as numpy arrays; bf16 comes back as ``ml_dtypes.bfloat16``."""
    import ml_dtypes
    import torch
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    with safe_open(path, framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            if t.dtype == torch.bfloat16:
                out[k] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            else:
                out[k] = t.numpy()
    return out


def build(family: str, directory: str, *, dtype: str = "float32", seed: int = 0) -> Built:
    """Build, save and reload a tiny model of ``family`` under ``directory``."""
    import torch

    cfg_cls, model_cls, kw = _specs()[family]
    torch.manual_seed(seed)
    config = cfg_cls(**kw)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    with torch.no_grad():  # make norm weights / biases non-trivial so mix-ups show
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    return Built(family, directory, cfg, load_tensors(os.path.join(directory, "model.safetensors")), model)


def modeling_module(model: Any) -> Any:
    """The ``transformers.models.<x>.modeling_<x>`` module of a model."""
    import importlib

    return importlib.import_module(type(model).__module__)


class AttentionCapture:
    """Record, per attention call, the model's own q/k (before RoPE) and v.

    Patches the modeling module's ``apply_rotary_pos_emb`` (pre-rotation q, k) and
    ``eager_attention_forward`` (v; and q, k for models without RoPE).  Use as a context
    manager around a forward pass of a model built with ``attn_implementation="eager"``.
    """

    def __init__(self, model: Any) -> None:
        self.mod = modeling_module(model)
        self.pre_rope: list[tuple[Any, Any]] = []
        self.calls: list[tuple[Any, Any, Any]] = []
        self._saved: dict[str, Callable[..., Any]] = {}

    def __enter__(self) -> "AttentionCapture":
        mod = self.mod
        if hasattr(mod, "apply_rotary_pos_emb"):
            orig_rope = mod.apply_rotary_pos_emb
            self._saved["apply_rotary_pos_emb"] = orig_rope

            def rope(q: Any, k: Any, *a: Any, **kw: Any) -> Any:
                self.pre_rope.append((q.detach().clone(), k.detach().clone()))
                return orig_rope(q, k, *a, **kw)

            mod.apply_rotary_pos_emb = rope
        orig_attn = mod.eager_attention_forward
        self._saved["eager_attention_forward"] = orig_attn

        def attn(module: Any, query: Any, key: Any, value: Any, *a: Any, **kw: Any) -> Any:
            self.calls.append((query.detach().clone(), key.detach().clone(), value.detach().clone()))
            return orig_attn(module, query, key, value, *a, **kw)

        mod.eager_attention_forward = attn
        return self

    def __exit__(self, *exc: Any) -> None:
        for k, v in self._saved.items():
            setattr(self.mod, k, v)


def qed_config() -> dict[str, Any]:
    """config.json of the custom QED example (examples/qed_fused.yaml)."""
    return {
        "model_type": "qed_fused", "architectures": ["QedFusedForCausalLM"], "d_model": 48, "n_layers": 2,
        "n_heads": 6, "n_kv_heads": 2, "d_ff": 80, "vocab_size": 64, "tie_word_embeddings": True,
    }


def qed_tensors(config: dict[str, Any], *, prefix: str = "qed.", dtype: Any = np.float32, seed: int = 0
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Hand-built QED checkpoint: returns ``(stored tensors, expected canonical tensors)``."""
    rng = np.random.default_rng(seed)
    d, h, kv, ff, v = config["d_model"], config["n_heads"], config["n_kv_heads"], config["d_ff"], config["vocab_size"]
    hd = d // h

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32).astype(dtype)

    stored: dict[str, np.ndarray] = {}
    canon: dict[str, np.ndarray] = {}
    stored[f"{prefix}tok_emb.weight"] = canon["embed.weight"] = r(v, d)
    for i in range(config["n_layers"]):
        B, L = f"{prefix}blocks.{i}.", f"layers.{i}."
        q, k, vv = r(h * hd, d), r(kv * hd, d), r(kv * hd, d)
        gate, up = r(ff, d), r(ff, d)
        stored[B + "norm1.weight"] = canon[L + "attn_norm.weight"] = r(d)
        stored[B + "attn.wqkv.weight"] = np.concatenate([q, k, vv], 0)
        canon[L + "attn.q.weight"], canon[L + "attn.k.weight"], canon[L + "attn.v.weight"] = q, k, vv
        stored[B + "attn.wo.weight"] = canon[L + "attn.o.weight"] = r(d, h * hd)
        stored[B + "norm2.weight"] = canon[L + "mlp_norm.weight"] = r(d)
        stored[B + "ffn.w13.weight"] = np.concatenate([gate, up], 0)
        canon[L + "mlp.gate.weight"], canon[L + "mlp.up.weight"] = gate, up
        stored[B + "ffn.w2.weight"] = canon[L + "mlp.down.weight"] = r(d, ff)
    stored[f"{prefix}norm_f.weight"] = canon["final_norm.weight"] = r(d)
    stored["lm_head.bias"] = canon["lm_head.bias"] = r(v)
    return stored, canon
