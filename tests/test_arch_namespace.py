"""Tests for merge_fast.arch: the canonical tensor-name namespace across model families.

Run:  python -m pytest tests/test_arch_namespace.py -q
Builds tiny random-init transformers models locally (no hub), one per family.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import merge_fast.arch as arch  # noqa: E402
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ml_dtypes = pytest.importorskip("ml_dtypes")
import arch_models as am  # noqa: E402

from merge_fast.arch import (  # noqa: E402
    ArchError, CanonicalKey, CanonicalKeyError, FusedTensorError, MappingFileError, MissingTensorError,
    UnknownFamilyError, UnknownTensorError, apply_output_recipe, read_config, read_shapes, apply_recipe, canonicalize, check_complete,
    decanonicalize, detect_family, dump_mapping, get_family, load_mapping, missing_keys, parse_mapping,
    plan_canonical, plan_decanonical,
)

QED_YAML = os.path.join(os.path.dirname(arch.__file__), "examples", "qed_fused.yaml")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict = {}
    root = tmp_path_factory.mktemp("arch_models")

    def get(family: str, dtype: str = "float32"):
        if (family, dtype) not in cache:
            cache[family, dtype] = am.build(family, str(root / f"{family}_{dtype}"), dtype=dtype)
        return cache[family, dtype]

    return get


@pytest.fixture
def qed_family():
    fam = load_mapping(QED_YAML, register=True, replace=True)
    yield fam
    arch.unregister_family("qed_fused")


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def assert_round_trip(tensors, config, family=None):
    canon = canonicalize(tensors, config, family)
    back = decanonicalize(canon, config)
    assert sorted(back) == sorted(tensors)
    for k in tensors:
        assert same_bits(back[k], tensors[k]), k
    return canon


# ----------------------------------------------------------------------------- detection
@pytest.mark.parametrize("family", am.FAMILIES)
def test_detect_from_config(built, family):
    b = built(family)
    assert detect_family(b.config).name == family
    assert detect_family({"architectures": b.config["architectures"]}).name == family
    fam = detect_family(b.config, list(b.tensors))
    assert fam.name == family
    assert all(fam.match(n) for n in b.tensors)  # bound to the right prefix


@pytest.mark.parametrize("family", am.FAMILIES)
def test_detect_from_names_only(built, family):
    b = built(family)
    assert detect_family(None, list(b.tensors)).name == am.NAME_ONLY_FAMILY.get(family, family)


def test_detect_prefixless_base_model(built):
    # LlamaModel / GPT2Model checkpoints have no "model." / "transformer." prefix
    for family, prefix in (("llama", "model."), ("gpt2", "transformer."), ("gpt_neox", "gpt_neox.")):
        b = built(family)
        bare = {k[len(prefix):]: v for k, v in b.tensors.items() if k.startswith(prefix)}
        fam = detect_family(b.config, list(bare))
        assert fam.prefix == ""
        canon = assert_round_trip(bare, b.config)
        assert "layers.1.attn.q.weight" in canon


def test_detect_errors(built):
    with pytest.raises(UnknownFamilyError, match="mapping file"):
        detect_family({"model_type": "mystery"}, ["enc.block.0.w.weight"])
    with pytest.raises(UnknownFamilyError):
        detect_family(None, None)
    # config and tensor names disagree
    with pytest.raises(UnknownFamilyError, match="look like 'gpt2'"):
        detect_family({"model_type": "llama"}, list(built("gpt2").tensors))
    assert issubclass(UnknownFamilyError, ValueError) and issubclass(UnknownFamilyError, ArchError)
    with pytest.raises(UnknownFamilyError):
        get_family("nope")


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("family", am.FAMILIES)
def test_round_trip_bit_exact(built, family):
    b = built(family)
    canon = assert_round_trip(b.tensors, b.config)
    assert canon.family.name == family
    for k in canon:  # every key is a valid canonical key
        assert str(CanonicalKey.parse(k)) == k


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt_neox", "gpt2", "gemma3_text"])
def test_round_trip_bfloat16(built, family):
    b = built(family, "bfloat16")
    assert any(v.dtype == ml_dtypes.bfloat16 for v in b.tensors.values())
    assert_round_trip(b.tensors, b.config)


def test_round_trip_bert_mlm_head(tmp_path):
    import transformers as T

    cfg = T.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=96, max_position_embeddings=64)
    T.BertForPreTraining(cfg).save_pretrained(tmp_path)
    tensors = am.load_tensors(str(tmp_path / "model.safetensors"))
    config = json.loads((tmp_path / "config.json").read_text())
    canon = assert_round_trip(tensors, config)
    assert canon.family.prefix == "bert."
    assert {"mlm.dense.weight", "mlm.norm.bias", "lm_head.bias", "nsp_head.weight", "pooler.weight"} <= set(canon)


# ----------------------------------------------------------------------------- roles
@pytest.mark.parametrize("family", am.FAMILIES)
def test_roles_complete_and_shapes(built, family):
    b = built(family)
    canon = canonicalize(b.tensors, b.config)
    fam = canon.family
    d = fam.resolve_dims(b.config)
    H, KV, hd, hidden, L = d["num_heads"], d["num_kv_heads"], d["head_dim"], d["hidden_size"], d["num_layers"]
    inter = d["intermediate_size"]
    assert L == 2
    assert canon["embed.weight"].shape == (b.config["vocab_size"], canon["embed.weight"].shape[1])
    mlp = ["up", "down"] + (["gate"] if family in am.GATED else [])
    for i in range(L):
        p = f"layers.{i}."
        assert canon[p + "attn.q.weight"].shape == (H * hd, hidden)
        assert canon[p + "attn.k.weight"].shape == (KV * hd, hidden)
        assert canon[p + "attn.v.weight"].shape == (KV * hd, hidden)
        assert canon[p + "attn.o.weight"].shape == (hidden, H * hd)
        assert canon[p + "attn_norm.weight"].shape == (hidden,)
        for r in mlp:
            assert p + f"mlp.{r}.weight" in canon
        assert canon[p + "mlp.up.weight"].shape == (inter, hidden)
        assert canon[p + "mlp.down.weight"].shape == (hidden, inter)
        if family != "phi":  # phi: one shared norm for the parallel attention+MLP block
            assert canon[p + "mlp_norm.weight"].shape == (hidden,)
        if family not in am.GATED:
            assert p + "mlp.gate.weight" not in canon
        if family in ("qwen3", "gemma3_text", "phi"):
            assert canon[p + "attn.q_norm.weight"].shape == (hd,)
        if family in ("gemma2", "gemma3_text"):
            assert p + "attn_post_norm.weight" in canon and p + "mlp_post_norm.weight" in canon
    assert missing_keys(canon, b.config, fam) == []
    check_complete(canon, b.config)
    if family in ("gpt2", "opt", "bert"):
        assert "pos_embed.weight" in canon
    if family == "phi":
        assert "lm_head.bias" in canon
    if family == "bert":
        assert {"type_embed.weight", "embed_norm.weight", "pooler.weight"} <= set(canon)


def test_missing_required_key_reported(built):
    b = built("llama")
    canon = canonicalize(b.tensors, b.config)
    del canon["layers.1.mlp.down.weight"]
    with pytest.raises(MissingTensorError, match="layers.1.mlp.down.weight"):
        check_complete(canon, b.config)


# ----------------------------------------------------------------------------- semantics
def _linear_modules(model):
    import transformers

    conv1d = transformers.pytorch_utils.Conv1D
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, conv1d))}


@pytest.mark.parametrize("family", am.FAMILIES)
def test_unfused_linear_orientation_matches_forward(built, family):
    """For every 1:1 (unfused) linear weight, F.linear(x, canonical W, b) == module(x) in a
    forward hook: proves the [out, in] orientation (GPT-2 Conv1D transposes included)."""
    b = built(family)
    fam = detect_family(b.config, list(b.tensors))
    canon = canonicalize(b.tensors, b.config)
    mods = _linear_modules(b.model)
    seen: dict = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0].detach(), o.detach())))
             for n, m in mods.items()]
    ids = torch.randint(0, 90, (2, 7))
    with torch.no_grad():
        b.model(input_ids=ids)
    for h in hooks:
        h.remove()
    checked = 0
    for n, (x, y) in seen.items():
        keys = fam.to_canonical(n + ".weight")
        if keys is None or len(keys) != 1 or str(keys[0]) not in canon:
            continue  # fused (checked below) or tied head not stored
        w = torch.from_numpy(canon[str(keys[0])])
        bias_key = str(keys[0]).rsplit(".", 1)[0] + ".bias"
        bias = torch.from_numpy(canon[bias_key]) if bias_key in canon else None
        torch.testing.assert_close(torch.nn.functional.linear(x, w, bias), y, rtol=1e-5, atol=1e-5)
        checked += 1
    assert checked >= 4


def _proj(x, canon, key, heads):
    w = torch.from_numpy(canon[key + ".weight"])
    bk = key + ".bias"
    y = torch.nn.functional.linear(x, w, torch.from_numpy(canon[bk]) if bk in canon else None)
    bsz, seq, _ = y.shape
    return y.view(bsz, seq, heads, -1).transpose(1, 2)


@pytest.mark.parametrize("family", ["phi3", "gpt_neox", "gpt2"])
def test_fused_qkv_split_matches_model_projections(built, family):
    """The split q/k/v equal the model's own q/k/v (captured inside its attention code,
    before RoPE) for the fused families; a naive concat split of GPT-NeoX must not."""
    b = built(family)
    canon = canonicalize(b.tensors, b.config)
    d = canon.family.resolve_dims(b.config)
    fused_name = {"phi3": "qkv_proj", "gpt_neox": "query_key_value", "gpt2": "c_attn"}[family]
    inputs: list = []
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
             for n, m in b.model.named_modules() if n.endswith(fused_name)]
    ids = torch.randint(0, 90, (2, 6))
    with am.AttentionCapture(b.model) as cap, torch.no_grad():
        b.model(input_ids=ids)
    for h in hooks:
        h.remove()
    assert len(inputs) == len(cap.calls) == d["num_layers"]
    for i, x in enumerate(inputs):
        q = _proj(x, canon, f"layers.{i}.attn.q", d["num_heads"])
        k = _proj(x, canon, f"layers.{i}.attn.k", d["num_kv_heads"])
        v = _proj(x, canon, f"layers.{i}.attn.v", d["num_kv_heads"])
        mq, mk = cap.pre_rope[i] if cap.pre_rope else cap.calls[i][:2]
        mv = cap.calls[i][2]
        torch.testing.assert_close(q, mq, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k, mk, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, mv, rtol=1e-5, atol=1e-5)
        if family == "gpt_neox":  # negative control: the per-head interleave matters
            fused = torch.from_numpy(b.tensors[f"gpt_neox.layers.{i}.attention.query_key_value.weight"])
            naive_q = torch.nn.functional.linear(x, fused[: fused.shape[0] // 3])
            naive_q = naive_q.view(*naive_q.shape[:2], d["num_heads"], -1).transpose(1, 2)
            assert not torch.allclose(naive_q, mq, atol=1e-3)


def test_phi3_gate_up_split_matches_mlp(built):
    """down(act(gate x) * up x) from the split canonical weights == Phi3MLP's output; swapped fails."""
    b = built("phi3")
    canon = canonicalize(b.tensors, b.config)
    seen: list = []
    hooks = [m.register_forward_hook(lambda m, a, o: seen.append((m, a[0].detach(), o.detach())))
             for n, m in b.model.named_modules() if n.endswith(".mlp")]
    with torch.no_grad():
        b.model(input_ids=torch.randint(0, 90, (2, 5)))
    for h in hooks:
        h.remove()
    assert len(seen) == 2
    F = torch.nn.functional
    for i, (mod, x, y) in enumerate(seen):
        g, u, dn = (torch.from_numpy(canon[f"layers.{i}.mlp.{r}.weight"]) for r in ("gate", "up", "down"))
        ours = F.linear(mod.activation_fn(F.linear(x, g)) * F.linear(x, u), dn)
        torch.testing.assert_close(ours, y, rtol=1e-5, atol=1e-5)
        swapped = F.linear(mod.activation_fn(F.linear(x, u)) * F.linear(x, g), dn)
        assert not torch.allclose(swapped, y, atol=1e-3)


