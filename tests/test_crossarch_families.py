"""Granite / RoBERTa / T5 families (round trips, multipliers folded by alignment, T5's
cross-attention refused for decoder-only anchors) and procrustes_absorb's per-tensor
alignment mode against a numpy reference. Tiny random-init transformers models, no hub."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import merge_fast as mf  # noqa: E402
from merge_fast.arch import (  # noqa: E402
    UnknownTensorError, canonicalize, decanonicalize, detect_family, get_family, read_config,
)
from merge_fast.crossarch._model import ModelView, function_scales  # noqa: E402

V, H = 64, 32
T = transformers


def write_tokenizer(d: Path, vocab: int = V) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))


def save(model, d: Path) -> Path:
    model.save_pretrained(str(d))
    write_tokenizer(d, model.config.vocab_size)
    return d


def randomize(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def read_all(d: Path) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def logits(model, ids=None) -> np.ndarray:
    ids = torch.tensor([[5, 17, 3, 42, 8, 33, 1, 30]]) if ids is None else ids
    with torch.no_grad():
        return model(ids).logits[0].numpy()


COMMON = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              max_position_embeddings=64, tie_word_embeddings=False)
GRANITE = dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625, logits_scaling=8.0)


def build(kind: str, d: Path, seed: int = 0, **kw) -> Path:
    torch.manual_seed(seed)
    if kind == "qwen2":
        m = T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, **dict(COMMON, **kw)))
    elif kind == "llama":
        m = T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, **dict(COMMON, **kw)))
    elif kind == "granite":
        m = T.GraniteForCausalLM(T.GraniteConfig(num_key_value_heads=2, **dict(COMMON, **GRANITE, **kw)))
    elif kind == "roberta":
        m = T.RobertaForMaskedLM(T.RobertaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=48,
                                                 max_position_embeddings=40))
    elif kind in ("t5", "t5_gated"):
        m = T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=V, d_model=H, d_kv=8, d_ff=48, num_layers=3, num_decoder_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu" if kind == "t5_gated" else "relu", decoder_start_token_id=0))
    else:
        raise ValueError(kind)
    randomize(m.eval(), seed + 1)
    return save(m, d)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module")
def models(root):
    return {k: build(k, root / k, seed=i * 10) for i, k in
            enumerate(("qwen2", "llama", "granite", "roberta", "t5", "t5_gated"))}


# ----------------------------------------------------------------------------- namespace
@pytest.mark.parametrize("kind, family", [("granite", "granite"), ("roberta", "roberta"), ("t5", "t5"),
                                          ("t5_gated", "t5_gated")])
def test_round_trip_bit_exact(models, kind, family):
    t, cfg = read_all(models[kind]), read_config(models[kind])
    canon = canonicalize(t, cfg)
    assert canon.family.name == family
    back = decanonicalize(canon, cfg)
    assert sorted(back) == sorted(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and back[k].tobytes() == t[k].tobytes(), k


def test_roles_of_new_families(models):
    g = canonicalize(read_all(models["granite"]), read_config(models["granite"]))
    assert "layers.1.mlp.gate.weight" in g and "lm_head.weight" in g
    r = canonicalize(read_all(models["roberta"]), read_config(models["roberta"]))
    assert r.family.prefix == "roberta."
    assert {"embed_norm.weight", "layers.0.attn.q.bias", "mlm.dense.weight", "lm_head.bias"} <= set(r)
    t5 = canonicalize(read_all(models["t5"]), read_config(models["t5"]))
    # decoder (2 layers) mapped; cross-attention has its own roles; the encoder (3 layers) passes through
    assert {"layers.1.attn.q.weight", "layers.1.cross_attn.k.weight", "layers.1.cross_attn_norm.weight",
            "layers.1.mlp.up.weight", "layers.1.mlp.down.weight", "final_norm.weight"} <= set(t5)
    assert "layers.2.attn.q.weight" not in t5 and "layers.0.mlp.gate.weight" not in t5
    assert "passthrough.encoder.block.2.layer.1.DenseReluDense.wi.weight" in t5
    assert np.array_equal(t5["layers.1.mlp.up.weight"], read_all(models["t5"])["decoder.block.1.layer.2.DenseReluDense.wi.weight"])
    gated = canonicalize(read_all(models["t5_gated"]), read_config(models["t5_gated"]))
    raw = read_all(models["t5_gated"])
    assert np.array_equal(gated["layers.0.mlp.gate.weight"], raw["decoder.block.0.layer.2.DenseReluDense.wi_0.weight"])
    assert np.array_equal(gated["layers.0.mlp.up.weight"], raw["decoder.block.0.layer.2.DenseReluDense.wi_1.weight"])


def test_detection_of_new_families(models):
    # T5's two variants share model_type "t5": the tensor names pick the table
    for kind in ("t5", "t5_gated"):
        names = list(read_all(models[kind]))
        assert detect_family(read_config(models[kind]), names).name == kind
        assert detect_family(None, names).name == kind
    assert detect_family(None, list(read_all(models["roberta"]))).name == "roberta"
    assert detect_family(read_config(models["granite"])).name == "granite"
    # Granite's tensor names are Llama's: name-only detection cannot tell them apart
    assert detect_family(None, list(read_all(models["granite"]))).name == "llama"


def test_cross_attention_refused_for_decoder_only_family(models):
    t5 = canonicalize(read_all(models["t5"]), read_config(models["t5"]))
    dec = {k: v for k, v in t5.items() if not k.startswith("passthrough.")}
    llama_cfg = read_config(models["llama"])
    with pytest.raises(UnknownTensorError, match=r"refusing to write cross-attention into 'llama'.*cross_attn") as e:
        decanonicalize(dec, llama_cfg, get_family("llama").bind("model."), source_family="t5")
    assert all(".cross_attn" in n for n in e.value.names)
    out = decanonicalize(dec, llama_cfg, get_family("llama").bind("model."), source_family="t5", unused="ignore")
    assert "model.layers.1.self_attn.q_proj.weight" in out and not any("cross" in k for k in out)


# ----------------------------------------------------------------------------- family scales
def test_function_scales_hand_worked(models):
    g = function_scales(get_family("granite"), read_config(models["granite"]))
    assert g == pytest.approx({"embed": 12.0, "attn.o": 0.22, "mlp.down": 0.22, "attn.q": 0.0625 * np.sqrt(8),
                               "lm_head": 1 / 8.0})
    t5 = function_scales(get_family("t5"), read_config(models["t5"]))
    assert t5 == pytest.approx({"attn.q": np.sqrt(8), "lm_head": H ** -0.5})  # scale_decoder_outputs: True
    old = dict(read_config(models["t5"]), tie_word_embeddings=False)
    old.pop("scale_decoder_outputs")  # a pre-5.x T5 v1.1 config: untied, unscaled head
    assert function_scales(get_family("t5"), old) == pytest.approx({"attn.q": np.sqrt(8)})
    assert function_scales(get_family("gemma"), {"hidden_size": 16, "num_attention_heads": 2}) == \
        pytest.approx({"embed": 4.0})
    assert function_scales(get_family("llama"), read_config(models["llama"])) == {}
    with pytest.raises(mf.ConfigError, match="logits_scaling"):
        function_scales(get_family("granite"), dict(read_config(models["granite"]), logits_scaling=0))


def granite_twin(llama_dir: Path, d: Path) -> Path:
    """A Granite model computing exactly what the Llama model computes: every multiplier is
    undone in the weights (E / m_e, W_o and W_down / m_r, W_q / (m_a sqrt(hd)), head x m_l)."""
    src = T.LlamaForCausalLM.from_pretrained(str(llama_dir)).eval()
    cfg = T.GraniteConfig(num_key_value_heads=2, **COMMON, **GRANITE)
    g = T.GraniteForCausalLM(cfg).eval()
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    hd = H // 4
    for k in sd:
        if k.endswith("embed_tokens.weight"):
            sd[k] /= GRANITE["embedding_multiplier"]
        elif k.endswith(("o_proj.weight", "down_proj.weight")):
            sd[k] /= GRANITE["residual_multiplier"]
        elif k.endswith("q_proj.weight"):
            sd[k] /= GRANITE["attention_multiplier"] * np.sqrt(hd)
        elif k == "lm_head.weight":
            sd[k] *= GRANITE["logits_scaling"]
    g.load_state_dict(sd)
    return save(g, d)


def test_granite_multipliers_folded_both_ways(models, root):
    twin = granite_twin(models["llama"], root / "granite_twin")
    llama = T.AutoModelForCausalLM.from_pretrained(str(models["llama"])).eval()
    gmodel = T.AutoModelForCausalLM.from_pretrained(str(twin)).eval()
    assert type(gmodel).__name__ == "GraniteForCausalLM"
    np.testing.assert_allclose(logits(gmodel), logits(llama), atol=2e-4)  # the twin is the same function
    # Granite donor onto the Llama anchor: the multipliers are folded back, giving the anchor
    mf.align(models["llama"], twin, out=root / "granite_onto_llama")
    got, ref = read_all(root / "granite_onto_llama"), read_all(models["llama"])
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=2e-5 * max(1.0, float(np.abs(ref[k]).max())), err_msg=k)
    # Llama donor onto the Granite anchor: divided into Granite's convention
    mf.align(twin, models["llama"], out=root / "llama_onto_granite")
    got, ref = read_all(root / "llama_onto_granite"), read_all(twin)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=2e-5 * max(1.0, float(np.abs(ref[k]).max())), err_msg=k)
    back = T.AutoModelForCausalLM.from_pretrained(str(root / "llama_onto_granite")).eval()
    np.testing.assert_allclose(logits(back), logits(llama), atol=2e-4)


def test_t5_donor_cross_attention_refused_then_skipped(models, root):
    with pytest.raises(mf.ConfigError, match=r"EncDecAttention.*cross-attention.*decoder-only anchor.*cross_attention='skip'"):
        mf.procrustes_absorb(models["qwen2"], [models["t5_gated"]], out=root / "t5_refused")
    assert not (root / "t5_refused").exists()
    res = mf.procrustes_absorb(models["qwen2"], [models["t5_gated"]], out=root / "t5_skip", cross_attention="skip",
                               beta=0.6, attn_rank=3, mlp_rank=3)
    assert res.absorbed["layers.1.attn.q.weight"] == 1 and res.absorbed["layers.0.mlp.gate.weight"] == 1
    m = T.AutoModelForCausalLM.from_pretrained(str(root / "t5_skip")).eval()
    assert np.all(np.isfinite(logits(m)))
    # the T5 decoder's q carries sqrt(d_kv) (unscaled scores) into the anchor's convention
    A = ModelView(models["qwen2"], is_anchor=True)
    D = ModelView(models["t5_gated"])
    from merge_fast.crossarch.align import DonorAligner

    al = DonorAligner(A, D, cross_attention="skip")
    assert al.conv("attn.q") == pytest.approx(np.sqrt(8)) and al.conv("attn.k") == 1.0
    with pytest.raises(mf.ConfigError, match="encoder-decoder"):
        mf.align(models["t5"], models["qwen2"], out=root / "t5_anchor")
    with pytest.raises(mf.ConfigError, match=r"roberta\.encoder\.layer\.0\.attention\.output\.LayerNorm.*post"):
        mf.align(models["qwen2"], models["roberta"], out=root / "roberta_donor")
    with pytest.raises(mf.ConfigError, match="cross_attention"):
        mf.procrustes_absorb(models["qwen2"], [models["t5"]], out=root / "bad", cross_attention="maybe")


# ----------------------------------------------------------------------------- per-tensor mode
def np_procrustes(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """argmin ||A - B R|| over (semi-)orthogonal R (Schönemann), in float64."""
    U, _, Vt = np.linalg.svd(B.astype(np.float64).T @ A.astype(np.float64), full_matrices=False)
    return U @ Vt


def np_per_tensor(Wa: np.ndarray, Wd: np.ndarray, R: np.ndarray, write: bool) -> np.ndarray:
    Wd = Wd.astype(np.float64)
    if write and Wd.shape[0] != Wa.shape[0]:  # residual-stream axis: the embedding fit R
        Wd = R.T @ Wd
    if not write and Wd.shape[1] != Wa.shape[1]:
        Wd = Wd @ R
    if Wd.shape[1] != Wa.shape[1]:  # inner axis: its own semi-orthogonal Procrustes map
        Wd = Wd @ np_procrustes(Wa, Wd)
    if Wd.shape[0] != Wa.shape[0]:
        Wd = np_procrustes(Wa.T, Wd.T).T @ Wd
    r, c = Wd.shape
    if c <= r:
        return Wd @ np_procrustes(Wa, Wd)
    return np_procrustes(Wa.T, Wd.T).T @ Wd


def np_filter(delta: np.ndarray, k, tol: float) -> np.ndarray:
    U, S, Vt = np.linalg.svd(delta, full_matrices=False)
    keep = S >= tol * S[0]
    if k is not None:
        keep &= np.arange(len(S)) < k
    return (U * (S * keep)) @ Vt


@pytest.mark.parametrize("wide", [False, True])
def test_per_tensor_matches_numpy_reference(models, root, wide):
    """θ = W_a + (1-β)·filter(rot(W_d) - W_a), rot = each tensor's own Procrustes rotation on
    its smaller side (semi-orthogonal maps first where the donor's sizes differ)."""
    donor = build("llama", root / "llama_wide", seed=77, hidden_size=48, intermediate_size=80) if wide \
        else models["llama"]
    beta, rank, tol = 0.25, 3, 0.2
    out = root / f"per_tensor_{wide}"
    mf.procrustes_absorb(models["qwen2"], [donor], out=out, alignment="per_tensor", beta=beta, attn_rank=None,
                         mlp_rank=rank, attn_tol=0.0, mlp_tol=tol, oversample=40)  # oversample: exact SVD
    A, D, got = read_all(models["qwen2"]), read_all(donor), read_all(out)
    R = np_procrustes(A["model.embed_tokens.weight"], D["model.embed_tokens.weight"])  # (d_donor, d_anchor)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.up_proj.weight",
                 "model.layers.1.mlp.down_proj.weight"):
        mlp = ".mlp." in name
        delta = np_per_tensor(A[name], D[name], R, write=name.endswith(("o_proj.weight", "down_proj.weight"))) - A[name]
        ref = A[name] + (1 - beta) * np_filter(delta, rank if mlp else None, tol if mlp else 0.0)
        np.testing.assert_allclose(got[name], ref, atol=5e-5, err_msg=name)
    for name in ("model.norm.weight", "model.layers.0.input_layernorm.weight", "model.embed_tokens.weight"):
        assert np.array_equal(got[name], A[name]), name
    b = "model.layers.0.self_attn.q_proj.bias"  # the Llama donor has no q bias: the anchor's is kept
    assert b not in D and np.array_equal(got[b], A[b])


