"""merge_fast.torch.SubspaceProjector: gradient hooks (project / scale_mask, one- and
two-sided), remove(), LoRA A/B (PEFT, incl. fan_in_fan_out), reprojection under AdamW,
and the <name>.U / <name>.V mask file format."""
from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent


import merge_fast.torch as mft  # noqa: E402
torch.set_num_threads(2)


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def orth(n, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0].float()


def make_masks(model, r=4):
    sd = dict(model.named_parameters())
    q = "model.layers.0.self_attn.q_proj.weight"
    o = "model.layers.1.self_attn.o_proj.weight"
    d = "model.layers.0.mlp.down_proj.weight"
    nrm = "model.layers.1.input_layernorm.weight"
    return {
        q: {"U": orth(sd[q].shape[0], r, 1)},
        o: {"U": orth(sd[o].shape[0], r, 2), "V": orth(sd[o].shape[1], r, 3)},
        d: {"U": orth(sd[d].shape[0], r, 4), "V": orth(sd[d].shape[1], 2, 5)},
        nrm: {"U": orth(sd[nrm].shape[0], 3, 6)},
    }


def batch(seed=0, B=3, L=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (B, L), generator=g)
    return {"input_ids": ids, "labels": ids}


def grads(model, b):
    model.zero_grad()
    model(**b).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def kept(G, U, V=None):
    """(I - UUᵀ) G (I - VVᵀ) in float64."""
    G = G.double().reshape(G.shape[0], -1) if G.dim() > 1 else G.double().reshape(-1, 1)
    U = U.double()
    K = G - U @ (U.T @ G)
    if V is not None:
        V = V.double()
        K = K - (K @ V) @ V.T
    return K


def flat(G):
    return G.double().reshape(G.shape[0], -1) if G.dim() > 1 else G.double().reshape(-1, 1)


def test_project_hooks():
    model = tiny_llama()
    masks = make_masks(model)
    b = batch()
    raw = grads(model, b)
    with mft.SubspaceProjector(model, masks) as proj:
        assert sorted(proj.target_names) == sorted(masks)
        got = grads(model, b)
    for n, g in raw.items():
        if n not in masks:
            assert torch.equal(got[n], g), n
            continue
        U, V = masks[n]["U"].double(), masks[n].get("V")
        G1 = flat(got[n])
        scale = flat(g).abs().max().item()
        assert (U.T @ G1).abs().max().item() < 1e-5 * max(1.0, scale), n
        if V is not None:
            assert (G1 @ V.double()).abs().max().item() < 1e-5 * max(1.0, scale), n
        # the orthogonal rest is unchanged
        assert torch.allclose(G1, kept(g, U, V), atol=1e-6 * scale + 1e-9), n
        assert (flat(g) - G1).abs().max() > 1e-4 * scale, n  # something was removed


def test_scale_mask_halves_in_subspace_component():
    model = tiny_llama()
    masks = make_masks(model)
    b = batch(1)
    raw = grads(model, b)
    proj = mft.SubspaceProjector(model, masks, mode="scale_mask", strength=0.5)
    got = grads(model, b)
    proj.remove()
    for n in masks:
        U, V = masks[n]["U"], masks[n].get("V")
        K_raw, K_got = kept(raw[n], U, V), kept(got[n], U, V)
        S_raw, S_got = flat(raw[n]) - K_raw, flat(got[n]) - K_got
        scale = flat(raw[n]).abs().max().item()
        assert torch.allclose(K_got, K_raw, atol=1e-6 * scale), n
        assert torch.allclose(S_got, 0.5 * S_raw, atol=1e-6 * scale), n
    # strength=1 scale_mask == project; strength=0 == identity
    p1 = mft.SubspaceProjector(model, masks, mode="scale_mask", strength=1.0)
    g1 = grads(model, b)
    p1.remove()
    n = "model.layers.1.self_attn.o_proj.weight"
    assert torch.allclose(flat(g1[n]), kept(raw[n], masks[n]["U"], masks[n]["V"]), atol=1e-7)
    with pytest.raises(ValueError):
        mft.SubspaceProjector(model, masks, mode="scale_mask", strength=1.5)
    with pytest.raises(ValueError):
        mft.SubspaceProjector(model, masks, mode="zero")


