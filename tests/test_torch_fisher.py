"""merge_fast.torch Fisher estimation: against a direct per-example computation (one
loss.backward() per example with the model's own loss), both modes, parameter subsets, tied
weights, the vmap->loop fallback, save/load, and the `merge-fast fisher` CLI function."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent


import merge_fast.torch as mft  # noqa: E402
torch.set_num_threads(2)


def tiny_llama(seed=0, vocab=64, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie, bos_token_id=2, eos_token_id=1, pad_token_id=3)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def ragged_examples(n=5, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    lens = [9, 5, 12, 7, 3, 10, 6][:n]
    return [torch.randint(4, vocab, (L,), generator=g).tolist() for L in lens]


def batches_of(examples, bs, prompt=0):
    """Right-padded batches; the first `prompt` tokens of each example are not predicted."""
    mask = [[0] * min(prompt, len(e)) + [1] * max(0, len(e) - prompt) for e in examples]
    return list(mft.make_batches(examples, bs, pad_id=3, label_mask=mask))


def direct_fisher(model, batches, label_override=None):
    """Reference: per example, trim the padding, model(...).loss (mean CE) * #predicted tokens
    = -log-likelihood, backward, square, average over examples."""
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    n_ex = 0
    for bi, b in enumerate(batches):
        labels = b["labels"] if label_override is None else label_override[bi]
        for i in range(b["input_ids"].shape[0]):
            L = int(b["attention_mask"][i].sum())
            ids = b["input_ids"][i:i + 1, :L]
            lb = labels[i:i + 1, :L]
            k = int((lb[:, 1:] != -100).sum())
            model.zero_grad()
            if k > 0:
                out = model(input_ids=ids, labels=lb)
                (out.loss * k).backward()
                for n, p in model.named_parameters():
                    acc[n] += p.grad.detach() ** 2
            n_ex += 1
    return {n: a / n_ex for n, a in acc.items()}


def assert_close_dicts(got, ref, keys=None, rtol=2e-4):
    keys = list(ref) if keys is None else keys
    assert sorted(got) == sorted(keys)
    for k in keys:
        r, g = ref[k], got[k]
        assert g.dtype == torch.float32 and g.shape == r.shape, k
        scale = r.abs().max().item() + 1e-12
        err = (g - r).abs().max().item()
        assert err <= rtol * scale, f"{k}: max err {err:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("use_vmap", [True, False])
def test_empirical_matches_direct(use_vmap):
    model = tiny_llama()
    ex = ragged_examples()
    bs = batches_of(ex, 3, prompt=2)
    f = mft.estimate_fisher(model, bs, mode="empirical", device="cpu", use_vmap=use_vmap)
    ref = direct_fisher(model, bs)
    assert_close_dicts(f, ref)
    m = f.metadata
    assert m["mode"] == "empirical" and m["n_examples"] == 5
    assert m["n_tokens"] == sum(max(0, len(e) - 2) for e in ex)
    assert m["method"] == ("vmap" if use_vmap else "loop")
    assert all(v.abs().sum() > 0 for k, v in f.items() if "embed" not in k)
    # squaring the batch gradient is a different quantity: make sure we are not doing that
    model.zero_grad()
    for b in bs:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        (-mft.sequence_log_likelihood(out.logits, b["labels"]).sum()).backward()
    k = "model.layers.0.mlp.down_proj.weight"
    wrong = (model.get_parameter(k).grad / 5) ** 2
    assert not torch.allclose(wrong, f[k], rtol=1e-2)


def test_chunking_and_max_examples():
    model = tiny_llama()
    bs = batches_of(ragged_examples(7), 4)
    full = mft.estimate_fisher(model, bs, device="cpu")
    chunked = mft.estimate_fisher(model, bs, device="cpu", chunk_size=3)
    assert_close_dicts(chunked, full, rtol=1e-5)
    part = mft.estimate_fisher(model, bs, device="cpu", max_examples=5)
    assert part.metadata["n_examples"] == 5
    assert_close_dicts(part, direct_fisher(model, batches_of(ragged_examples(7)[:5], 4)))


def test_sampled_matches_direct_with_same_labels():
    model = tiny_llama()
    bs = batches_of(ragged_examples(), 3, prompt=1)
    f1 = mft.estimate_fisher(model, bs, mode="sampled", device="cpu", seed=123)
    f2 = mft.estimate_fisher(model, bs, mode="sampled", device="cpu", seed=123)
    f3 = mft.estimate_fisher(model, bs, mode="sampled", device="cpu", seed=7)
    fe = mft.estimate_fisher(model, bs, mode="empirical", device="cpu")
    k = "model.layers.1.self_attn.v_proj.weight"
    assert torch.equal(f1[k], f2[k])
    assert not torch.allclose(f1[k], f3[k])
    assert not torch.allclose(f1[k], fe[k])
    assert f1.metadata["mode"] == "sampled" and f1.metadata["seed"] == 123
    # reproduce the draws: one generator with the same seed, batches in order
    g = torch.Generator().manual_seed(123)
    labels = []
    for b in bs:
        lb = mft.sample_labels(model, b["input_ids"], b["attention_mask"], b["labels"], g)
        # predicted positions are exactly the data's predicted positions
        assert torch.equal(lb[:, 1:] == -100, b["labels"][:, 1:] == -100)
        labels.append(lb)
    ref = direct_fisher(model, bs, label_override=labels)
    assert_close_dicts(f1, ref)
    # loop path draws the same labels
    f4 = mft.estimate_fisher(model, bs, mode="sampled", device="cpu", seed=123, use_vmap=False)
    assert_close_dicts(f4, ref)


def test_params_subset_list_and_predicate():
    model = tiny_llama()
    bs = batches_of(ragged_examples(), 5)
    full = mft.estimate_fisher(model, bs, device="cpu")
    names = ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]
    sub = mft.estimate_fisher(model, bs, device="cpu", params=names)
    assert_close_dicts(sub, {k: full[k] for k in names}, rtol=1e-5)
    sub2 = mft.estimate_fisher(model, bs, device="cpu", params=lambda n: ".mlp." in n)
    mlp = [k for k in full if ".mlp." in k]
    assert len(mlp) == 6
    assert_close_dicts(sub2, {k: full[k] for k in mlp}, rtol=1e-5)
    sub3 = mft.estimate_fisher(model, bs, device="cpu", params=names, use_vmap=False)
    assert_close_dicts(sub3, {k: full[k] for k in names}, rtol=2e-4)
    # requires_grad flags are restored
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(KeyError, match="nope"):
        mft.estimate_fisher(model, bs, device="cpu", params=["nope.weight"])
    with pytest.raises(ValueError, match="mode"):
        mft.estimate_fisher(model, bs, mode="true")


def test_tied_weights():
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    bs = batches_of(ragged_examples(), 5)
    f = mft.estimate_fisher(model, bs, device="cpu")
    assert "model.embed_tokens.weight" in f and "lm_head.weight" not in f
    assert f.metadata["tied_weights"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert_close_dicts(f, direct_fisher(model, bs))
    # asking for the alias gives the shared tensor under its stored name
    sub = mft.estimate_fisher(model, bs, device="cpu", params=["lm_head.weight"])
    assert list(sub) == ["model.embed_tokens.weight"]


class _VmapHostile(torch.nn.Module):
    """Wraps a causal LM with data-dependent Python control flow (breaks torch.func.vmap)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        if bool((input_ids >= 0).all()):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)
        raise AssertionError


