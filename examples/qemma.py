"""A body from one family with attention from another, projected to its width (after the
Qemma model card: a Gemma-3 body with Qwen3 attention), on tiny models.

  body    a Gemma-3-shaped model (Gemma3ForCausalLM: hidden 32, 2 layers, 2 query heads of 32
          over 1 KV head, sandwich norms, q/k norms), briefly trained on a synthetic corpus;
  donor   a Qwen3-shaped model twice as wide (hidden 64, 3 layers, 8 query heads of 16 over 4 KV
          heads), trained on the same corpus (same token ids);
  fused   merge_fast.crossarch.graft_attention: the donor's attention projections, the hidden
          side mapped through the residual-stream Procrustes map R (64 -> 32, from the shared
          embedding rows) and the heads regrouped to the body's (2 donor heads of 16 side by
          side per body head of 32, RoPE halves interleaved), written as the body's
          architecture; everything else is the body's;
  heal    a few training steps of the fused model (as the card trains after its fusion).

The script checks that the fused folder loads with AutoModelForCausalLM as Gemma3ForCausalLM
and gives finite logits, and prints the held-out loss of body, donor, fused model before and
after the healing steps, and a baseline: the body with freshly initialised attention healed
for the same steps on the same data.

    python examples/qemma.py [--out DIR] [--quick] [--seed N]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

VOCAB, BOS = 128, 1
WORD0, N_WORDS = 8, 120


def corpus(seed: int, n: int, length: int = 24) -> List[List[int]]:
    """Sequences of a fixed random Markov chain (4 likely successors per word)."""
    rng = np.random.default_rng(seed)
    P = np.full((N_WORDS, N_WORDS), 0.2 / N_WORDS)
    lang = np.random.default_rng(1234)
    for w in range(N_WORDS):
        P[w, lang.choice(N_WORDS, 4, replace=False)] += 0.8 / 4
    out = []
    for _ in range(n):
        w = [int(rng.integers(N_WORDS))]
        for _ in range(length - 2):
            w.append(int(rng.choice(N_WORDS, p=P[w[-1]])))
        out.append([BOS] + [WORD0 + x for x in w])
    return out


def batches(data, rng, size):
    import torch

    while True:
        idx = rng.choice(len(data), size, replace=False)
        ids = torch.tensor([data[i] for i in idx])
        yield {"input_ids": ids, "labels": ids}


def body_config():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                            max_position_embeddings=64, sliding_window=16, pad_token_id=0, bos_token_id=BOS,
                            eos_token_id=2)


def donor_config():
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=64,
                       tie_word_embeddings=False, pad_token_id=0, bos_token_id=BOS, eos_token_id=2)


def train(model, gen, steps: int, lr: float) -> List[float]:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**next(gen)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def eval_loss(model, data) -> float:
    import torch

    with torch.no_grad():
        ids = torch.tensor(data)
        return float(model(input_ids=ids, labels=ids).loss)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--quick", action="store_true", help="fewer training steps (for tests)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.out is None:
        with tempfile.TemporaryDirectory(prefix="qemma-") as tmp:
            return run(Path(tmp), args.quick, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    return run(args.out, args.quick, args.seed)


def run(work: Path, quick: bool, seed: int) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from merge_fast.crossarch import graft_attention

    t0 = time.perf_counter()
    torch.set_num_threads(1)  # tiny models: threads only add contention on a shared machine
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    steps = dict(body=150, donor=150, heal=30) if quick else dict(body=400, donor=400, heal=100)
    train_data, held_out = corpus(seed, 2000), corpus(seed + 1, 64)
    rng = np.random.default_rng(seed)
    log = []

    def say(msg: str) -> None:
        log.append(msg)
        print(msg, flush=True)

    torch.manual_seed(seed)
    body = AutoModelForCausalLM.from_config(body_config())
    ls = train(body, batches(train_data, rng, 32), steps["body"], 3e-3)
    body.save_pretrained(str(work / "body"))
    say(f"body  (Gemma3ForCausalLM, hidden 32, 2 heads x 32): {steps['body']} steps, loss {ls[0]:.3f} -> {ls[-1]:.3f}")
    donor = AutoModelForCausalLM.from_config(donor_config())
    ls = train(donor, batches(train_data, rng, 32), steps["donor"], 3e-3)
    donor.save_pretrained(str(work / "donor"))
    say(f"donor (Qwen3ForCausalLM, hidden 64, 8 heads x 16): {steps['donor']} steps, loss {ls[0]:.3f} -> {ls[-1]:.3f}")

    res = graft_attention(work / "body", work / "donor", work / "fused", seed=seed, overwrite=True)
    say(f"graft: R {res.rotation.shape[0]}x{res.rotation.shape[1]} ({res.method}, residual {res.residual:.2f}), "
        f"layers body<-donor {res.layer_map}, body q heads <- donor {res.q_groups}, kv <- {res.kv_groups}, "
        f"{len(res.tensors_replaced)} tensors replaced")

    fused = AutoModelForCausalLM.from_pretrained(str(work / "fused"), dtype="float32").eval()
    arch = type(fused).__name__
    with torch.no_grad():
        logits = fused(input_ids=torch.tensor(held_out[:4])).logits
    finite = bool(torch.isfinite(logits).all())
    say(f"fused loads as {arch}; logits {tuple(logits.shape)} finite: {finite}")

    losses = {"body": eval_loss(body, held_out), "donor": eval_loss(donor, held_out),
              "fused, before healing": eval_loss(fused, held_out)}
    heal_rng = np.random.default_rng(seed + 7)
    heal_losses = train(fused, batches(train_data, heal_rng, 32), steps["heal"], 1e-3)
    losses["fused, after healing"] = eval_loss(fused, held_out)
    fused.save_pretrained(str(work / "fused_healed"))
    say(f"healing: {steps['heal']} steps, training loss {heal_losses[0]:.3f} -> {heal_losses[-1]:.3f}")

    # Baseline: the body with freshly initialised attention, healed the same way (same data).
    reinit = AutoModelForCausalLM.from_pretrained(str(work / "body"), dtype="float32")
    torch.manual_seed(seed + 8)
    with torch.no_grad():
        for name, p in reinit.named_parameters():
            if "self_attn" in name:
                if name.endswith("norm.weight"):
                    p.zero_()  # Gemma norms store w with gain 1 + w
                else:
                    p.normal_(0.0, reinit.config.initializer_range)
    train(reinit, batches(train_data, np.random.default_rng(seed + 7), 32), steps["heal"], 1e-3)
    losses["body, attention re-initialised, healed"] = eval_loss(reinit, held_out)
    print()
    print(f"{'model':40s} {'held-out loss':>14s}")
    for k, v in losses.items():
        print(f"{k:40s} {v:14.4f}")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return {"losses": losses, "architecture": arch, "finite": finite, "heal_losses": heal_losses,
            "graft": res, "work": str(work), "log": log, "seconds": time.perf_counter() - t0}


if __name__ == "__main__":
    main()
