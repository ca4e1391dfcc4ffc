"""Merge-quality benchmark in the regime where merging works: one tiny Llama-style LM
pretrained on a generic synthetic corpus, four task fine-tunes that stay close to it, and
every merge method of merge_fast on the same fine-tunes.

Vocabulary (``VOCAB_SIZE`` = 32; tokens are built by hand, no tokenizer)::

    0 PAD  1 BOS  2 SEP  3 EOS  4 <copy>  5..8 task tokens  9.. symbols s_0..s_{N_SYM-1}

Generic corpus ("pretraining", ``pretrain``): an even mix of
  * ``copy``: ``BOS <copy> x_1..x_n SEP x_1..x_n EOS`` (reading a prompt and writing an
    answer of the right length, ending with EOS), and
  * ``text``: ``BOS`` then 16 symbols of a fixed random Markov chain (each symbol has 3
    likely successors): generic next-token prediction.
No task token ever occurs in it. Generic ability = copy token accuracy and text loss.

Tasks (fine-tunes; each prompt starts with its own task token, answers are scored):
  * ``reverse``: ``x_n..x_1``;  * ``add``: ``(x_i + 3) mod N``;  * ``rotate``: ``x_2..x_n x_1``;
  * ``mirror``: ``N − 1 − x_i``.
Each is a small change of copy (order or symbol map), so a short low-LR fine-tune learns it
without forgetting the rest. Held-out ``val`` (tuning) and ``test`` splits have their own seeds.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, Sequence

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
try:
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()
except Exception:  # pragma: no cover
    pass

PAD, BOS, SEP, EOS, T_COPY = 0, 1, 2, 3, 4
TASKS = ("reverse", "add", "rotate", "mirror")
TASK_TOKEN = {t: 5 + i for i, t in enumerate(TASKS)}
SYM0 = 9
N_SYM = 12
VOCAB_SIZE = 32
MIN_LEN, MAX_LEN = 3, 8
TEXT_LEN = 16
SPLIT_SEED = {"train": 0, "val": 7_000_001, "test": 9_000_011}

# The protocol, fixed before any merge was run (see README.md).
MODEL = dict(hidden=64, layers=2, heads=4, inter=256)
PRETRAIN = dict(steps=1500, batch=64, lr=2e-3, warmup=50, seed=1234)
FINETUNE = dict(steps=300, batch=32, lr=1e-3, warmup=10)
# Each fine-tune batch: half its task, a quarter each of the generic copy and text (rehearsal,
# so that the fine-tune keeps the base's generic ability: the regime of merging).
FINETUNE_MIX = ("{task}", "copy", "{task}", "text")
N_STATS = 128          # examples for each fine-tune's Fisher and Gram (its own task's train split)
N_VAL, N_TEST = 128, 512


def _markov(seed: int = 99) -> torch.Tensor:
    """Transition matrix of the generic text: 3 likely successors per symbol."""
    g = torch.Generator().manual_seed(seed)
    p = torch.full((N_SYM, N_SYM), 0.1 / N_SYM)
    for s in range(N_SYM):
        nxt = torch.randperm(N_SYM, generator=g)[:3]
        p[s, nxt] += torch.tensor([0.5, 0.25, 0.15])
    return p / p.sum(1, keepdim=True)


MARKOV = _markov()


def make_example(task: str, g: torch.Generator):
    """(tokens, n_prompt): the first n_prompt tokens are not scored."""
    if task == "text":
        x = [int(torch.randint(0, N_SYM, (1,), generator=g))]
        for _ in range(TEXT_LEN - 1):
            x.append(int(torch.multinomial(MARKOV[x[-1]], 1, generator=g)))
        return [BOS] + [SYM0 + v for v in x], 1
    n = int(torch.randint(MIN_LEN, MAX_LEN + 1, (1,), generator=g))
    x = torch.randint(0, N_SYM, (n,), generator=g).tolist()
    ans = {"copy": x, "reverse": x[::-1], "add": [(v + 3) % N_SYM for v in x], "rotate": x[1:] + x[:1],
           "mirror": [N_SYM - 1 - v for v in x]}[task]
    tok = T_COPY if task == "copy" else TASK_TOKEN[task]
    prompt = [BOS, tok] + [SYM0 + v for v in x] + [SEP]
    return prompt + [SYM0 + v for v in ans] + [EOS], len(prompt)


def dataset(task: str, n: int, split: str, seed: int = 0):
    g = torch.Generator().manual_seed(SPLIT_SEED[split] + 1000 * seed + sum(map(ord, task)))
    return [make_example(task, g) for _ in range(n)]


def collate(examples) -> Dict[str, torch.Tensor]:
    L = max(len(t) for t, _ in examples)
    ids = torch.full((len(examples), L), PAD, dtype=torch.long)
    am = torch.zeros_like(ids)
    lb = torch.full_like(ids, -100)
    for i, (t, p) in enumerate(examples):
        ids[i, :len(t)] = torch.tensor(t)
        am[i, :len(t)] = 1
        lb[i, p:len(t)] = torch.tensor(t[p:])
    return {"input_ids": ids, "attention_mask": am, "labels": lb}


def batches(examples, bs):
    for s in range(0, len(examples), bs):
        yield collate(examples[s:s + bs])


def new_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=MODEL["hidden"], num_hidden_layers=MODEL["layers"],
                      num_attention_heads=MODEL["heads"], num_key_value_heads=MODEL["heads"],
                      intermediate_size=MODEL["inter"], max_position_embeddings=32, tie_word_embeddings=False,
                      bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def load(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()


def train(model, mix: Sequence[str], steps: int, batch: int, lr: float, warmup: int, seed: int):
    """AdamW (no weight decay), warmup + cosine; fresh seeded examples every step, tasks of
    ``mix`` in turn."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    for step in range(steps):
        ex = [make_example(mix[(step * batch + i) % len(mix)], g) for i in range(batch)]
        loss = model(**collate(ex)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def evaluate(model, task: str, split: str = "test", n: int = N_TEST, seed: int = 0) -> Dict[str, float]:
    """Teacher-forced token accuracy and mean loss on the scored tokens."""
    tot = ok = loss = 0.0
    for b in batches(dataset(task, n, split, seed), 256):
        lg = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        lb = b["labels"][:, 1:]
        v = lb != -100
        loss += torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100,
                                                  reduction="sum").item()
        ok += ((lg.argmax(-1) == lb) & v).sum().item()
        tot += v.sum().item()
    return {"acc": ok / tot, "loss": loss / tot}