# ----------------------------------------------------------------------------- lazy recipes
@pytest.mark.parametrize("family", ["phi3", "gpt_neox", "gpt2", "qwen2"])
def test_recipes_from_shapes_only(built, family):
    b = built(family)
    shapes = {k: list(v.shape) for k, v in b.tensors.items()}
    plan = plan_canonical(shapes, b.config)
    json.dumps(plan.to_dict())  # plain data for the Rust engine
    canon = canonicalize(b.tensors, b.config)
    assert set(plan.recipes) == set(canon)
    for key, r in plan.recipes.items():
        assert r.shape == canon[key].shape
        assert same_bits(apply_recipe(r, b.tensors[r.source]), canon[key])
    outs = plan_decanonical({k: v.shape for k, v in canon.items()}, b.config, plan.family, source_family=family)
    assert set(outs) == set(b.tensors)
    for name, o in outs.items():
        json.dumps(o.to_dict())
        assert o.shape == b.tensors[name].shape
        assert same_bits(apply_output_recipe(o, canon), b.tensors[name])
    if family == "gpt_neox":
        r = plan.recipes["layers.0.attn.k.weight"]
        hd, H = 8, 4
        assert r.axis == 0 and r.ranges == tuple((h * 3 * hd + hd, h * 3 * hd + 2 * hd) for h in range(H))
    if family == "gpt2":
        r = plan.recipes["layers.0.attn.v.weight"]
        assert r.transpose and r.axis == 1 and r.ranges == ((64, 96),)
    if family == "phi3":
        r = plan.recipes["layers.1.attn.k.weight"]
        assert r.ranges == ((48, 64),) and r.source == "model.layers.1.self_attn.qkv_proj.weight"