def test_remove_restores_raw_grads_and_errors():
    model = tiny_llama()
    masks = make_masks(model)
    b = batch(2)
    raw = grads(model, b)
    proj = mft.SubspaceProjector(model, masks)
    proj.remove()
    proj.remove()  # idempotent
    after = grads(model, b)
    for n in raw:
        assert torch.equal(after[n], raw[n]), n
    with pytest.raises(KeyError, match="nope"):
        mft.SubspaceProjector(model, {"nope.weight": {"U": orth(32, 2, 0)}})
    with pytest.warns(UserWarning, match="nope"):
        p = mft.SubspaceProjector(model, {"nope.weight": {"U": orth(32, 2, 0)}}, strict=False)
        p.remove()
    with pytest.raises(ValueError, match="shape"):
        mft.SubspaceProjector(model, {"model.layers.0.self_attn.q_proj.weight":
                                      {"U": orth(31, 2, 0)}})


def test_mask_file_roundtrip(tmp_path):
    model = tiny_llama()
    masks = make_masks(model)
    p = tmp_path / "masks.safetensors"
    mft.save_masks(masks, p)
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        assert "model.layers.1.self_attn.o_proj.weight.V" in set(f.keys())
    back = mft.load_masks(p)
    assert sorted(back) == sorted(masks)
    for n in masks:
        assert sorted(back[n]) == sorted(masks[n])
        for k in masks[n]:
            assert torch.equal(back[n][k], masks[n][k])
    # a path is accepted directly
    b = batch(3)
    raw = grads(model, b)
    with mft.SubspaceProjector(model, p):
        got = grads(model, b)
    n = "model.layers.0.self_attn.q_proj.weight"
    assert (masks[n]["U"].double().T @ flat(got[n])).abs().max() < 1e-6
    assert not torch.equal(got[n], raw[n])


def _train(model, b, opt, steps, proj=None):
    for i in range(steps):
        opt.zero_grad()
        model(**batch(10 + i)).loss.backward()
        opt.step()
        if proj is not None:
            proj.reproject_parameters()


def test_reproject_keeps_adamw_delta_out_of_subspace():
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight",
             "model.layers.1.input_layernorm.weight"]

    def run(reproject):
        model = tiny_llama()
        masks = {k: v for k, v in make_masks(model).items() if k in names}
        w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        proj = mft.SubspaceProjector(model, masks)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        _train(model, None, opt, 6, proj if reproject else None)
        proj.remove()
        out = {}
        for n in names:
            D = flat(model.get_parameter(n).detach() - w0[n])
            U, V = masks[n]["U"].double(), masks[n].get("V")
            left = (U.T @ D).abs().max().item()
            right = 0.0 if V is None else (D @ V.double()).abs().max().item()
            out[n] = (left, right, D.abs().max().item())
        return out

    without = run(False)
    with_ = run(True)
    for n in names:
        l0, r0, s0 = without[n]
        l1, r1, s1 = with_[n]
        assert max(l0, r0) > 1e-3, (n, without[n])  # Adam leaks into the subspace without it
        assert l1 < 1e-5 and r1 < 1e-5, (n, with_[n])
        assert s1 > 1e-3  # but the weights did move


def _peft_model(base, targets, **kw):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, **kw)
    return get_peft_model(base, cfg)


