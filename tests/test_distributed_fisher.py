"""Fisher under torch.distributed: a real `torchrun --nproc_per_node=2` job (gloo on CPU,
127.0.0.1) against one process. The ranks split the batches and all-reduce once, so a
rank that processed too much or too little, or counts that were not reduced, give a wrong
Fisher; rank 0 alone writes the file."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import merge_fast.torch as mft  # noqa: E402
from merge_fast.torch.fisher import _batch_seed, sample_labels  # noqa: E402

from test_torch_fisher import _save_tiny_model_dir, assert_close_dicts  # noqa: E402

torch.set_num_threads(2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, tmp_path, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", GLOO_SOCKET_IFNAME="lo")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_torchrun_two_ranks_equals_one_process(tmp_path):
    d = tmp_path / "tiny"
    model, tok = _save_tiny_model_dir(d)
    g = torch.Generator().manual_seed(0)
    # 11 texts, batch 3 -> 4 batches (rank 0: batches 0, 2; rank 1: 1, 3), max 10 examples
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 60, (int(n),), generator=g))
             for n in torch.randint(3, 20, (11,), generator=g)]
    data = tmp_path / "texts.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    out = tmp_path / "fisher2.safetensors"
    sampled = tmp_path / "sampled2.pt"
    script = tmp_path / "job.py"
    # One torchrun job (start-up is the slow part): the `merge-fast fisher` CLI entry point
    # (distributed from the torchrun environment), then the Python API in sampled mode with a
    # global max_examples cut inside a batch.
    cli = ["fisher", str(d), "--data", str(data), "--out", str(out), "--max-examples", "10",
           "--seq-len", "12", "--batch-size", "3", "--device", "cpu"]
    script.write_text(textwrap.dedent(f"""
        import torch, torch.distributed as dist
        import merge_fast.torch as mft
        from merge_fast.cli import main
        assert main({cli!r}) == 0
        from transformers import AutoModelForCausalLM, AutoTokenizer
        torch.set_num_threads(1)
        tok = AutoTokenizer.from_pretrained({str(d)!r})
        model = AutoModelForCausalLM.from_pretrained({str(d)!r}, dtype=torch.float32)
        texts = [l for l in open({str(data)!r})]
        import json
        ex = mft.tokenize_texts(tok, [json.loads(t)["text"] for t in texts], seq_len=12)
        f = mft.estimate_fisher(model, list(mft.make_batches(ex, 3, pad_id=tok.pad_token_id)),
                                mode="sampled", seed=5, max_examples=8, device="cpu",
                                distributed=True)
        assert dist.get_world_size() == 2 and f.metadata["world_size"] == 2
        if dist.get_rank() == 0:
            torch.save({{"f": dict(f), "meta": f.metadata}}, {str(sampled)!r})
        dist.destroy_process_group()
    """))
    r = _torchrun([str(script)], tmp_path)
    assert r.stdout.count("wrote ") == 1  # rank 0 only
    assert sorted(p.name for p in tmp_path.glob("*.safetensors*")) == ["fisher2.safetensors"]

    # One process, same tokens.
    ex = mft.tokenize_texts(tok, texts[:10], seq_len=12)
    ref = mft.estimate_fisher(model, mft.make_batches(ex, 3, pad_id=tok.pad_token_id), device="cpu")
    f = mft.load_fisher(out)
    assert f.metadata["n_examples"] == 10 and f.metadata["n_tokens"] == ref.metadata["n_tokens"]
    assert_close_dicts(f, dict(ref), rtol=1e-5)

    # Sampled: labels of batch i drawn with the (seed, i) generator, whatever the rank.
    ex_all = mft.tokenize_texts(tok, texts, seq_len=12)
    batches = list(mft.make_batches(ex_all, 3, pad_id=tok.pad_token_id))
    gen = torch.Generator()
    fixed, left = [], 8
    for i, b in enumerate(batches):
        b = {k: v[:left] for k, v in b.items()}
        left -= b["input_ids"].shape[0]
        gen.manual_seed(_batch_seed(5, i))
        b["labels"] = sample_labels(model, b["input_ids"], b["attention_mask"], b["labels"], gen)
        fixed.append(b)
        if left == 0:
            break
    ref_s = mft.estimate_fisher(model, fixed, mode="empirical", device="cpu")
    got = torch.load(sampled)
    assert got["meta"]["n_examples"] == 8 and got["meta"]["mode"] == "sampled"
    assert got["meta"]["n_tokens"] == ref_s.metadata["n_tokens"]
    assert_close_dicts(got["f"], dict(ref_s), rtol=1e-5)


def test_distributed_without_process_group_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    from test_torch_fisher import tiny_llama

    with pytest.raises(RuntimeError, match="torchrun environment"):
        mft.estimate_fisher(tiny_llama(), [{"input_ids": torch.tensor([[4, 5, 6]])}],
                            distributed=True)
