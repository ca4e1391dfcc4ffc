"""A custom architecture (the QED-75M card's layout) through merge_fast, on tiny models.

The card: QED-75M is a small decoder shipped as custom code (``modeling_qed.py``,
``QEDConfig`` with ``model_type: qed``, loaded with ``trust_remote_code=True``): RoPE,
pre-norm RMSNorm blocks with separate q/k/v/o projections (``bias=config.bias``), a SwiGLU
MLP, a final norm and an ``lm_head`` with a bias whose weight is tied to ``embed_tokens``
(the checkpoint holds ``lm_head.bias`` but no ``lm_head.weight``).

Here, with the tiny implementation in ``examples/qed/`` (saved beside the weights with
``auto_map``) and the mapping ``merge_fast/arch/examples/qed.yaml``:

1. a QED base model and two brief fine-tunes (different synthetic tasks) are merged
   same-architecture through the config path (``merge_fast.run`` with a mergekit YAML,
   task_arithmetic); the result loads with ``trust_remote_code`` and gives finite logits;
2. the canonical round trip through the mapping is bit-exact (tied and untied QED);
3. QED as a donor onto a Llama-shaped anchor, and a Llama donor onto a QED anchor, through
   the mapping: a donor that is the anchor's function in another residual basis (relaid out
   in the other family) is aligned back onto the anchor's logits; then a real cross-family
   ``procrustes_absorb`` in each direction loads and gives finite logits.

Run:  python examples/qed.py [--out DIR] [--quick]
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

HERE = Path(__file__).resolve().parent
CODE = HERE / "qed"
AUTO_MAP = {"AutoConfig": "configuration_qed.QEDConfig", "AutoModelForCausalLM": "modeling_qed.QEDForCausalLM"}


def write_tokenizer(d: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))


def qed_classes():
    sys.path.insert(0, str(CODE))
    try:
        from configuration_qed import QEDConfig
        from modeling_qed import QEDForCausalLM
    finally:
        sys.path.remove(str(CODE))
    return QEDConfig, QEDForCausalLM


def save_qed(model, d: Path, vocab: int) -> Path:
    model.config.auto_map = dict(AUTO_MAP)
    model.config.architectures = ["QEDForCausalLM"]
    model.save_pretrained(str(d))
    for f in ("configuration_qed.py", "modeling_qed.py"):
        shutil.copy(CODE / f, d / f)
    write_tokenizer(d, vocab)
    return d


def load(d: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(d), trust_remote_code=True, dtype=torch.float32).eval()


def task_batch(task: str, vocab: int, n: int, seq: int, seed: int):
    """'count': ascending runs in the lower half of the vocabulary (t, t+1, ...);
    'down': descending runs in the upper half. Disjoint tokens, so one model can do both."""
    import torch

    g = torch.Generator().manual_seed(seed)
    half = vocab // 2
    start = torch.randint(0, half, (n, 1), generator=g)
    steps = torch.arange(seq)[None, :]
    if task == "count":
        return (start + steps) % half
    return half + (start - steps) % half


def lm_loss(model, ids) -> float:
    import torch

    with torch.no_grad():
        return float(model(ids, labels=ids).loss)


def fine_tune(model, task: str, vocab: int, steps: int, seed: int):
    import copy

    import torch

    m = copy.deepcopy(model).train()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for s in range(steps):
        ids = task_batch(task, vocab, 16, 16, seed * 1000 + s)
        loss = m(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def read_all(d: Path) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def rotate_canonical(canon: dict, Q: np.ndarray) -> dict:
    """Same function in another residual basis: RMSNorm gains folded into the linears that
    read the stream (then set to 1), every stream read right-multiplied by Q, every write
    left-multiplied by Qᵀ (h -> h Q). Head: tied heads need a unit final gain."""
    out = {}
    for k, v in canon.items():
        v = v.astype(np.float64)
        parts = k.split(".")
        role = ".".join(parts[2:-1]) if k.startswith("layers.") else ".".join(parts[:-1])
        param = parts[-1]
        prefix = ".".join(parts[:2]) + "." if k.startswith("layers.") else ""
        if role == "embed":
            v = v @ Q
        elif role in ("attn.q", "attn.k", "attn.v", "mlp.gate", "mlp.up") and param == "weight":
            g = canon[prefix + ("attn_norm" if role.startswith("attn") else "mlp_norm") + ".weight"]
            v = (v * g[None, :]) @ Q
        elif role in ("attn.o", "mlp.down"):
            v = Q.T @ v
        elif role == "lm_head" and param == "weight":
            v = (v * canon["final_norm.weight"][None, :]) @ Q
        elif role in ("attn_norm", "mlp_norm", "final_norm"):
            v = np.ones_like(v)
        out[k] = v.astype(np.float32)
    return out


def save_tensors(d: Path, tensors: dict, config: dict, vocab: int, code: bool) -> Path:
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(config, indent=2))
    if code:
        for f in ("configuration_qed.py", "modeling_qed.py"):
            shutil.copy(CODE / f, d / f)
    write_tokenizer(d, vocab)
    return d


def logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(ids).logits.numpy()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="keep everything under DIR (default: a temp folder, removed)")
    ap.add_argument("--quick", action="store_true", help="smallest sizes (tests)")
    args = ap.parse_args(argv)
    size = dict(d=32, layers=2, heads=4, ffn=64, vocab=64, steps=30) if args.quick else \
        dict(d=64, layers=4, heads=4, ffn=128, vocab=128, steps=150)
    root = args.out or Path(tempfile.mkdtemp(prefix="qed_example_"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    import torch
    import transformers as T

    torch.set_num_threads(1)  # tiny models: threads only contend (2 shared cores)

    import merge_fast as mf
    from merge_fast.arch import EXAMPLES_DIR, canonicalize, decanonicalize, get_family, load_mapping

    QEDConfig, QEDForCausalLM = qed_classes()
    qed_yaml = EXAMPLES_DIR / "qed.yaml"
    qed_fam = load_mapping(qed_yaml, register=True, replace=True)
    V = size["vocab"]
    summary: dict = {"sizes": size}
    try:
        # ------------------------------------------------------------------ 1. same-arch merge
        torch.manual_seed(0)
        cfg = QEDConfig(vocab_size=V, d_model=size["d"], n_layers=size["layers"], n_heads=size["heads"],
                        ffn_hidden_dim=size["ffn"], bias=True, tie_word_embeddings=True)
        base = QEDForCausalLM(cfg).eval()
        base = fine_tune(base, "count", V, size["steps"] // 3, seed=1)  # a little of both: the "pretrained" base
        base = fine_tune(base, "down", V, size["steps"] // 3, seed=2)
        ft_a = fine_tune(base, "count", V, size["steps"], seed=3)
        ft_b = fine_tune(base, "down", V, size["steps"], seed=4)
        paths = {n: save_qed(m, root / "models" / f"qed_{n}", V) for n, m in
                 (("base", base), ("count", ft_a), ("down", ft_b))}
        names = sorted(read_all(paths["base"]))
        print(f"built a tiny QED (d_model {size['d']}, {size['layers']} layers, tied head with bias) and two "
              f"fine-tunes in {root / 'models'}; checkpoint holds lm_head.bias: {'lm_head.bias' in names}, "
              f"lm_head.weight: {'lm_head.weight' in names}")
        yaml_text = f"""merge_method: task_arithmetic
