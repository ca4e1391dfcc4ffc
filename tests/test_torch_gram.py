"""Gram matrices for RegMean: estimate_gram against a numpy XᵀX of the inputs each linear
layer receives when every example runs alone and unpadded; the CLI; torchrun with 2 ranks."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import merge_fast.torch as mft  # noqa: E402

from test_torch_fisher import _save_tiny_model_dir, ragged_examples, tiny_llama  # noqa: E402

torch.set_num_threads(2)


def captured_grams(model, examples):
    """Reference: run each example alone (no padding, no mask), record every Linear's input
    rows with separate hooks, then XᵀX in float64 numpy."""
    rows = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D":
            def h(_m, args, name=name):
                rows.setdefault(name + ".weight", []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double().numpy())
            hooks.append(m.register_forward_pre_hook(h))
    with torch.no_grad():
        for e in examples:
            model(input_ids=torch.tensor([e]))
    for h in hooks:
        h.remove()
    return {k: (np.concatenate(v).T @ np.concatenate(v), sum(len(x) for x in v)) for k, v in rows.items()}


def assert_grams(got, ref, keys, rtol=1e-5):
    assert sorted(got) == sorted(keys)
    for k in keys:
        g = got[k].numpy()
        assert got[k].dtype == torch.float32 and g.shape == ref[k][0].shape, k
        err = np.abs(g - ref[k][0]).max()
        assert err <= rtol * np.abs(ref[k][0]).max(), (k, err)


def test_gram_equals_numpy_xtx_with_padding_excluded():
    model = tiny_llama(tie=True)
    ex = ragged_examples(5)
    batches = list(mft.make_batches(ex, 3, pad_id=3))
    assert (batches[0]["attention_mask"] == 0).any()  # padding present, must not count
    g = mft.estimate_gram(model, batches, device="cpu")
    ref = captured_grams(model, ex)
    # lm_head is tied to the embedding: not a tensor of its own, left out
    linear = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert "model.layers.0.self_attn.q_proj.weight" in linear and len(linear) == 14
    assert_grams(g, ref, linear)
    assert g.metadata["skipped_tied"] == ["lm_head.weight"]
    assert g.metadata["n_examples"] == 5
    assert g.metadata["n_tokens"] == {k: sum(len(e) for e in ex) for k in linear}
    # the keys are checkpoint tensor names with matching input dims
    sd = model.state_dict()
    assert all(sd[k].shape[1] == g[k].shape[0] for k in linear)
    # padding really was present: including it would change the Gram
    full = mft.estimate_gram(model, [{"input_ids": b["input_ids"]} for b in batches], device="cpu")
    assert not torch.allclose(full["model.layers.0.mlp.down_proj.weight"], g["model.layers.0.mlp.down_proj.weight"])


def test_gram_untied_selection_max_examples_and_roundtrip(tmp_path):
    model = tiny_llama(tie=False)
    ex = ragged_examples(7)
    g = mft.estimate_gram(model, mft.make_batches(ex, 2, pad_id=3), device="cpu", max_examples=5,
                          modules=r"mlp\.|lm_head")
    ref = captured_grams(model, ex[:5])
    keys = ["lm_head.weight"] + [f"model.layers.{i}.mlp.{p}_proj.weight" for i in range(2) for p in ("gate", "up", "down")]
    assert_grams(g, ref, keys)
    assert g.metadata["n_examples"] == 5
    p = tmp_path / "g.safetensors"
    mft.save_gram(g, p, {"model": "tiny"})
    back = mft.load_gram(p)
    assert sorted(back) == sorted(g) and all(torch.equal(back[k], g[k]) for k in g)
    assert back.metadata["n_tokens"] == g.metadata["n_tokens"] and back.metadata["model"] == "tiny"
    assert back.metadata["format"] == "merge_fast.gram"


def test_gpt2_conv1d_layers_are_recorded_with_their_orientation():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()
    ex = [[5, 6, 7, 8], [9, 10, 11]]
    g = mft.estimate_gram(model, mft.make_batches(ex, 2, pad_id=0), device="cpu")
    ref = captured_grams(model, ex)
    keys = [f"transformer.h.0.{k}.weight" for k in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert_grams(g, ref, keys)
    sd = model.state_dict()
    # Conv1D stores [in, out]: the Gram is [in, in] = the weight's first dim
    assert g["transformer.h.0.mlp.c_proj.weight"].shape == (64, 64) == (sd["transformer.h.0.mlp.c_proj.weight"].shape[0],) * 2
    assert sorted(g.metadata["fan_in_fan_out"]) == sorted(keys)


def test_no_linear_selected_is_an_error():
    with pytest.raises(ValueError, match="no \\(selected\\) nn.Linear"):
        mft.estimate_gram(tiny_llama(), [{"input_ids": torch.tensor([[4, 5]])}], modules="nothing_matches")


def _texts(n=11):
    g = torch.Generator().manual_seed(0)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, 60, (int(k),), generator=g))
            for k in torch.randint(3, 20, (n,), generator=g)]


def test_cli_gram(tmp_path):
    from merge_fast.cli import main

    d = tmp_path / "tiny"
    model, tok = _save_tiny_model_dir(d)
    texts = _texts()
    data = tmp_path / "texts.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    out = tmp_path / "G.safetensors"
    assert main(["gram", str(d), "--data", str(data), "--out", str(out), "--max-examples", "9",
                 "--seq-len", "12", "--batch-size", "4", "--device", "cpu", "--quiet"]) == 0
    g = mft.load_gram(out)
    ex = mft.tokenize_texts(tok, texts[:9], seq_len=12)
    ref = captured_grams(model, ex)
    assert_grams(g, ref, [k for k in ref])
    assert g.metadata["n_examples"] == 9 and g.metadata["data"] == "texts.jsonl"


def test_torchrun_two_ranks_equals_one_process(tmp_path):
    from test_distributed_fisher import _torchrun

    d = tmp_path / "tiny"
    model, tok = _save_tiny_model_dir(d)
    texts = _texts()
    data = tmp_path / "texts.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    out = tmp_path / "gram2.safetensors"
    cli = ["gram", str(d), "--data", str(data), "--out", str(out), "--max-examples", "10",
           "--seq-len", "12", "--batch-size", "3", "--device", "cpu"]
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import torch.distributed as dist
        from merge_fast.cli import main
        assert main({cli!r}) == 0
        assert dist.get_world_size() == 2
        dist.destroy_process_group()
    """))
    r = _torchrun([str(script)], tmp_path)
    assert r.stdout.count("wrote ") == 1  # rank 0 only
    assert sorted(p.name for p in tmp_path.glob("*.safetensors*")) == ["gram2.safetensors"]
    got = mft.load_gram(out)
    ex = mft.tokenize_texts(tok, texts[:10], seq_len=12)
    one = mft.estimate_gram(model, mft.make_batches(ex, 3, pad_id=tok.pad_token_id), device="cpu")
    assert got.metadata["world_size"] == 2 and got.metadata["n_examples"] == 10
    assert got.metadata["n_tokens"] == one.metadata["n_tokens"]
    for k in one:
        torch.testing.assert_close(got[k], one[k], rtol=1e-5, atol=1e-5 * one[k].abs().max().item())