def pretrained_base(cache: Path, log=print) -> Path:
    """The generic base, trained once and cached (keyed by the model and pretraining settings)."""
    key = json.dumps({"model": MODEL, "pretrain": PRETRAIN, "n_sym": N_SYM}, sort_keys=True)
    d = cache / f"base-{_digest(key)}"
    if (d / "model.safetensors").exists():
        return d
    t0 = time.perf_counter()
    m = train(new_model(PRETRAIN["seed"]), ["copy", "text"], PRETRAIN["steps"], PRETRAIN["batch"], PRETRAIN["lr"],
              PRETRAIN["warmup"], PRETRAIN["seed"])
    tmp = d.with_name(d.name + ".tmp")
    m.save_pretrained(str(tmp))
    (tmp / "pretrain.json").write_text(json.dumps({"seconds": time.perf_counter() - t0, **PRETRAIN}))
    os.replace(tmp, d)
    log(f"pretrained base in {time.perf_counter() - t0:.0f} s -> {d}")
    return d


def _digest(s: str) -> str:
    import hashlib

    return hashlib.sha1(s.encode()).hexdigest()[:10]


def finetune(base: Path, task: str, seed: int, out: Path) -> Path:
    if (out / "model.safetensors").exists():
        return out
    mix = [x.format(task=task) for x in FINETUNE_MIX]
    m = train(load(base), mix, FINETUNE["steps"], FINETUNE["batch"], FINETUNE["lr"], FINETUNE["warmup"],
              seed * 100 + TASKS.index(task) + 1)
    m.save_pretrained(str(out))
    return out


def statistics(model_dir: Path, task: str, seed: int, workdir: Path):
    """(Fisher file, Gram file) of a fine-tune on N_STATS examples of its own task."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
    import merge_fast.torch as mft

    f, g = workdir / f"fisher_{task}.safetensors", workdir / f"gram_{task}.safetensors"
    data = dataset(task, N_STATS, "train", seed + 50)
    m = load(model_dir)
    if not f.exists():
        mft.save_fisher(mft.estimate_fisher(m, list(batches(data, 32)), device="cpu"), f)
    if not g.exists():
        mft.save_gram(mft.estimate_gram(m, list(batches(data, 64)), device="cpu"), g)
    return f, g


def scores(model_dir, split="test", n=None, seed=0) -> Dict[str, float]:
    m = load(model_dir)
    n = n or (N_TEST if split == "test" else N_VAL)
    out = {t: evaluate(m, t, split, n, seed)["acc"] for t in TASKS}
    if split == "test":
        out["copy"] = evaluate(m, "copy", split, n, seed)["acc"]
        out["text_loss"] = evaluate(m, "text", split, n, seed)["loss"]
    return out
