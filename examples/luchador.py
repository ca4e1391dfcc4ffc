"""Instruction-safe style transfer, after the Gemma-4-E4B "Luchador" model card, on tiny models.

The card's two-stage recipe, rebuilt end to end with merge_fast on a tiny Gemma-shaped model
(hidden 32, 4 layers, vocabulary 128) trained here on synthetic token data:

  PT     a "pretrained" base: random init, briefly trained on a generic corpus (a Markov chain
         over word tokens);
  IT     the "instruction-tuned" model: PT fine-tuned on an instruction task (a prompt of words,
         then the response: each word mapped through a fixed permutation), mixed with generic text;
  fuel   several LoRA adapters (peft) trained *against PT* on a "style" corpus (the same
         language in a distinct voice: different successor preferences);

  stage 1  W = W_IT + s (1 − F̂_param)(1 − F̂_layer) Δ_avg, s = 0.3, with Δ_avg the average of
           the fuel adapters' deltas B·A·α/r and the Fisher of IT estimated on instruction
           prompts with merge_fast.torch (merge_fast's `fisher_dampened` method);
  masked   a LoRA trained against PT on the style corpus with the instruct-subspace mask active:
           the rank-r subspace of W_IT − W_PT per weight (merge_fast.subspace_masks, SVD in
           Rust), gradients scaled out of it in `scale_mask` mode by
           merge_fast.torch.SubspaceProjector, with a per-layer strength from the Fisher;
  final    slerp(stage 1, IT + masked adapter, t = 0.3).

Stage 1 and the final slerp run as ONE two-document (multi-stage) YAML config through
`merge_fast.run`; the stage-1 output is an intermediate the config names. The script prints the
instruction-task and style-task losses (held-out data) of PT, IT, stage 1 and the final model,
and two references without the recipe's protections (the same s = 0.3 without Fisher damping;
the slerp with an adapter trained without the mask).

    python examples/luchador.py [--out DIR] [--quick] [--seed N]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

# Token layout of the synthetic "language".
PAD, BOS, INST, RESP, EOS = 0, 1, 2, 3, 4
WORD0, N_WORDS = 8, 120          # word tokens 8..127
VOCAB = WORD0 + N_WORDS          # 128
PROMPT_WORDS = 6                 # instruction prompts: 6 words, responses: 6 words

SCALE = 0.3      # stage-1 scale s
SLERP_T = 0.3    # final slerp t (toward the masked-SFT model)
LORA_R, LORA_ALPHA = 4, 8
MASK_RANK = 8    # rank of the instruct subspace per weight (of 32)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- data


class Language:
    """Word sequences from a fixed random Markov chain: every word has 4 likely successors.
    The *generic* corpus uses them evenly (70 % of the mass, 30 % uniform tail); the *style*
    corpus is the same language in a distinct voice: one favourite successor per word (60 %),
    the other three 8 % each, 16 % tail. The instruction task maps a prompt of words through a
    fixed permutation."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        succ = np.stack([rng.choice(N_WORDS, 4, replace=False) for _ in range(N_WORDS)])
        self.generic_p = np.full((N_WORDS, N_WORDS), 0.3 / N_WORDS)
        self.style_p = np.full((N_WORDS, N_WORDS), 0.16 / N_WORDS)
        for w in range(N_WORDS):
            self.generic_p[w, succ[w]] += 0.7 / 4
            self.style_p[w, succ[w]] += [0.6, 0.08, 0.08, 0.08]
        self.perm = rng.permutation(N_WORDS)

    @staticmethod
    def _walk(rng: np.random.Generator, P: np.ndarray, n: int) -> List[int]:
        w = [int(rng.integers(N_WORDS))]
        for _ in range(n - 1):
            w.append(int(rng.choice(N_WORDS, p=P[w[-1]])))
        return w

    def generic(self, rng, n_words: int = 23) -> List[int]:
        return [BOS] + [WORD0 + w for w in self._walk(rng, self.generic_p, n_words)]

    def styled(self, rng, n_words: int = 23) -> List[int]:
        return [BOS] + [WORD0 + w for w in self._walk(rng, self.style_p, n_words)]

    def instruction(self, rng) -> tuple:
        """(ids, first predicted position): BOS INST w.. RESP perm(w).. EOS."""
        w = self._walk(rng, self.generic_p, PROMPT_WORDS)
        ids = [BOS, INST] + [WORD0 + x for x in w] + [RESP] + [WORD0 + int(self.perm[x]) for x in w] + [EOS]
        return ids, 3 + PROMPT_WORDS