def test_vmap_failure_falls_back_to_loop():
    inner = tiny_llama()
    model = _VmapHostile(inner)
    bs = batches_of(ragged_examples(), 3)
    with pytest.warns(UserWarning, match="falling back"):
        f = mft.estimate_fisher(model, bs, device="cpu")
    assert f.metadata["method"] == "loop"
    ref = direct_fisher(inner, bs)
    assert_close_dicts(f, {"inner." + k: v for k, v in ref.items()})


def test_save_load_roundtrip(tmp_path):
    from safetensors import safe_open

    model = tiny_llama(tie=True)
    bs = batches_of(ragged_examples(), 5)
    f = mft.estimate_fisher(model, bs, device="cpu")
    p = tmp_path / "fisher.safetensors"
    mft.save_fisher(f, p, {"model": "tiny-llama"})
    with safe_open(str(p), framework="pt") as fh:
        meta = fh.metadata()
        keys = set(fh.keys())
    assert keys == set(f) and keys <= set(model.state_dict())
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["mode"] == "empirical" and meta["n_examples"] == "5" and meta["model"] == "tiny-llama"
    assert json.loads(meta["tied_weights"]) == {"lm_head.weight": "model.embed_tokens.weight"}
    g = mft.load_fisher(p)
    assert set(g) == set(f)
    for k in f:
        assert torch.equal(g[k], f[k])
    assert g.metadata["n_examples"] == 5 and g.metadata["n_tokens"] == f.metadata["n_tokens"]
    assert g.metadata["mode"] == "empirical" and g.metadata["model"] == "tiny-llama"
    # a plain dict saves too
    mft.save_fisher({"w": torch.ones(2, 3, dtype=torch.bfloat16)}, tmp_path / "x.safetensors",
                    {"mode": "sampled"})
    h = mft.load_fisher(tmp_path / "x.safetensors")
    assert h["w"].dtype == torch.float32 and h.metadata["mode"] == "sampled"