base_model: {paths['base']}
models:
  - model: {paths['count']}
    parameters: {{weight: 1.0}}
  - model: {paths['down']}
    parameters: {{weight: 1.0}}
dtype: float32
"""
        (root / "qed_merge.yml").write_text(yaml_text)
        merged = root / "qed_merged"
        mf.run(yaml_text, merged)
        mm = load(merged)
        ids = {t: task_batch(t, V, 32, 16, seed=99) for t in ("count", "down")}
        losses = {}
        for n, m in (("base", base), ("count", ft_a), ("down", ft_b), ("merged", mm)):
            losses[n] = {t: lm_loss(m, ids[t]) for t in ids}
        out_logits = logits(mm, ids["count"])
        summary["same_arch"] = {"losses": losses, "finite": bool(np.all(np.isfinite(out_logits))),
                                "loaded_class": type(mm).__name__,
                                "code_copied": sorted(p.name for p in merged.glob("*.py"))}
        print("\n1. task_arithmetic of the two fine-tunes through merge_fast.run (mergekit YAML):")
        print(f"   output loads with trust_remote_code as {type(mm).__name__}; remote code copied: "
              f"{summary['same_arch']['code_copied']}; finite logits: {summary['same_arch']['finite']}")
        for n, l in losses.items():
            print(f"   {n:7s} loss on 'count' {l['count']:.3f}   on 'down' {l['down']:.3f}")

        # ------------------------------------------------------------------ 2. canonical round trip
        print("\n2. canonical round trip through arch/examples/qed.yaml:")
        untied_cfg = QEDConfig(vocab_size=V, d_model=size["d"], n_layers=size["layers"], n_heads=size["heads"],
                               ffn_hidden_dim=size["ffn"], bias=False, tie_word_embeddings=False)
        torch.manual_seed(5)
        paths["untied"] = save_qed(QEDForCausalLM(untied_cfg).eval(), root / "models" / "qed_untied", V)
        summary["round_trip"] = {}
        for n in ("base", "untied"):
            t = read_all(paths[n])
            c = json.loads((paths[n] / "config.json").read_text())
            canon = canonicalize(t, c)
            back = decanonicalize(canon, c)
            exact = sorted(back) == sorted(t) and all(back[k].tobytes() == t[k].tobytes() for k in t)
            summary["round_trip"][n] = {"family": canon.family.name, "tensors": len(t), "bit_exact": exact,
                                        "has_lm_head_weight": "lm_head.weight" in canon}
            print(f"   {n:7s} family {canon.family.name}, {len(t)} tensors -> {len(canon)} canonical -> back, "
                  f"bit-exact: {exact}")

        # ------------------------------------------------------------------ 3. across families
        print("\n3. QED <-> Llama through the mapping:")
        rng = np.random.default_rng(11)
        q, r = np.linalg.qr(rng.standard_normal((size["d"], size["d"])))
        Q = q * np.sign(np.diag(r))
        lcfg = T.LlamaConfig(vocab_size=V, hidden_size=size["d"], num_hidden_layers=size["layers"],
                             num_attention_heads=size["heads"], num_key_value_heads=size["heads"],
                             intermediate_size=size["ffn"], attention_bias=True, tie_word_embeddings=True,
                             rms_norm_eps=1e-5, max_position_embeddings=64)
        torch.manual_seed(6)
        llama = T.LlamaForCausalLM(lcfg).eval()
        with torch.no_grad():  # non-trivial gains, except the final one (a tied head cannot absorb it)
            for name, p in llama.named_parameters():
                if name.endswith("layernorm.weight"):
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape))
                elif name.endswith("bias"):
                    p.copy_(0.05 * torch.randn(p.shape))
        paths["llama_anchor"] = root / "models" / "llama_anchor"
        llama.save_pretrained(str(paths["llama_anchor"]))
        write_tokenizer(paths["llama_anchor"], V)
        probe = task_batch("count", V, 4, 16, seed=7)

        # (a) QED donor = the Llama anchor's function, rotated and relaid out as QED
        lt = read_all(paths["llama_anchor"])
        lconf = json.loads((paths["llama_anchor"] / "config.json").read_text())
        rot = rotate_canonical(canonicalize(lt, lconf), Q)
        rot["lm_head.bias"] = np.zeros(V, np.float32)  # QED's head always has a bias
        qcfg = QEDConfig(vocab_size=V, d_model=size["d"], n_layers=size["layers"], n_heads=size["heads"],
                         ffn_hidden_dim=size["ffn"], bias=True, tie_word_embeddings=True)
        qconf = dict(qcfg.to_dict(), auto_map=dict(AUTO_MAP), architectures=["QEDForCausalLM"])
        qt = decanonicalize(rot, qconf, qed_fam.bind("model."), source_family="llama")
        paths["qed_relative"] = save_tensors(root / "models" / "qed_relative", qt, qconf, V, code=True)
        qrel = load(paths["qed_relative"])
        la = logits(llama, probe)
        fn_gap = float(np.abs(logits(qrel, probe) - la).max())
        res = mf.align(paths["llama_anchor"], paths["qed_relative"], out=root / "qed_onto_llama",
                       donor_family=qed_yaml)
        back_gap = float(np.abs(logits(T.AutoModelForCausalLM.from_pretrained(str(root / "qed_onto_llama")).eval(),
                                       probe) - la).max())
        rot_err = float(np.abs(res.rotation - Q.T).max())
        summary["qed_donor_onto_llama"] = {"relative_logit_gap": fn_gap, "aligned_logit_gap": back_gap,
                                           "rotation_error": rot_err, "method": res.method}
        print(f"   QED donor (Llama anchor's function, rotated, in QED layout; logits differ from the anchor's by "
              f"{fn_gap:.1e}) aligned onto the Llama anchor: rotation recovered to {rot_err:.1e}, aligned model's "
              f"logits within {back_gap:.1e} of the anchor's")

        # (b) Llama donor = the QED fine-tune's function, rotated and relaid out as Llama
        qa = read_all(paths["count"])
        qa_conf = json.loads((paths["count"] / "config.json").read_text())
        qcanon = canonicalize(qa, qa_conf)
        rot = rotate_canonical(qcanon, Q)  # QED's final norm is trained: untie the Llama donor's head
        rot["lm_head.weight"] = ((qcanon["embed.weight"] * qcanon["final_norm.weight"][None, :]) @ Q).astype(np.float32)
        head_bias = rot.pop("lm_head.bias")
        lcfg2 = dict(lconf, tie_word_embeddings=False)
        lt2 = decanonicalize(rot, lcfg2, get_family("llama").bind("model."), source_family="qed")
        paths["llama_relative"] = save_tensors(root / "models" / "llama_relative", lt2, lcfg2, V, code=False)
        lrel = T.AutoModelForCausalLM.from_pretrained(str(paths["llama_relative"])).eval()
        qa_logits = logits(ft_a, probe)
        fn_gap = float(np.abs(logits(lrel, probe) + head_bias - qa_logits).max())
        res = mf.align(paths["count"], paths["llama_relative"], out=root / "llama_onto_qed", anchor_family=qed_yaml,
                       missing="anchor")
        back = load(root / "llama_onto_qed")
        back_gap = float(np.abs(logits(back, probe) - qa_logits).max())
        summary["llama_donor_onto_qed"] = {"relative_logit_gap": fn_gap, "aligned_logit_gap": back_gap,
                                           "rotation_error": float(np.abs(res.rotation - Q.T).max()),
                                           "filled_from_anchor": res.filled_from_anchor}
        print(f"   Llama donor (QED fine-tune's function, rotated, untied head; logits + QED head bias differ by "
              f"{fn_gap:.1e}) aligned onto the QED anchor (trust_remote_code): logits within {back_gap:.1e} of the "
              f"anchor's; kept from the anchor: {res.filled_from_anchor}")

        # (c) real cross-family absorbs, both ways
        a1 = mf.procrustes_absorb(paths["llama_anchor"], [paths["count"], paths["down"]],
                                  donor_families=[qed_yaml, qed_yaml], out=root / "absorb_qed_into_llama",
                                  beta=0.6, attn_rank=3, mlp_rank=3, attn_tol=0.05, mlp_tol=0.2)
        m1 = T.AutoModelForCausalLM.from_pretrained(str(root / "absorb_qed_into_llama")).eval()
        a2 = mf.procrustes_absorb(paths["count"], [paths["llama_anchor"]], anchor_family=qed_yaml,
                                  out=root / "absorb_llama_into_qed", beta=0.6, attn_rank=3, mlp_rank=3,
                                  attn_tol=0.05, mlp_tol=0.2)
        m2 = load(root / "absorb_llama_into_qed")
        summary["absorb"] = {
            "qed_into_llama": {"class": type(m1).__name__, "finite": bool(np.all(np.isfinite(logits(m1, probe)))),
                               "absorbed": len(a1.absorbed)},
            "llama_into_qed": {"class": type(m2).__name__, "finite": bool(np.all(np.isfinite(logits(m2, probe)))),
                               "absorbed": len(a2.absorbed)},
        }
        for k, v in summary["absorb"].items():
            print(f"   procrustes_absorb {k}: {v['absorbed']} tensors absorbed, loads as {v['class']}, "
                  f"finite logits: {v['finite']}")
        summary["seconds"] = time.perf_counter() - t0
        print(f"\ndone in {summary['seconds']:.1f} s")
        (root / "summary.json").write_text(json.dumps(summary, indent=2))
    finally:
        from merge_fast.arch import unregister_family

        unregister_family(qed_fam.name)
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    return summary


if __name__ == "__main__":
    s = main()
    ok = (s.get("same_arch", {}).get("finite") and all(v["bit_exact"] for v in s.get("round_trip", {}).values())
          and s.get("qed_donor_onto_llama", {}).get("aligned_logit_gap", 1.0) < 1e-3
          and s.get("llama_donor_onto_qed", {}).get("aligned_logit_gap", 1.0) < 1e-3)
    sys.exit(0 if ok else 1)