def test_per_tensor_undoes_per_tensor_rotations_residual_does_not(models, root):
    """A donor whose every matrix is the anchor's under its own random rotation (smaller side):
    per-tensor alignment lands on the anchor; one residual-stream rotation cannot."""
    from safetensors.numpy import save_file

    A = read_all(models["qwen2"])
    rng = np.random.default_rng(3)
    t = {}
    for k, v in A.items():
        if v.ndim == 2 and (".self_attn." in k or ".mlp." in k):
            r, c = v.shape
            q, rr = np.linalg.qr(rng.standard_normal((min(r, c),) * 2))
            q = q * np.sign(np.diag(rr))
            t[k] = (v @ q if c <= r else q @ v).astype(np.float32)
        else:
            t[k] = v
    d = root / "twisted"
    d.mkdir()
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text((models["qwen2"] / "config.json").read_text())
    write_tokenizer(d)
    per = mf.align(models["qwen2"], d, out=root / "twisted_per_tensor", mode="per_tensor")
    res = mf.align(models["qwen2"], d, out=root / "twisted_residual")
    assert per.method == res.method == "all_rows"
    P, R = read_all(root / "twisted_per_tensor"), read_all(root / "twisted_residual")
    mats = [k for k in A if A[k].ndim == 2 and (".self_attn." in k or ".mlp." in k)]
    for k in mats:
        np.testing.assert_allclose(P[k], A[k], atol=1e-5, err_msg=k)
    dist = np.sqrt(sum(np.sum((R[k] - A[k]) ** 2) for k in mats) / sum(np.sum(A[k] ** 2) for k in mats))
    assert dist > 0.3