def test_lora_b_left_a_right():
    pytest.importorskip("peft")
    base = tiny_llama()
    qn, vn = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"
    W = dict(base.named_parameters())
    masks = {qn: {"U": orth(W[qn].shape[0], 4, 7), "V": orth(W[qn].shape[1], 4, 8)},
             vn: {"U": orth(W[vn].shape[0], 3, 9)}}
    model = _peft_model(base, ["q_proj", "v_proj"])
    with torch.no_grad():  # B = 0 at init would make A's gradient zero
        for m in model.modules():
            if hasattr(m, "lora_B") and isinstance(m.lora_B, torch.nn.ModuleDict):
                m.lora_B["default"].weight.normal_(0, 0.1)
    b = batch(4)
    named = dict(model.named_parameters())
    kB = [k for k in named if "layers.0.self_attn.q_proj.lora_B" in k][0]
    kA = [k for k in named if "layers.0.self_attn.q_proj.lora_A" in k][0]
    kvA = [k for k in named if "layers.1.self_attn.v_proj.lora_A" in k][0]
    raw = grads(model, b)
    with mft.SubspaceProjector(model, masks) as proj:
        assert len(proj.targets) == 3  # q: B and A, v: B only (no V)
        got = grads(model, b)
    U, V = masks[qn]["U"].double(), masks[qn]["V"].double()
    assert (U.T @ got[kB].double()).abs().max() < 1e-6
    assert torch.allclose(got[kB].double(), kept(raw[kB], U), atol=1e-7)
    assert (got[kA].double() @ V).abs().max() < 1e-6
    GA = raw[kA].double()
    assert torch.allclose(got[kA].double(), GA - (GA @ V) @ V.T, atol=1e-7)
    assert torch.equal(got[kvA], raw[kvA])  # no V for v_proj: A untouched

    # SGD from the PEFT init (B = 0): ΔW = s·B·A stays out of span(U) (left) and, with
    # lora_project_init, out of span(V) (right) too.
    base2 = tiny_llama()
    model2 = _peft_model(base2, ["q_proj"])
    proj = mft.SubspaceProjector(model2, {qn: masks[qn]}, lora_project_init=True)
    opt = torch.optim.SGD([p for p in model2.parameters() if p.requires_grad], lr=0.5)
    _train(model2, None, opt, 4)
    proj.remove()
    q2 = model2.base_model.model.model.layers[0].self_attn.q_proj
    dW = (q2.lora_B["default"].weight @ q2.lora_A["default"].weight).double() * q2.scaling["default"]
    assert dW.abs().max() > 1e-4
    assert (U.T @ dW).abs().max() < 1e-6 * dW.abs().max() + 1e-9
    assert (dW @ V).abs().max() < 1e-6 * dW.abs().max() + 1e-9


def test_lora_fan_in_fan_out_gpt2():
    pytest.importorskip("peft")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64,
                                      n_positions=32, bos_token_id=1, eos_token_id=1))
    name = "transformer.h.0.attn.c_attn.weight"  # Conv1D: stored (in=32, out=96)
    Wst = base.get_parameter(name)
    U, V = orth(Wst.shape[0], 3, 11), orth(Wst.shape[1], 3, 12)
    model = _peft_model(base, ["c_attn"], fan_in_fan_out=True)
    proj = mft.SubspaceProjector(model, {name: {"U": U, "V": V}}, lora_project_init=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _train(model, None, opt, 4, proj)
    proj.remove()
    m = model.base_model.model.transformer.h[0].attn.c_attn
    dW_stored = (m.lora_B["default"].weight @ m.lora_A["default"].weight).T.double()
    assert dW_stored.shape == Wst.shape
    s = dW_stored.abs().max()
    assert s > 1e-4
    assert (U.double().T @ dW_stored).abs().max() < 1e-5 * s
    assert (dW_stored @ V.double()).abs().max() < 1e-5 * s


def test_tied_weights_single_hook():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, tie_word_embeddings=True))
    U = orth(64, 2, 0)
    with pytest.raises(ValueError, match="tied"):
        mft.SubspaceProjector(model, {"lm_head.weight": {"U": U},
                                      "model.embed_tokens.weight": {"U": U}})
    b = batch(5)
    raw = grads(model, b)["model.embed_tokens.weight"]  # the failed constructor left no hook
    assert (U.double().T @ raw.double()).abs().max() > 1e-4
    with mft.SubspaceProjector(model, {"lm_head.weight": {"U": U}}):
        g = grads(model, b)["model.embed_tokens.weight"]
    assert (U.double().T @ g.double()).abs().max() < 1e-6
