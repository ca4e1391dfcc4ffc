"""``merge-fast demo``: builds two small Llama-architecture checkpoints (a base and a noisy
"fine-tune", bf16, ~25M parameters) and merges them with slerp. Needs no torch; when torch
and transformers are installed it also loads the result and runs a forward pass."""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from . import _core

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 8000,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}


def llama_shapes(cfg: dict) -> Dict[str, Tuple[int, ...]]:
    """Tensor names and shapes of a LlamaForCausalLM checkpoint."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    shapes: Dict[str, Tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def write_model(folder: Path, cfg: dict, seed: int, base_seed: Optional[int] = None, noise: float = 0.02) -> None:
    """Random weights (normals at init scale, ones for norms); with ``base_seed``, the base's
    weights plus ``noise``-scaled perturbations, like a fine-tune."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = []
    for k, (name, shape) in enumerate(llama_shapes(cfg).items()):
        def draw(s):
            rng = np.random.default_rng([s, k])
            if len(shape) == 1:
                return np.ones(shape, np.float32)
            return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

        w = draw(seed) if base_seed is None else draw(base_seed) + noise * draw(seed) * (len(shape) > 1)
        tensors.append((name, w.reshape(-1), list(shape), "bfloat16"))
    _core.save_file(str(folder / "model.safetensors"), tensors, {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))


def run_demo(workdir: Optional[str] = None, quiet: bool = False) -> int:
    from .methods.basic import slerp

    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="merge-fast-demo-")
        workdir = tmp.name
    root = Path(workdir)
    a, b, out = root / "base", root / "finetune", root / "merged"
    say = (lambda *x: None) if quiet else print
    t0 = time.perf_counter()
    write_model(a, CONFIG, seed=0)
    write_model(b, CONFIG, seed=1, base_seed=0, noise=0.5)
    say(f"made two Llama-architecture models ({sum(np.prod(s) for s in llama_shapes(CONFIG).values()) / 1e6:.1f}M params, bf16) "
        f"in {root} ({time.perf_counter() - t0:.2f} s)")
    r = slerp(str(a), str(b), t=0.5, out=str(out), progress=(not quiet) and sys.stderr.isatty(), overwrite=True)
    print(f"slerp t=0.5: {r}")
    try:
        import torch  # noqa: F401
        from transformers import AutoModelForCausalLM
    except ImportError:
        say("(install torch and transformers to also load the merged model and run a forward pass)")
    else:
        model = AutoModelForCausalLM.from_pretrained(str(out))
        logits = model(torch.arange(16)[None]).logits
        say(f"loaded with transformers: logits {tuple(logits.shape)}, finite: {bool(torch.isfinite(logits).all())}")
    if tmp is not None:
        tmp.cleanup()
    return 0