def _save_tiny_model_dir(d: Path, vocab=64):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "</s>", "<s>", "<pad>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                   bos_token="<s>", pad_token="<pad>")
    model = tiny_llama(vocab=vocab)
    model.save_pretrained(str(d))
    fast.save_pretrained(str(d))
    return model, fast


def test_cli_end_to_end(tmp_path, capsys):
    d = tmp_path / "tiny"
    model, tok = _save_tiny_model_dir(d)
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 60, (int(n),), generator=g))
             for n in torch.randint(3, 20, (11,), generator=g)]
    data = tmp_path / "texts.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n\n")
    out = tmp_path / "fisher.safetensors"
    rc = mft.fisher_main([str(d), "--data", str(data), "--out", str(out), "--max-examples", "9",
                          "--seq-len", "12", "--batch-size", "4", "--device", "cpu"])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    f = mft.load_fisher(out)
    assert set(f) == {n for n, _ in model.named_parameters()}
    assert f.metadata["n_examples"] == 9 and f.metadata["mode"] == "empirical"
    assert f.metadata["model"] and f.metadata["model_type"] == "llama"
    # same numbers as the Python API on the same tokens
    ex = mft.tokenize_texts(tok, texts[:9], seq_len=12)
    ref = mft.estimate_fisher(model, mft.make_batches(ex, 4, pad_id=tok.pad_token_id),
                              device="cpu")
    assert f.metadata["n_tokens"] == ref.metadata["n_tokens"]
    assert_close_dicts(f, dict(ref), rtol=1e-4)
    # sampled + params regex + quiet
    out2 = tmp_path / "f2.safetensors"
    rc = mft.fisher_main([str(d), "--data", str(data), "--out", str(out2), "--mode", "sampled",
                          "--params", r"layers\.1\.", "--quiet", "--device", "cpu"])
    assert rc == 0 and capsys.readouterr().out == ""
    f2 = mft.load_fisher(out2)
    assert f2.metadata["mode"] == "sampled" and all("layers.1." in k for k in f2)
    # bad jsonl line -> clear error naming the line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"}\n{"txt": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        mft.fisher_main([str(d), "--data", str(bad), "--out", str(out2), "--quiet"])


def test_import_merge_fast_torch_is_separate():
    """The torch subpackage must not import the compiled core."""
    src = Path(mft.__file__).parent
    for f in src.glob("*.py"):
        assert "_core" not in f.read_text(), f


def test_import_merge_fast_does_not_import_torch():
    import subprocess

    code = "import sys, merge_fast\nprint('TORCH' if 'torch' in sys.modules else 'OK')\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    out = r.stdout.strip()
    assert out == "OK", (out, r.stderr[-2000:])