def test_rank_zero_is_the_anchor_bit_for_bit(models, root):
    out = root / "rank0"
    mf.procrustes_absorb(models["qwen2"], [models["llama"], models["granite"]], out=out, beta=0.6, attn_rank=0,
                         mlp_rank=0)
    A, got = read_all(models["qwen2"]), read_all(out)
    assert sorted(got) == sorted(A)
    assert all(got[k].tobytes() == A[k].tobytes() for k in A)
    with pytest.raises(mf.ConfigError, match="attn_rank"):
        mf.procrustes_absorb(models["qwen2"], [models["llama"]], out=root / "neg", attn_rank=-1)
    with pytest.raises(mf.ConfigError, match="alignment"):
        mf.procrustes_absorb(models["qwen2"], [models["llama"]], out=root / "neg", alignment="sideways")


def test_same_arch_granite_merge_checks_multipliers(models, root):
    """Multipliers are config scalars: same-arch merges need them equal (else refused)."""
    import shutil

    other = root / "granite_other"
    shutil.copytree(models["granite"], other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(cfg, residual_multiplier=0.5)))
    yaml_text = f"merge_method: linear\nmodels:\n  - model: {models['granite']}\n    parameters: {{weight: 1.0}}\n" \
                f"  - model: {other}\n    parameters: {{weight: 1.0}}\ndtype: float32\n"
    with pytest.raises(mf.ConfigError, match=r"residual_multiplier.*0\.5.*0\.22"):
        mf.run(yaml_text, root / "granite_bad")
    (other / "config.json").write_text(json.dumps(cfg))
    mf.run(yaml_text, root / "granite_ok")
    got, ref = read_all(root / "granite_ok"), read_all(models["granite"])
    assert all(np.array_equal(got[k], ref[k]) for k in ref)  # the linear merge of a model with itself


def test_per_tensor_and_skip_from_a_config(models, root):
    cfg = f"""merge_method: procrustes_absorb
base_model: {models['qwen2']}
models:
  - model: {models['llama']}
  - model: {models['t5_gated']}
parameters: {{beta: 0.6, attn_rank: 3, mlp_rank: 3, alignment: per_tensor, cross_attention: skip}}
"""
    mf.run(cfg, root / "cfg_pt")
    mf.procrustes_absorb(models["qwen2"], [models["llama"], models["t5_gated"]], out=root / "api_pt", beta=0.6,
                         attn_rank=3, mlp_rank=3, alignment="per_tensor", cross_attention="skip")
    assert (root / "cfg_pt" / "model.safetensors").read_bytes() == (root / "api_pt" / "model.safetensors").read_bytes()
    with pytest.raises(mf.ConfigError, match="EncDecAttention"):
        mf.run(cfg.replace(", cross_attention: skip", ""), root / "cfg_refused")