# ----------------------------------------------------------------------------- fused refusal / cross family
def test_fused_refused_for_other_or_unknown_family(built):
    b = built("phi3")
    canon = canonicalize(b.tensors, b.config)
    with pytest.raises(FusedTensorError, match="unknown family"):
        decanonicalize(dict(canon), b.config, "phi3")  # plain dict: provenance lost
    back = decanonicalize(dict(canon), b.config, "phi3", source_family="phi3")
    assert all(same_bits(back[k], b.tensors[k]) for k in b.tensors)
    # llama-shaped canonical tensors into phi3's fused layout: refused unless explicitly allowed
    lcfg = dict(b.config, model_type="llama", architectures=["LlamaForCausalLM"])
    lt = decanonicalize(canon, lcfg, "llama")  # unfused target: fine
    lcanon = canonicalize(lt, lcfg)
    with pytest.raises(FusedTensorError, match="'llama'"):
        decanonicalize(lcanon, b.config, "phi3")
    forced = decanonicalize(lcanon, b.config, "phi3", allow_cross_family_fuse=True)
    fam = get_family("phi3")
    assert same_bits(forced["model.layers.0.self_attn.qkv_proj.weight"], b.tensors["model.layers.0.self_attn.qkv_proj.weight"])
    assert fam.from_canonical("layers.0.attn.k.weight") == "model.layers.0.self_attn.qkv_proj.weight"


