"""Cross-family absorption, as in the Qwen2.5-7B-Instruct "borg-merge" card, on tiny models.

The card: one anchor (Qwen2.5-7B-Instruct) and donors of several families (Mistral, SmolLM2,
Granite, Phi-3, phi-2, Pythia, OPT); every checkpoint is mapped onto one canonical key
namespace, each donor is aligned to the anchor by orthogonal Procrustes, the donor deltas are
filtered per role (attention tolerance 0.05, MLP 0.20, top-3 singular components) and absorbed
with blend beta = 0.6, and the result is written under the anchor's names.

Here (random-init transformers models that share one tokenizer, built in a temp folder):

1. every model of the pool (Qwen2 anchor; Llama, GPT-NeoX, Phi, Granite and T5 donors, plus
   a Llama "relative": the anchor in another residual basis, slightly perturbed) goes through
   the canonical namespace and back, bit for bit;
2. the T5 donor's cross-attention is refused for a decoder-only anchor (clear error), then
   explicitly skipped (only its decoder's self-attention and MLP roles carry over);
3. procrustes_absorb with the card's numbers, run twice -> byte-identical files;
4. the card's per-tensor alignment (each tensor its own Procrustes rotation) against ours
   (one residual-stream rotation, norm gains folded): how far each aligned donor and each
   merge lands from the anchor (relative Frobenius distance) and how much the logits move on
   a fixed batch;
5. r_max = 0 (no component absorbed): the whole canonicalise -> align -> write path returns
   the anchor's tensors bit for bit.

Run:  python examples/borg_merge.py [--out DIR] [--quick]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CARD = dict(beta=0.6, attn_rank=3, mlp_rank=3, attn_tol=0.05, mlp_tol=0.20)


def write_tokenizer(d: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))


def configs(size: dict) -> dict:
    import transformers as T

    h, L, V, F = size["hidden"], size["layers"], size["vocab"], size["inter"]
    common = dict(vocab_size=V, hidden_size=h, num_hidden_layers=L, num_attention_heads=4,
                  max_position_embeddings=64, tie_word_embeddings=False, intermediate_size=F)
    return {
        "anchor_qwen2": (T.Qwen2Config(num_key_value_heads=2, **common), T.Qwen2ForCausalLM),
        "llama": (T.LlamaConfig(**dict(common, num_hidden_layers=L + 1, intermediate_size=F - 16),
                                num_key_value_heads=2), T.LlamaForCausalLM),
        "gpt_neox": (T.GPTNeoXConfig(rotary_pct=0.5, **common), T.GPTNeoXForCausalLM),
        "phi": (T.PhiConfig(num_key_value_heads=4, **common), T.PhiForCausalLM),
        "granite": (T.GraniteConfig(num_key_value_heads=2, embedding_multiplier=12.0, residual_multiplier=0.22,
                                    attention_multiplier=1.0 / (h // 4), logits_scaling=8.0, **common),
                    T.GraniteForCausalLM),
        "t5": (T.T5Config(vocab_size=V, d_model=h, d_kv=h // 4, num_heads=4, d_ff=F, num_layers=L,
                          num_decoder_layers=L, feed_forward_proj="gated-gelu", decoder_start_token_id=0),
               T.T5ForConditionalGeneration),
    }


def randomize(model, seed: int) -> None:
    """Non-trivial norm gains (they matter for folding) and weights away from init."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def relative_of(anchor_model, seed: int):
    """The anchor in another residual basis (gains folded, stream rotated by a random Q) with
    a small perturbation: a Llama-shaped "relative" whose alignment is known."""
    import copy

    import torch
    import transformers as T

    cfg = anchor_model.config
    lcfg = T.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                         num_key_value_heads=cfg.num_key_value_heads, intermediate_size=cfg.intermediate_size,
                         max_position_embeddings=64, tie_word_embeddings=False, attention_bias=True)
    m = T.LlamaForCausalLM(lcfg).eval()
    src = copy.deepcopy(anchor_model)
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((cfg.hidden_size, cfg.hidden_size)))
    Q = torch.tensor(q * np.sign(np.diag(r)), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        def rin(dst, lin, gain):
            dst.weight.copy_((lin.weight.double() * gain.double()[None, :] @ Q).float())
            if lin.bias is not None and dst.bias is not None:
                dst.bias.copy_(lin.bias)

        def rout(dst, lin):
            dst.weight.copy_((Q.T @ lin.weight.double()).float())

        a, b = src.model, m.model
        b.embed_tokens.weight.copy_((a.embed_tokens.weight.double() @ Q).float())
        for la, lb in zip(a.layers, b.layers):
            for s in ("q", "k", "v"):
                rin(getattr(lb.self_attn, f"{s}_proj"), getattr(la.self_attn, f"{s}_proj"), la.input_layernorm.weight)
            rout(lb.self_attn.o_proj, la.self_attn.o_proj)
            lb.self_attn.o_proj.bias.zero_()
            for s in ("gate", "up"):
                rin(getattr(lb.mlp, f"{s}_proj"), getattr(la.mlp, f"{s}_proj"), la.post_attention_layernorm.weight)
            rout(lb.mlp.down_proj, la.mlp.down_proj)
            lb.input_layernorm.weight.fill_(1.0)
            lb.post_attention_layernorm.weight.fill_(1.0)
        rin(m.lm_head, src.lm_head, a.norm.weight)
        b.norm.weight.fill_(1.0)
        for name, p in m.named_parameters():  # the "fine-tune": a small perturbation
            if "norm" not in name:
                p.add_(0.01 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return m


def build_pool(root: Path, size: dict) -> dict:
    import torch

    paths = {}
    anchor_model = None
    for i, (name, (cfg, cls)) in enumerate(configs(size).items()):
        torch.manual_seed(100 + i)
        model = cls(cfg).eval()
        randomize(model, 200 + i)
        d = root / "models" / name
        model.save_pretrained(str(d))
        write_tokenizer(d, size["vocab"])
        paths[name] = d
        if name == "anchor_qwen2":
            anchor_model = model
    rel = relative_of(anchor_model, seed=7)
    d = root / "models" / "llama_relative"
    rel.save_pretrained(str(d))
    write_tokenizer(d, size["vocab"])
    paths["llama_relative"] = d
    return paths


def read_all(d: Path) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def round_trip(path: Path) -> tuple[str, int, bool]:
    from merge_fast.arch import canonicalize, decanonicalize, read_config

    t, cfg = read_all(path), read_config(path)
    canon = canonicalize(t, cfg)
    back = decanonicalize(canon, cfg)
    same = sorted(back) == sorted(t) and all(
        back[k].dtype == t[k].dtype and back[k].tobytes() == t[k].tobytes() for k in t)
    return canon.family.name, len(canon), same


def rel_distance(got: dict, ref: dict, keys=None) -> float:
    keys = [k for k in ref if keys is None or k in keys]
    num = sum(float(np.sum((got[k].astype(np.float64) - ref[k]) ** 2)) for k in keys)
    den = sum(float(np.sum(ref[k].astype(np.float64) ** 2)) for k in keys)
    return float(np.sqrt(num / den))


BATCH = [[5, 17, 3, 42, 8, 31, 1, 30], [9, 2, 60, 11, 4, 27, 50, 6]]


def logits(path: Path) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor(BATCH)).logits.numpy()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="keep everything under DIR (default: a temp folder, removed)")
    ap.add_argument("--quick", action="store_true", help="smallest sizes (tests)")
    args = ap.parse_args(argv)
    size = dict(hidden=32, layers=2, vocab=64, inter=64) if args.quick else dict(hidden=64, layers=4, vocab=128,
                                                                                inter=128)
    root = args.out or Path(tempfile.mkdtemp(prefix="borg_merge_"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    import merge_fast as mf
    import torch

    torch.set_num_threads(1)  # tiny models: threads only contend (2 shared cores)

    summary: dict = {"sizes": size, "card": CARD}
    try:
        paths = build_pool(root, size)
        anchor = paths["anchor_qwen2"]
        donors = [paths[n] for n in ("llama", "gpt_neox", "phi", "granite", "t5", "llama_relative")]
        print(f"built {len(paths)} tiny models (hidden {size['hidden']}, vocab {size['vocab']}) in {root}")

        print("\n1. canonical namespace round trip (canonicalize -> decanonicalize), bit for bit:")
        summary["round_trip"] = {}
        for name, p in paths.items():
            fam, n, same = round_trip(p)
            summary["round_trip"][name] = {"family": fam, "canonical_tensors": n, "bit_exact": same}
            print(f"   {name:15s} family {fam:9s} {n:3d} canonical tensors  bit-exact: {same}")

        print("\n2. T5 donor (encoder-decoder) onto the decoder-only anchor:")
        try:
            mf.procrustes_absorb(anchor, [paths["t5"]], out=root / "refused", **CARD)
            refusal = None
        except mf.ConfigError as e:
            refusal = str(e)
        summary["t5_refusal"] = refusal
        print(f"   refused: {refusal.split(';')[0] if refusal else 'NOT REFUSED'}")
        print("   with cross_attention='skip' only its decoder self-attention and MLP roles are used")

        print(f"\n3. procrustes_absorb {CARD}, {len(donors)} donors, run twice:")
        runs = []
        for i in (1, 2):
            res = mf.procrustes_absorb(anchor, donors, out=root / f"merged_run{i}", cross_attention="skip", **CARD)
            runs.append(res)
        files = sorted(p.name for p in (root / "merged_run1").iterdir() if p.is_file())
        identical = all((root / "merged_run1" / f).read_bytes() == (root / "merged_run2" / f).read_bytes()
                        for f in files)
        summary["byte_identical"] = identical
        summary["alignment_methods"] = runs[0].alignment_methods
        summary["absorbed_tensors"] = len(runs[0].absorbed)
        print(f"   {runs[0]}; alignment by {sorted(set(runs[0].alignment_methods))}")
        print(f"   {len(runs[0].absorbed)} anchor tensors received deltas; {len(files)} files byte-identical "
              f"across the two runs: {identical}")

        print("\n4. the card's per-tensor alignment vs one residual-stream rotation:")
        A = read_all(anchor)
        mats = [k for k in A if A[k].ndim == 2 and ("self_attn" in k or ".mlp." in k)]
        summary["aligned_distance"] = {}
        for name in ("llama_relative", "llama", "gpt_neox", "phi", "granite", "t5"):
            row = {}
            for mode in ("residual", "per_tensor"):
                out = root / f"aligned_{mode}_{name}"
                mf.align(anchor, paths[name], out=out, missing="anchor", mode=mode, cross_attention="skip")
                row[mode] = rel_distance(read_all(out), A, mats)
            summary["aligned_distance"][name] = row
            print(f"   aligned {name:15s} |W - W_anchor|/|W_anchor| over attention+MLP: residual "
                  f"{row['residual']:.4f}   per-tensor {row['per_tensor']:.4f}")
        mf.procrustes_absorb(anchor, donors, out=root / "merged_per_tensor", cross_attention="skip",
                             alignment="per_tensor", **CARD)
        La = logits(anchor)
        summary["merged"] = {}
        for mode, d in (("residual", root / "merged_run1"), ("per_tensor", root / "merged_per_tensor")):
            got = read_all(d)
            L = logits(d)
            row = {"param_distance": rel_distance(got, A),
                   "logits_rel_change": float(np.linalg.norm(L - La) / np.linalg.norm(La)),
                   "logits_max_abs_change": float(np.abs(L - La).max()),
                   "top1_agreement": float(np.mean(L.argmax(-1) == La.argmax(-1))),
                   "finite": bool(np.all(np.isfinite(L)))}
            summary["merged"][mode] = row
            print(f"   merged ({mode:10s}): |θ-θ_anchor|/|θ_anchor| = {row['param_distance']:.4f}; logits on a fixed "
                  f"2x8 batch: relative change {row['logits_rel_change']:.4f}, max |Δ| "
                  f"{row['logits_max_abs_change']:.4f}, top-1 agreement {row['top1_agreement']:.2f}")

        print("\n5. r_max = 0 (no component absorbed), through the whole pipeline:")
        mf.procrustes_absorb(anchor, donors, out=root / "rmax0", cross_attention="skip",
                             **dict(CARD, attn_rank=0, mlp_rank=0))
        got = read_all(root / "rmax0")
        exact = sorted(got) == sorted(A) and all(got[k].tobytes() == A[k].tobytes() and got[k].dtype == A[k].dtype
                                                 for k in A)
        summary["rmax0_bit_exact"] = exact
        print(f"   {len(got)} tensors, equal to the anchor's bit for bit: {exact}")
        summary["seconds"] = time.perf_counter() - t0
        print(f"\ndone in {summary['seconds']:.1f} s")
        (root / "summary.json").write_text(json.dumps(summary, indent=2))
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    return summary


if __name__ == "__main__":
    s = main()
    ok = (s.get("byte_identical") and s.get("rmax0_bit_exact") and s.get("t5_refusal")
          and all(v["bit_exact"] for v in s.get("round_trip", {}).values()))
    sys.exit(0 if ok else 1)