def mixed(*gens):
    """Concatenates one batch of each generator (same keys, padded to the longest)."""
    import torch

    while True:
        bs = [next(g) for g in gens]
        L = max(b["input_ids"].shape[1] for b in bs)
        out = {}
        for k, fill in (("input_ids", PAD), ("attention_mask", 0), ("labels", -100)):
            out[k] = torch.cat([torch.nn.functional.pad(b[k], (0, L - b[k].shape[1]), value=fill) for b in bs])
        yield out


def batch_of(seqs: Sequence[List[int]], starts: Optional[Sequence[int]] = None):
    """input_ids / attention_mask / labels (HF alignment; labels before `start` are -100)."""
    import torch

    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), PAD, dtype=torch.long)
    am = torch.zeros_like(ids)
    lb = torch.full_like(ids, -100)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        am[i, :len(s)] = 1
        st = starts[i] if starts is not None else 1
        lb[i, st:len(s)] = ids[i, st:len(s)]
    return {"input_ids": ids, "attention_mask": am, "labels": lb}


class Task:
    """A fixed set of training and held-out examples of one kind."""

    def __init__(self, lang: Language, kind: str, seed: int, n_train: int, n_eval: int = 64):
        rng = np.random.default_rng(seed)
        make = {"generic": lambda: (lang.generic(rng), 1), "style": lambda: (lang.styled(rng), 1),
                "instruction": lambda: lang.instruction(rng)}[kind]
        self.train = [make() for _ in range(n_train)]
        self.eval = [make() for _ in range(n_eval)]

    def batches(self, rng: np.random.Generator, size: int):
        while True:
            idx = rng.choice(len(self.train), size, replace=False)
            yield batch_of([self.train[i][0] for i in idx], [self.train[i][1] for i in idx])

    def eval_batch(self):
        return batch_of([e[0] for e in self.eval], [e[1] for e in self.eval])


# ----------------------------------------------------------------------------- models


def tiny_config():
    from transformers import GemmaConfig

    return GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                       pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=True)


def quiet_transformers() -> None:
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype="float32").eval()


def train(model, batches, steps: int, lr: float, after_step=None) -> List[float]:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        b = next(batches)
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def eval_loss(model, task: Task) -> float:
    import torch

    with torch.no_grad():
        return float(model(**task.eval_batch()).loss)


def train_lora(pt_dir: Path, out: Path, batches, steps: int, lr: float, seed: int, masks=None,
               strengths: Optional[Dict[int, float]] = None) -> List[float]:
    """A PEFT LoRA trained against PT; with `masks`, one SubspaceProjector per layer
    (scale_mask, strength from `strengths[layer]`) keeps its updates out of the instruct
    subspace; with AdamW the accumulated change is re-projected after every step."""
    import torch
    from peft import LoraConfig, get_peft_model

    from merge_fast.methods.data_aware import layer_of
    from merge_fast.torch import SubspaceProjector

    torch.manual_seed(seed)
    model = get_peft_model(load(pt_dir), LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=TARGETS,
                                                    lora_dropout=0.0))
    projectors = []
    if masks is not None:
        by_layer: Dict[int, dict] = {}
        for name, m in masks.items():
            by_layer.setdefault(layer_of(name), {})[name] = m
        projectors = [SubspaceProjector(model, ms, mode="scale_mask", strength=strengths[layer])
                      for layer, ms in sorted(by_layer.items())]

    def reproject():
        for p in projectors:
            p.reproject_parameters()

    losses = train(model, batches, steps, lr, after_step=reproject if projectors else None)
    for p in projectors:
        p.remove()
    model.save_pretrained(str(out))
    return losses


# ----------------------------------------------------------------------------- recipe