def test_fused_sizes_checked_against_config(built):
    b = built("phi3")
    bad = dict(b.config, num_key_value_heads=3)
    with pytest.raises(FusedTensorError, match="add up to"):
        canonicalize(b.tensors, bad)
    canon = canonicalize(b.tensors, b.config)
    with pytest.raises(FusedTensorError):
        decanonicalize(canon, bad)
    del canon["layers.0.attn.v.weight"]
    with pytest.raises(MissingTensorError, match="attn.v.weight"):
        decanonicalize(canon, b.config)


def test_cross_family_unfused_and_unused_keys(built):
    b = built("phi3")
    canon = canonicalize(b.tensors, b.config)
    # gpt2 has no gated MLP: mlp.gate keys have no place
    with pytest.raises(UnknownTensorError, match="mlp.gate"):
        decanonicalize(canon, b.config, "gpt2", allow_cross_family_fuse=True)
    out = decanonicalize(canon, b.config, "llama", unused="ignore")
    assert same_bits(out["model.layers.0.self_attn.k_proj.weight"], canon["layers.0.attn.k.weight"])


# ----------------------------------------------------------------------------- unknown tensors
def test_unknown_tensors_error_passthrough_drop_and_buffers(built):
    b = built("llama")
    extra = dict(b.tensors)
    extra["model.vision_adapter.weight"] = np.ones((3, 4), np.float32)
    extra["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.arange(4, dtype=np.float32)
    with pytest.raises(UnknownTensorError, match="vision_adapter") as ei:
        canonicalize(extra, b.config)
    assert ei.value.names == ("model.vision_adapter.weight",)
    canon = canonicalize(extra, b.config, unknown="passthrough")
    assert canon.passthrough == ("model.vision_adapter.weight",)
    assert canon.dropped == ("model.layers.0.self_attn.rotary_emb.inv_freq",)
    back = decanonicalize(canon, b.config)
    assert set(back) == set(b.tensors) | {"model.vision_adapter.weight"}
    with pytest.raises(UnknownTensorError, match="passthrough"):
        decanonicalize(canon, b.config, "mistral")
    canon = canonicalize(extra, b.config, unknown="drop", buffers="passthrough")
    assert "model.vision_adapter.weight" in canon.dropped
    assert "passthrough.model.layers.0.self_attn.rotary_emb.inv_freq" in canon
    with pytest.raises(ArchError):
        canonicalize(b.tensors, b.config, unknown="bogus")


def test_gpt2_hub_layout_buffers_dropped(built):
    b = built("gpt2")
    t = {k[len("transformer."):]: v for k, v in b.tensors.items()}
    t["h.0.attn.bias"] = np.ones((1, 1, 4, 4), np.float32)  # old causal-mask buffer
    canon = canonicalize(t, b.config)
    assert canon.dropped == ("h.0.attn.bias",)
    assert canon.family.prefix == ""


# ----------------------------------------------------------------------------- keys
def test_canonical_key_parse_and_errors():
    k = CanonicalKey.parse("layers.12.attn.q_norm.weight")
    assert (k.layer, k.role, k.param) == (12, "attn.q_norm", "weight") and str(k) == "layers.12.attn.q_norm.weight"
    assert CanonicalKey.parse("lm_head.bias") == CanonicalKey(None, "lm_head", "bias")
    assert str(CanonicalKey(0, "custom.router", "weight")) == "layers.0.custom.router.weight"
    for bad in ("attn.q.weight", "layers.0.embed.weight", "layers.0.attn.q.scale", "weight", "layers.0.nope.weight"):
        with pytest.raises(CanonicalKeyError):
            CanonicalKey.parse(bad)
    fam = get_family("gpt_neox")
    assert fam.to_canonical("gpt_neox.layers.3.attention.query_key_value.bias") == tuple(
        CanonicalKey(3, f"attn.{r}", "bias") for r in "qkv")
    assert fam.to_canonical("gpt_neox.layers.3.attention.bias") is None
    assert fam.is_ignored("gpt_neox.layers.3.attention.bias")
    assert fam.from_canonical("lm_head.weight") == "embed_out.weight"
    with pytest.raises(UnknownTensorError):
        fam.from_canonical("layers.0.mlp.gate.weight")


# ----------------------------------------------------------------------------- mapping files
@pytest.mark.parametrize("prefix", ["qed.", ""])
@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
def test_qed_mapping_round_trip(qed_family, prefix, dtype):
    cfg = am.qed_config()
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    stored, expected = am.qed_tensors(cfg, prefix=prefix, dtype=dt)
    fam = detect_family(cfg, list(stored))
    assert fam.name == "qed_fused" and fam.prefix == prefix
    canon = canonicalize(stored, cfg)
    assert sorted(canon) == sorted(expected)
    for k in expected:  # split pieces are exactly the blocks the checkpoint was built from
        assert same_bits(canon[k], expected[k]), k
    check_complete(canon, cfg)
    assert "lm_head.weight" not in canon  # tied
    back = decanonicalize(canon, cfg)
    assert sorted(back) == sorted(stored)
    assert all(same_bits(back[k], stored[k]) for k in stored)


def test_qed_unregistered_needs_mapping():
    cfg = am.qed_config()
    stored, _ = am.qed_tensors(cfg)
    arch.unregister_family("qed_fused")
    with pytest.raises(UnknownFamilyError, match="mapping file"):
        canonicalize(stored, cfg)
    fam = load_mapping(QED_YAML)  # not registered: pass it explicitly
    assert canonicalize(stored, cfg, fam).family.name == "qed_fused"


def test_dump_and_reparse_mapping(qed_family):
    again = parse_mapping(dump_mapping(qed_family))
    assert again.to_spec() == qed_family.to_spec()
    gpt2 = parse_mapping(dump_mapping(get_family("gpt2")))
    assert gpt2.to_spec() == get_family("gpt2").to_spec()


def _qed_spec():
    import yaml

    with open(QED_YAML) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.pop("family"), "'family'"),
        (lambda s: s.update(tensors=[]), "non-empty list"),
        (lambda s: s.update(bogus=1), "unknown field"),
        (lambda s: s["tensors"][0].update(role="embedding.weight"), "unknown role"),
        (lambda s: s["tensors"][0].update(role="embed.kernel"), "must end in"),
        (lambda s: s["tensors"][1].update(name="{prefix}norm1.weight"), "per-layer"),
        (lambda s: s["tensors"][0].update(name="{prefix}{layer}.tok.weight"), "global"),
        (lambda s: s["tensors"][0].update(name="{prefix}{blk}.weight"), "placeholder"),
        (lambda s: s["tensors"][2]["split"].update(layout="zigzag"), "layout"),
        (lambda s: s["tensors"][2]["split"].update(layout="interleave"), "groups"),
        (lambda s: s["tensors"][2]["split"]["parts"][0].__setitem__(1, "__import__('os')"), "size expression"),
        (lambda s: s["tensors"][3].update(role="attn.q.weight"), "produced by both"),
        (lambda s: s["tensors"][3].update(split={"parts": ["attn.o.weight"]}), "exactly one"),
        (lambda s: s["tensors"][6].update(pattern="blocks\\.(\\d+)\\.w2"), "named group"),
        (lambda s: s["tensors"][6].update(pattern="blocks[("), "bad regex"),
        (lambda s: s.update(merge_fast_arch=7), "version"),
    ],
)
def test_bad_mapping_files(tmp_path, mutate, message):
    spec = _qed_spec()
    mutate(spec)
    with pytest.raises(MappingFileError, match=message):
        load_mapping(spec)


