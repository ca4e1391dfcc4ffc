"""Cross-architecture alignment and the procrustes_absorb merge, on tiny random-init
transformers models (no hub)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import merge_fast as mf  # noqa: E402
from merge_fast.crossarch import depth_map, procrustes_absorb_params  # noqa: E402

VOCAB = 96
HIDDEN = 32


def write_tokenizer(d: Path, tokens: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))


def base_tokens(n=VOCAB):
    return [f"t{i}" for i in range(n)]


def config_for(arch: str, hidden=HIDDEN, layers=2, vocab=VOCAB, inter=64, heads=4):
    T = transformers
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  max_position_embeddings=64, tie_word_embeddings=False, intermediate_size=inter)
    if arch == "qwen2":
        return T.Qwen2Config(num_key_value_heads=2, **common)
    if arch == "llama":
        return T.LlamaConfig(num_key_value_heads=2, **common)
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(rotary_pct=0.5, **common)
    if arch == "phi":
        return T.PhiConfig(num_key_value_heads=4, **common)
    raise ValueError(arch)


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))  # gains matter for folding
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def save(model, d: Path, tokens) -> Path:
    model.save_pretrained(str(d), max_shard_size="100GB")
    write_tokenizer(d, tokens)
    return d


def build(arch, d: Path, seed=0, tokens=None, **kw) -> Path:
    torch.manual_seed(seed)
    cfg = config_for(arch, **kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    randomize(model, seed + 1)
    return save(model, d, tokens or base_tokens(cfg.vocab_size))


def load(d: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()


def logits(model, ids=None):
    ids = torch.tensor([[5, 17, 3, 42, 8, 77, 1, 30]]) if ids is None else ids
    with torch.no_grad():
        return model(ids).logits[0].numpy()


def read_all(d: Path) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def rotated_copy(model, Q: np.ndarray, perm: np.ndarray | None = None):
    """Fold every RMSNorm gain into the following linears, then rotate the residual stream by Q
    (h -> h Q): function-preserving. With ``perm``, vocabulary rows are permuted too."""
    import copy

    m = copy.deepcopy(model)
    q = torch.tensor(Q, dtype=torch.float64)
    with torch.no_grad():
        def rot_in(lin, g):  # W -> W diag(g) Q
            lin.weight.copy_((lin.weight.double() * g.double()[None, :] @ q).float())

        def rot_out(lin):  # W -> Qᵀ W, b -> Qᵀ b
            lin.weight.copy_((q.T @ lin.weight.double()).float())
            if lin.bias is not None:
                lin.bias.copy_((q.T @ lin.bias.double()).float())

        inner = m.model
        inner.embed_tokens.weight.copy_((inner.embed_tokens.weight.double() @ q).float())
        for layer in inner.layers:
            g = layer.input_layernorm.weight.detach().clone()
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                rot_in(lin, g)
            layer.input_layernorm.weight.fill_(1.0)
            rot_out(layer.self_attn.o_proj)
            g = layer.post_attention_layernorm.weight.detach().clone()
            rot_in(layer.mlp.gate_proj, g)
            rot_in(layer.mlp.up_proj, g)
            layer.post_attention_layernorm.weight.fill_(1.0)
            rot_out(layer.mlp.down_proj)
        rot_in(m.lm_head, inner.norm.weight.detach().clone())
        inner.norm.weight.fill_(1.0)
        if perm is not None:
            inner.embed_tokens.weight.copy_(inner.embed_tokens.weight[perm])
            m.lm_head.weight.copy_(m.lm_head.weight[perm])
    return m


def random_orthogonal(n, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("crossarch")


@pytest.fixture(scope="module")
def anchor(root):
    return build("qwen2", root / "anchor", seed=0)


@pytest.fixture(scope="module")
def rotated(root, anchor):
    """Donor = anchor with gains folded and the residual stream rotated by Q."""
    Q = random_orthogonal(HIDDEN, 123)
    m = load(anchor)
    donor = rotated_copy(m, Q)
    d = save(donor, root / "rotated", base_tokens())
    return d, Q, m


def test_rotated_donor_has_same_function(rotated):
    d, Q, anchor_model = rotated
    np.testing.assert_allclose(logits(load(d)), logits(anchor_model), atol=2e-4)


def test_align_recovers_rotation(rotated, anchor, root):
    d, Q, anchor_model = rotated
    res = mf.align(anchor, d, out=root / "aligned")
    assert res.method == "all_rows"
    # E_d = E_a Q, so R = argmin ||E_a - E_d R|| = Qᵀ
    np.testing.assert_allclose(res.rotation, Q.T, atol=1e-4)
    assert res.residual < 1e-5
    got, ref = read_all(root / "aligned"), read_all(anchor)
    assert got.keys() == ref.keys()
    for k in ref:
        scale = max(1.0, float(np.abs(ref[k]).max()))
        np.testing.assert_allclose(got[k], ref[k], atol=2e-5 * scale, err_msg=k)
    cfg = json.loads((root / "aligned" / "config.json").read_text())
    assert cfg["model_type"] == "qwen2"
    np.testing.assert_allclose(logits(load(root / "aligned")), logits(anchor_model), atol=2e-4)


def test_align_matches_vocab_by_token(rotated, anchor, root):
    """Donor with a permuted tokenizer: rows are matched by token string."""
    d, Q, anchor_model = rotated
    perm = np.random.default_rng(5).permutation(VOCAB)  # donor id j holds anchor token perm[j]
    donor = rotated_copy(anchor_model, Q, perm=torch.tensor(perm))
    tokens = [f"t{perm[j]}" for j in range(VOCAB)]
    dd = save(donor, root / "rotated_perm", tokens)
    res = mf.align(anchor, dd, out=root / "aligned_perm")
    assert res.method == "shared_tokens" and res.matched_rows == VOCAB
    np.testing.assert_allclose(res.rotation, Q.T, atol=1e-4)
    got, ref = read_all(root / "aligned_perm"), read_all(anchor)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=5e-5, err_msg=k)


def test_estimate_rotations_match_one_by_one(rotated, anchor, donors):
    """Several donors' fits at once (cross products one by one, polar factors together, as
    procrustes_absorb takes them) give each donor the one-donor fit's R bit for bit."""
    from merge_fast.crossarch._model import ModelView
    from merge_fast.crossarch.align import estimate_rotation, estimate_rotations

    A = ModelView(anchor, None, is_anchor=True)
    views = [ModelView(p, None) for p in (rotated[0], donors["llama"])]
    many = estimate_rotations(A, views)
    assert len(many) == 2
    for v, al in zip(views, many):
        one = estimate_rotation(A, v)
        assert al.method == one.method and np.array_equal(al.rotation, one.rotation)
        assert np.isnan(al.residual) and np.isfinite(one.residual)