def stages_yaml(it: Path, fuel: Sequence[Path], fisher: Path, masked: Path) -> str:
    models = "\n".join(f"  - model: {it}+{a}" for a in fuel)
    return f"""\
# Stage 1 (the card's "V3 base"): fuel adapters averaged in delta space, applied to IT at
# s = {SCALE}, damped by (1 - F_param)(1 - F_layer) from IT's Fisher on instruction prompts.
name: stage1
merge_method: fisher_dampened
base_model: {it}
models:
{models}
parameters:
  fisher: {fisher}
  scale: {SCALE}
dtype: float32
---
# Final: stage 1 "healed" against the masked-SFT model (IT + the masked adapter), slerp t = {SLERP_T}.
merge_method: slerp
base_model: stage1
models:
  - model: stage1
  - model: {it}+{masked}
parameters:
  t: {SLERP_T}
dtype: float32
"""


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--quick", action="store_true", help="fewer training steps (for tests)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.out is None:
        with tempfile.TemporaryDirectory(prefix="luchador-") as tmp:
            return run(Path(tmp), args.quick, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    return run(args.out, args.quick, args.seed)


def run(work: Path, quick: bool, seed: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import merge_fast as mf
    from merge_fast.methods.data_aware import layer_importance, layer_of
    from merge_fast.torch import estimate_fisher, load_masks, save_fisher

    t0 = time.perf_counter()
    # Tiny models gain nothing from intra-op threads, and on a shared machine spinning threads
    # make every step many times slower.
    torch.set_num_threads(1)
    quiet_transformers()
    steps = dict(pt=150, it=250, fuel=40, masked=80) if quick else dict(pt=400, it=500, fuel=120, masked=240)
    n_fuel = 3
    lang = Language(seed)
    generic = Task(lang, "generic", seed + 1, 2000)
    instr = Task(lang, "instruction", seed + 2, 2000)
    style = Task(lang, "style", seed + 3, 2000)
    rng = np.random.default_rng(seed + 4)
    log = []

    def say(msg: str) -> None:
        log.append(msg)
        print(msg, flush=True)

    # PT: random init, trained on the generic corpus.
    torch.manual_seed(seed)
    pt = AutoModelForCausalLM.from_config(tiny_config())
    pt_losses = train(pt, generic.batches(rng, 32), steps["pt"], 3e-3)
    pt_dir = work / "pt"
    pt.save_pretrained(str(pt_dir))
    say(f"PT: {steps['pt']} steps on the generic corpus, loss {pt_losses[0]:.3f} -> {pt_losses[-1]:.3f}")

    # IT: PT fine-tuned on the instruction task (loss on the responses only), mixed with generic
    # text so that it keeps modelling the language (as real instruction tunes do).
    it_losses = train(pt, mixed(instr.batches(rng, 24), generic.batches(rng, 8)), steps["it"], 3e-3)
    it_dir = work / "it"
    pt.save_pretrained(str(it_dir))
    say(f"IT: {steps['it']} steps on the instruction task + generic text, loss {it_losses[0]:.3f} -> {it_losses[-1]:.3f}")
    del pt

    # Fuel adapters: LoRAs trained against PT on the style corpus (different data orders/seeds).
    fuel = []
    for k in range(n_fuel):
        d = work / f"fuel{k}"
        ls = train_lora(pt_dir, d, style.batches(np.random.default_rng(seed + 10 + k), 16), steps["fuel"], 5e-3,
                        seed + 10 + k)
        fuel.append(d)
        say(f"fuel adapter {k}: LoRA r={LORA_R} against PT, {steps['fuel']} steps on style, "
            f"loss {ls[0]:.3f} -> {ls[-1]:.3f}")

    # Fisher of IT on instruction prompts (merge_fast.torch), stored under IT's tensor names.
    it_model = load(it_dir)
    prompts = [instr.train[i] for i in range(64)]
    batches = [batch_of([p[0] for p in prompts[s:s + 16]], [p[1] for p in prompts[s:s + 16]])
               for s in range(0, 64, 16)]
    fisher = estimate_fisher(it_model, batches, device="cpu")
    fisher_file = work / "fisher_it.safetensors"
    save_fisher(fisher, fisher_file, {"data": "instruction prompts"})
    imp = layer_importance(fisher_file)
    layer_imp = {layer_of(n): v for n, v in imp.items() if layer_of(n) is not None}
    say(f"Fisher of IT on {fisher.metadata['n_examples']} instruction examples ({fisher.metadata['method']}); "
        f"F_layer = " + ", ".join(f"L{k}:{v:.2f}" for k, v in sorted(layer_imp.items())))

    # Instruct-subspace masks: top-r singular vectors of W_IT - W_PT per layer linear (Rust SVD).
    mask_file = work / "instruct_masks.safetensors"
    energy = mf.subspace_masks(it_dir, pt_dir, MASK_RANK, mask_file,
                               include=r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$", seed=seed)
    mean_energy = float(np.mean([e for _, e, _ in energy.values()]))
    say(f"instruct-subspace masks: rank {MASK_RANK} of W_IT - W_PT for {len(energy)} weights "
        f"(mean captured energy {mean_energy:.2f})")

    # The masked adapter: same style data, gradients scaled out of the instruct subspace; the
    # strength per layer follows the Fisher (layers IT relies on most are protected most).
    strengths = {layer: 0.5 + 0.5 * v for layer, v in layer_imp.items()}
    masked = work / "masked"
    ls = train_lora(pt_dir, masked, style.batches(np.random.default_rng(seed + 20), 16), steps["masked"], 5e-3,
                    seed + 20, masks=load_masks(mask_file), strengths=strengths)
    say(f"masked adapter: {steps['masked']} steps on style with the scale_mask projector "
        f"(strength " + ", ".join(f"L{k}:{v:.2f}" for k, v in sorted(strengths.items())) +
        f"), loss {ls[0]:.3f} -> {ls[-1]:.3f}")
    unmasked = work / "unmasked"
    train_lora(pt_dir, unmasked, style.batches(np.random.default_rng(seed + 20), 16), steps["masked"], 5e-3,
               seed + 20)

    # Stage 1 and the final slerp: one multi-stage config through merge_fast.run.
    cfg = stages_yaml(it_dir, fuel, fisher_file, masked)
    (work / "luchador.yml").write_text(cfg)
    final_dir = work / "final"
    mf.run(str(work / "luchador.yml"), str(final_dir), overwrite=True, write_model_card=True)
    # The stage-1 intermediate lives in a temporary folder during that run; to evaluate it,
    # the same file is run again up to that stage (`--stage stage1` on the CLI).
    stage1_dir = work / "stage1"
    mf.run(str(work / "luchador.yml"), str(stage1_dir), stage="stage1", overwrite=True)
    say(f"merge: {work / 'luchador.yml'} (2 stages) -> {final_dir}; stage 1 alone -> {stage1_dir}")

    # References without the protections.
    ref_plain = work / "ref_undamped"
    mf.run({"merge_method": "task_arithmetic", "base_model": str(it_dir),
            "models": [{"model": f"{it_dir}+{a}", "parameters": {"weight": SCALE / n_fuel}} for a in fuel],
            "dtype": "float32"}, str(ref_plain), overwrite=True)
    ref_unmasked = work / "ref_unmasked"
    mf.run({"merge_method": "slerp", "base_model": str(stage1_dir),
            "models": [{"model": str(stage1_dir)}, {"model": f"{it_dir}+{unmasked}"}],
            "parameters": {"t": SLERP_T}, "dtype": "float32"}, str(ref_unmasked), overwrite=True)

    rows = {}
    for name, d in [("PT", pt_dir), ("IT", it_dir), ("stage 1", stage1_dir), ("final", final_dir),
                    ("ref: s=0.3, no Fisher damping", ref_plain), ("ref: final, unmasked adapter", ref_unmasked)]:
        m = load(d)
        rows[name] = {"instruction": eval_loss(m, instr), "style": eval_loss(m, style)}
    print()
    print(f"{'model':32s} {'instruction loss':>17s} {'style loss':>11s}")
    for name, r in rows.items():
        print(f"{name:32s} {r['instruction']:17.4f} {r['style']:11.4f}")
    it_r, fin = rows["IT"], rows["final"]
    rel = fin["instruction"] / it_r["instruction"] - 1
    print(f"\nfinal vs IT: instruction loss {rel:+.1%}, style loss {fin['style'] - it_r['style']:+.3f} "
          f"({time.perf_counter() - t0:.1f} s)")
    return {"rows": rows, "work": str(work), "log": log, "layer_importance": layer_imp,
            "seconds": time.perf_counter() - t0}


if __name__ == "__main__":
    main()