def test_bad_mapping_file_io(tmp_path):
    with pytest.raises(MappingFileError, match="cannot read"):
        load_mapping(tmp_path / "missing.yaml")
    p = tmp_path / "broken.yaml"
    p.write_text("family: [unclosed\n")
    with pytest.raises(MappingFileError, match="not valid YAML"):
        load_mapping(p)
    p.write_text("- just\n- a list\n")
    with pytest.raises(MappingFileError, match=str(p).replace("\\", "\\\\")):
        load_mapping(p)
    assert issubclass(MappingFileError, ValueError)


def test_mapping_file_claims_model_type_and_interleave(tmp_path):
    """A user mapping with an interleaved fused tensor and a transposed weight."""
    text = """
family: tiny_neoxish
match: {model_type: [tinyx]}
tensors:
  - {name: "emb.weight", role: embed.weight, required: true}
  - name: "l.{layer}.qkv.weight"
    transpose: true
    split: {axis: 0, layout: interleave, groups: num_heads, parts: [[attn.q.weight, head_dim], [attn.k.weight, head_dim], [attn.v.weight, head_dim]]}
  - {name: "l.{layer}.proj.weight", role: attn.o.weight}
"""
    fam = parse_mapping(text, register=True)
    try:
        cfg = {"model_type": "tinyx", "hidden_size": 8, "num_attention_heads": 2}
        rng = np.random.default_rng(1)
        qkv = rng.standard_normal((8, 24)).astype(np.float32)  # stored [in, out]
        t = {"emb.weight": rng.standard_normal((5, 8)).astype(np.float32), "l.0.qkv.weight": qkv,
             "l.0.proj.weight": rng.standard_normal((8, 8)).astype(np.float32)}
        canon = canonicalize(t, cfg)
        out_rows = qkv.T.reshape(2, 3, 4, 8)  # [heads, 3, head_dim, in]
        assert same_bits(canon["layers.0.attn.k.weight"], np.ascontiguousarray(out_rows[:, 1].reshape(8, 8)))
        back = decanonicalize(canon, cfg)
        assert all(same_bits(back[k], t[k]) for k in t)
    finally:
        arch.unregister_family(fam.name)