def test_align_estimate_only_and_depth_map(rotated, anchor):
    d, Q, _ = rotated
    res = mf.align(anchor, d)
    assert res.path is None and res.rotation.shape == (HIDDEN, HIDDEN)
    assert depth_map(4, 2) == [0, 0, 1, 1]
    assert depth_map(3, 5) == [0, 2, 4]
    assert depth_map(2, 3) == [0, 2]
    assert depth_map(1, 7) == [0]


@pytest.fixture(scope="module")
def donors(root):
    return {
        "llama": build("llama", root / "llama", seed=10, layers=3, inter=48),
        "gpt_neox": build("gpt_neox", root / "neox", seed=20),
        "phi": build("phi", root / "phi", seed=30),
        # wider residual stream, different heads/intermediate and a larger vocabulary
        "llama48": build("llama", root / "llama48", seed=40, hidden=48, inter=80, vocab=120,
                         tokens=[f"t{i}" for i in range(120)][::-1]),
    }


def test_cross_family_merge_loads_and_is_finite(anchor, donors, root):
    out = root / "absorbed"
    res = mf.procrustes_absorb(anchor, list(donors.values()), beta=0.5, attn_rank=4, mlp_rank=8,
                               attn_tol=0.05, mlp_tol=0.01, out=out)
    assert res.alignment_methods == ["all_rows", "all_rows", "all_rows", "shared_tokens"]
    assert res.rotations[3].shape == (48, HIDDEN)
    np.testing.assert_allclose(res.rotations[3].T @ res.rotations[3], np.eye(HIDDEN), atol=1e-5)
    assert res.layer_maps[0] == [0, 2]
    # plain-MLP donors supply no gate delta
    assert "layers.0.mlp.gate.weight" in res.missing[str(donors["gpt_neox"])]
    assert res.absorbed["layers.0.mlp.gate.weight"] == 2
    assert res.absorbed["layers.1.attn.q.weight"] == 4
    ref, got = read_all(anchor), read_all(out)
    assert got.keys() == ref.keys()
    changed = [k for k in ref if not np.array_equal(ref[k], got[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.layers.1.mlp.down_proj.weight" in changed
    assert np.array_equal(got["model.norm.weight"], ref["model.norm.weight"])
    assert np.array_equal(got["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])
    model = load(out)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert np.all(np.isfinite(logits(model)))


def test_beta_one_returns_anchor_byte_for_byte(anchor, donors, root):
    out = root / "beta1"
    mf.procrustes_absorb(anchor, [donors["llama"], donors["gpt_neox"]], beta=1.0, out=out)
    for f in anchor.iterdir():
        if f.suffix == ".safetensors" or f.name in ("config.json", "tokenizer.json"):
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_absorb_matches_numpy_reference(anchor, donors, root):
    """One same-shape donor, exact SVD path: θ = W_a + (1-β)·trunc(aligned - W_a)."""
    aligned = root / "llama_aligned"
    mf.align(anchor, donors["llama"], out=aligned, missing="anchor")
    out = root / "absorbed_ref"
    beta, rank, tol = 0.25, 12, 0.2
    mf.procrustes_absorb(anchor, [donors["llama"]], beta=beta, attn_rank=rank, mlp_rank=None, attn_tol=tol,
                         mlp_tol=tol, out=out)
    A, D, got = read_all(anchor), read_all(aligned), read_all(out)

    def ref(name, k):
        delta = D[name].astype(np.float64) - A[name]
        U, S, Vt = np.linalg.svd(delta, full_matrices=False)
        keep = (S >= tol * S[0]) & (np.arange(len(S)) < k)
        return A[name] + (1 - beta) * (U * (S * keep)) @ Vt

    for name, k in (("model.layers.1.self_attn.q_proj.weight", rank), ("model.layers.0.mlp.up_proj.weight", 10**9)):
        np.testing.assert_allclose(got[name], ref(name, k), atol=1e-5, err_msg=name)


def test_params_entry_point(anchor, donors, root):
    out = root / "from_params"
    res = procrustes_absorb_params({"anchor": str(anchor), "donors": [str(donors["phi"])], "out": str(out),
                                    "beta": 0.7, "attn_rank": 2, "mlp_rank": 2})
    assert res.path == out.absolute() and (out / "model.safetensors").exists()
    with pytest.raises(mf.ConfigError, match="bogus"):
        procrustes_absorb_params({"anchor": str(anchor), "donors": [str(donors["phi"])], "out": str(out),
                                  "bogus": 1})
    with pytest.raises(mf.ConfigError, match="beta"):
        mf.procrustes_absorb(anchor, [donors["phi"]], beta=1.5, out=root / "bad")


def test_strict_missing_role_names_tensor(anchor, donors, root):
    with pytest.raises(mf.TensorMismatch, match=r"gate_proj|mlp\.gate"):
        mf.procrustes_absorb(anchor, [donors["gpt_neox"]], strict=True, out=root / "strict")
    with pytest.raises(mf.TensorMismatch, match=r"gate_proj|mlp\.gate"):
        mf.align(anchor, donors["phi"], out=root / "strict_align")
    assert not (root / "strict").exists() and not (root / "strict_align").exists()


def test_donor_missing_required_tensor(anchor, donors, root):
    from safetensors.numpy import load_file, save_file

    d = root / "llama_broken"
    shutil.copytree(donors["llama"], d)
    t = load_file(str(d / "model.safetensors"))
    del t["model.layers.1.self_attn.q_proj.weight"]
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(mf.TensorMismatch, match=r"model\.layers\.1\.self_attn\.q_proj\.weight"):
        mf.procrustes_absorb(anchor, [d], out=root / "broken_out")


def test_unknown_family_names_tensor(anchor, root):
    from safetensors.numpy import save_file

    d = root / "mystery"
    d.mkdir()
    rng = np.random.default_rng(0)
    save_file({"blocks.0.mixer.w": rng.standard_normal((8, 8)).astype(np.float32),
               "tok.table": rng.standard_normal((VOCAB, 8)).astype(np.float32)}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "mystery_net"}))
    with pytest.raises(mf.ConfigError, match=r"blocks\.0\.mixer\.w|tok\.table"):
        mf.procrustes_absorb(anchor, [d], out=root / "mystery_out")


def test_custom_family_through_mapping_file(rotated, anchor, root):
    """A donor in a custom layout (examples/qed_fused.yaml: fused wqkv and w13) is rejected with a
    ConfigError naming a tensor, then aligned once its mapping file is given."""
    from safetensors.numpy import save_file

    from merge_fast.arch import EXAMPLES_DIR

    d, Q, _ = rotated
    src = read_all(d)
    cfg = json.loads((anchor / "config.json").read_text())
    t = {"qed.tok_emb.weight": src["model.embed_tokens.weight"], "qed.norm_f.weight": src["model.norm.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        p, q = f"model.layers.{i}.", f"qed.blocks.{i}."
        t[q + "norm1.weight"] = src[p + "input_layernorm.weight"]
        t[q + "attn.wqkv.weight"] = np.concatenate([src[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        t[q + "attn.wo.weight"] = src[p + "self_attn.o_proj.weight"]
        t[q + "norm2.weight"] = src[p + "post_attention_layernorm.weight"]
        t[q + "ffn.w13.weight"] = np.concatenate([src[p + "mlp.gate_proj.weight"], src[p + "mlp.up_proj.weight"]])
        t[q + "ffn.w2.weight"] = src[p + "mlp.down_proj.weight"]
    qd = root / "qed_donor"
    qd.mkdir()
    save_file(t, str(qd / "model.safetensors"))
    (qd / "config.json").write_text(json.dumps({
        "model_type": "qed_fused", "d_model": HIDDEN, "n_layers": cfg["num_hidden_layers"], "n_heads": 4, "n_kv_heads": 2,
        "d_ff": cfg["intermediate_size"]}))
    with pytest.raises(mf.ConfigError, match=r"qed\."):
        mf.align(anchor, qd, out=root / "qed_out")
    qed = EXAMPLES_DIR / "qed_fused.yaml"
    with pytest.raises(mf.TensorMismatch, match=r"k_proj\.bias"):  # qed has no attention biases
        mf.align(anchor, qd, out=root / "qed_out", donor_family=qed)
    res = mf.align(anchor, qd, out=root / "qed_out", donor_family=qed, missing="anchor")
    assert "layers.0.attn.q.bias" in res.filled_from_anchor
    np.testing.assert_allclose(res.rotation, Q.T, atol=1e-4)
    got, ref = read_all(root / "qed_out"), read_all(anchor)
    for k in ref:
        if k != "lm_head.weight":  # qed ties its head to the embedding
            np.testing.assert_allclose(got[k], ref[k], atol=5e-5, err_msg=k)


def test_procrustes_absorb_from_a_config(anchor, donors, root):
    """merge_method: procrustes_absorb in YAML gives the Python API's bytes."""
    cfg = f"""
merge_method: procrustes_absorb
base_model: {anchor}
models:
  - model: {donors["llama"]}
  - model: {donors["phi"]}
    parameters: {{weight: 0.5}}
parameters: {{beta: 0.6, attn_rank: 2, mlp_rank: 3}}
"""
    mf.run(cfg, root / "cfg_absorb")
    mf.procrustes_absorb(anchor, [donors["llama"], donors["phi"]], weights=[1.0, 0.5], beta=0.6, attn_rank=2,
                         mlp_rank=3, out=root / "api_absorb")
    files = sorted(p.name for p in (root / "api_absorb").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (root / "cfg_absorb").glob("*.safetensors"))
    for f in files:
        assert (root / "cfg_absorb" / f).read_bytes() == (root / "api_absorb" / f).read_bytes()
    with pytest.raises(mf.ConfigError, match="line 8.*betta"):
        mf.run(cfg.replace("beta:", "betta:"), root / "cfg_bad")
    assert not (root / "cfg_bad").exists()


def test_align_through_engine_matches_formula(anchor, donors, root, monkeypatch):
    """align's output is planned as affine/row-gather sources the core materialises (same
    bytes for 1 and 2 threads), and equals the formulas of the module docstring in float64:
    reading linears W·diag(g_d)·R·diag(1/g_a), writing ones Rᵀ·W, embed/head rows by token."""
    import merge_fast.plan as plan_mod

    texts = []
    real = plan_mod.plan_text
    monkeypatch.setattr(plan_mod, "plan_text", lambda *a, **k: texts.append(real(*a, **k)) or texts[-1])
    for donor, layers in ((donors["llama"], (0, 2)), (donors["llama48"], (0, 1))):
        outs = []
        for threads in (1, 2):
            out = root / f"engine_{donor.name}_{threads}"
            res = mf.align(anchor, donor, out=out, missing="anchor", threads=threads, max_shard_size="20KB")
            outs.append(out)
        files = sorted(p.name for p in outs[0].iterdir())
        assert len([f for f in files if f.endswith(".safetensors")]) > 1
        assert files == sorted(p.name for p in outs[1].iterdir())
        for f in files:
            assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
        A, D, got = read_all(anchor), read_all(donor), read_all(outs[0])
        R = res.rotation.astype(np.float64)
        ga = {k: v.astype(np.float64) for k, v in A.items() if "norm" in k}
        gd = {k: v.astype(np.float64) for k, v in D.items() if "norm" in k}
        # embedding / head rows by token string (llama48's vocabulary is reversed and larger)
        at = json.loads((anchor / "tokenizer.json").read_text())["model"]["vocab"]
        dt = json.loads((donor / "tokenizer.json").read_text())["model"]["vocab"]
        rows = [dt[t] for t, _ in sorted(at.items(), key=lambda x: x[1])]
        emb = D["model.embed_tokens.weight"].astype(np.float64)[rows] @ R
        np.testing.assert_allclose(got["model.embed_tokens.weight"], emb, atol=1e-5)
        head = (D["lm_head.weight"].astype(np.float64)[rows] * gd["model.norm.weight"]) @ R / ga["model.norm.weight"]
        np.testing.assert_allclose(got["lm_head.weight"], head, atol=1e-5)
        if donor == donors["llama"]:  # same widths: every linear is an affine source
            j = layers[1]  # anchor layer 1 <- donor layer 2 (depth map)
            q = (D[f"model.layers.{j}.self_attn.q_proj.weight"].astype(np.float64)
                 * gd[f"model.layers.{j}.input_layernorm.weight"]) @ R / ga["model.layers.1.input_layernorm.weight"]
            np.testing.assert_allclose(got["model.layers.1.self_attn.q_proj.weight"], q, atol=1e-5)
            o = R.T @ D[f"model.layers.{j}.self_attn.o_proj.weight"].astype(np.float64)
            np.testing.assert_allclose(got["model.layers.1.self_attn.o_proj.weight"], o, atol=1e-5)
            assert np.array_equal(got["model.layers.1.input_layernorm.weight"],
                                  A["model.layers.1.input_layernorm.weight"])
    # the large tensors were not computed in Python: they are affine sources of the plan
    plan = json.loads(texts[0])
    # a tensor without "inputs" takes the plan's default sources
    srcs = {t["name"]: t.get("inputs", plan.get("default_inputs"))[0] for t in plan["tensors"]}
    assert srcs["model.layers.1.self_attn.q_proj.weight"]["kind"] == "affine"
    assert srcs["model.layers.1.self_attn.o_proj.weight"]["kind"] == "affine"
    assert srcs["model.embed_tokens.weight"]["kind"] == "rows"
    assert srcs["model.norm.weight"] == {"kind": "tensor", "input": 0, "tensor": "model.norm.weight"}


def test_absorb_through_engine_is_deterministic(anchor, donors, root, monkeypatch):
    """procrustes_absorb plans the absorb_filtered kernel over the anchor's tensor and the
    donors' aligned (affine) sources; 1 and 2 threads write the same bytes."""
    import merge_fast.plan as plan_mod

    texts = []
    real = plan_mod.plan_text
    monkeypatch.setattr(plan_mod, "plan_text", lambda *a, **k: texts.append(real(*a, **k)) or texts[-1])
    outs = []
    for threads in (1, 2):
        out = root / f"absorb_threads_{threads}"
        mf.procrustes_absorb(anchor, [donors["llama"], donors["llama48"]], beta=0.3, attn_rank=3, mlp_rank=5,
                             out=out, threads=threads, max_shard_size="30KB")
        outs.append(out)
    names = sorted(p.name for p in outs[0].iterdir())
    assert len([n for n in names if n.endswith(".safetensors")]) > 1
    for f in names:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
    t = {x["name"]: x for x in json.loads(texts[0])["tensors"]}["model.layers.1.self_attn.q_proj.weight"]
    assert t["method"] == "absorb_filtered" and t["base"]["kind"] == "tensor"
    # same-width donor: made by the core from its file; the wider one: aligned with numpy (width projection)
    assert [s["kind"] for s in t["inputs"]] == ["affine", "tensor"]