# ----------------------------------------------------------------------------- extra layouts
def test_opt_350m_layout(built):
    """OPT-350m: project_in/project_out, post-LN (no final norm)."""
    b = built("opt_350m")
    canon = assert_round_trip(b.tensors, b.config)
    assert {"embed_proj_in.weight", "embed_proj_out.weight"} <= set(canon)
    assert "final_norm.weight" not in canon
    assert canon["embed.weight"].shape == (96, 16)
    check_complete(canon, b.config)


def test_gemma3_multimodal_language_model(built):
    """Gemma3ForConditionalGeneration: text weights get the gemma3_text keys (sizes from
    text_config); vision tower / projector pass through and are written back verbatim."""
    b = built("gemma3_mm")
    fam = detect_family(b.config, list(b.tensors))
    assert fam.name == "gemma3" and detect_family(None, list(b.tensors)).name == "gemma3"
    canon = assert_round_trip(b.tensors, b.config)
    assert canon.passthrough and all(n.startswith(("vision_tower.", "multi_modal_projector.")) for n in canon.passthrough)
    text = {k for k in canon if not k.startswith("passthrough.")}
    t = built("gemma3_text")
    assert text == set(canonicalize(t.tensors, t.config))
    assert canon["layers.0.attn.q.weight"].shape == (64, 32)
    check_complete(canon, b.config)


def test_lazy_plan_from_safetensors_header(built):
    b = built("gpt_neox")
    shapes = read_shapes(b.path)
    assert shapes["embed_out.weight"].dtype == "F32"
    plan = plan_canonical(shapes, read_config(b.path))
    for key, r in plan.recipes.items():
        assert same_bits(apply_recipe(r, b.tensors[r.source]), canonicalize(b.tensors, b.config)[key])


def test_canonical_key_single():
    fam = get_family("phi3")
    assert str(fam.canonical_key("model.layers.2.self_attn.o_proj.weight")) == "layers.2.attn.o.weight"
    assert fam.canonical_key("model.nope") is None
    with pytest.raises(FusedTensorError, match="to_canonical"):
        fam.canonical_key("model.layers.2.self_attn.qkv_proj.weight")
