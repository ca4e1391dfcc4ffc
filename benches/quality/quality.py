"""Merge-quality benchmark scaffolding: two synthetic token-level tasks, one shared random init
of a tiny Llama-style causal LM, two fine-tunes, their Fisher, held-out evaluation, and torch
reference merges (plain average, task arithmetic, Fisher-weighted average).

Everything is seeded and CPU-only; no tokenizer is needed (tokens are built by hand).

Vocabulary (``VOCAB_SIZE`` = 32)::

    0 PAD  1 BOS  2 SEP  3 EOS  4 <reverse>  5 <modadd>  6..6+N_SYM-1 symbols s_0..s_{N_SYM-1}
    16 <copy> (only used by the "pretrained" setup's warm-up)

Tasks (the loss/accuracy count only the answer tokens and the final EOS):

* ``reverse``: ``BOS <reverse> x_1..x_n SEP x_n..x_1 EOS``  (sequence reversal)
* ``modadd``:  ``BOS <modadd> x_1..x_n SEP (x_1+K)%N .. (x_n+K)%N EOS``  (modular addition
  of the constant K = ``MODADD_K`` to every symbol, N = ``N_SYM``, in order). A variant with a
  per-example key ``k`` in the prompt did not leave its loss plateau (~1.94) within 400 steps
  for this model size, so the constant-offset version is used to keep the bench fast.

* ``copy``:    ``BOS <copy> x_1..x_n SEP x_1..x_n EOS``  (generic "pretraining" task of the
  ``setup="pretrained"`` variant: it teaches the prompt/answer format, reading the prompt
  symbols, emitting symbols and EOS at the right length - but neither target task: the
  <reverse>/<modadd> tokens never occur in it, the answer order is the prompt order and no
  symbol is shifted)

with ``n`` uniform in ``[MIN_LEN, MAX_LEN]`` and symbols uniform. Training and held-out data
come from disjoint seeds.

Two setups (``make_quality_setup(setup=...)``):

* ``"random"`` (the literal setup): both fine-tunes start from the same RANDOM init.
* ``"pretrained"`` (the regime of Matena & Raffel 2022): the same random init is first
  "pretrained" on ``copy`` (``pretrain_steps``), and both fine-tunes start from that shared
  pretrained model, which is then the ``base`` of task arithmetic / TIES.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
try:  # no "Loading weights"/"Writing model shards" bars in the bench output
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()
except Exception:  # pragma: no cover
    pass

PAD, BOS, SEP, EOS, T_REV, T_ADD = 0, 1, 2, 3, 4, 5
SYM0 = 6
N_SYM = 10
T_COPY = SYM0 + N_SYM  # 16: an otherwise unused id
MODADD_K = 3
VOCAB_SIZE = 32
MIN_LEN, MAX_LEN = 3, 8
TASKS = ("reverse", "modadd")
PRETRAIN_TASK = "copy"
SETUPS = ("random", "pretrained")
EVAL_SEED_OFFSET = 1_000_003


def _ensure_mft():
    """Import merge_fast.torch (from python/ of this repo if needed, without the Rust core)."""
    import importlib
    import types

    try:
        return importlib.import_module("merge_fast.torch")
    except ImportError:
        pass
    py = str(Path(__file__).resolve().parents[2] / "python")
    if py not in sys.path:
        sys.path.insert(0, py)
    try:
        return importlib.import_module("merge_fast.torch")
    except ImportError:
        stub = types.ModuleType("merge_fast")
        stub.__path__ = [str(Path(py) / "merge_fast")]
        sys.modules["merge_fast"] = stub
        try:
            return importlib.import_module("merge_fast.torch")
        finally:
            if sys.modules.get("merge_fast") is stub:
                del sys.modules["merge_fast"]


# ----------------------------------------------------------------------------- tasks


def make_example(task: str, g: torch.Generator):
    """(tokens, n_prompt): the first n_prompt tokens are the prompt (not scored)."""
    n = int(torch.randint(MIN_LEN, MAX_LEN + 1, (1,), generator=g))
    x = torch.randint(0, N_SYM, (n,), generator=g).tolist()
    if task == "reverse":
        prompt = [BOS, T_REV] + [SYM0 + v for v in x] + [SEP]
        ans = [SYM0 + v for v in reversed(x)] + [EOS]
    elif task == "modadd":
        prompt = [BOS, T_ADD] + [SYM0 + v for v in x] + [SEP]
        ans = [SYM0 + (v + MODADD_K) % N_SYM for v in x] + [EOS]
    elif task == "copy":
        prompt = [BOS, T_COPY] + [SYM0 + v for v in x] + [SEP]
        ans = [SYM0 + v for v in x] + [EOS]
    else:
        raise ValueError(f"unknown task {task!r}; tasks: {TASKS + (PRETRAIN_TASK,)}")
    return prompt + ans, len(prompt)


def make_dataset(task: str, n: int, seed: int):
    g = torch.Generator().manual_seed(int(seed))
    return [make_example(task, g) for _ in range(n)]


def collate(examples) -> Dict[str, torch.Tensor]:
    """Right-padded batch; labels = tokens on the answer (the model shifts), -100 elsewhere."""
    L = max(len(t) for t, _ in examples)
    ids = torch.full((len(examples), L), PAD, dtype=torch.long)
    am = torch.zeros_like(ids)
    lb = torch.full_like(ids, -100)
    for i, (t, p) in enumerate(examples):
        ids[i, :len(t)] = torch.tensor(t)
        am[i, :len(t)] = 1
        lb[i, p:len(t)] = torch.tensor(t[p:])
    return {"input_ids": ids, "attention_mask": am, "labels": lb}


def batches(examples, batch_size):
    for s in range(0, len(examples), batch_size):
        yield collate(examples[s:s + batch_size])


# ----------------------------------------------------------------------------- model


def make_config(hidden=128, layers=4, heads=4, inter=None):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads,
                       intermediate_size=inter or 4 * hidden, max_position_embeddings=64,
                       tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS,
                       pad_token_id=PAD, attn_implementation="sdpa")


def load_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def train(model, task, steps, seed, batch_size=64, lr=1e-3, warmup=20, log=None):
    """AdamW, linear warmup + cosine decay, fresh random examples every step (seeded)."""
    g = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    for step in range(steps):
        b = collate([make_example(task, g) for _ in range(batch_size)])
        loss = model(**b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log and (step % max(1, steps // 5) == 0 or step == steps - 1):
            log(f"  [{task}] step {step:4d} loss {loss.item():.4f}")
    model.eval()
    return model


@torch.no_grad()
def evaluate_model(model, task, n=512, seed=0, batch_size=128) -> Dict[str, float]:
    """Held-out mean per-token loss (answer tokens + EOS), teacher-forced token accuracy and
    exact-match sequence accuracy."""
    model.eval()
    data = make_dataset(task, n, seed + EVAL_SEED_OFFSET)
    tot_loss = tot_tok = tot_ok = seq_ok = 0.0
    for b in batches(data, batch_size):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        lg, lb = logits[:, :-1].float(), b["labels"][:, 1:]
        valid = lb != -100
        ce = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1),
                                               ignore_index=-100, reduction="sum")
        ok = (lg.argmax(-1) == lb) & valid
        tot_loss += ce.item()
        tot_tok += valid.sum().item()
        tot_ok += ok.sum().item()
        seq_ok += ((ok | ~valid).all(-1)).sum().item()
    return {"loss": tot_loss / tot_tok, "token_acc": tot_ok / tot_tok, "seq_acc": seq_ok / len(data)}


def evaluate(model_dir, task, n=512, seed=0) -> Dict[str, float]:
    """Load a saved model folder and evaluate it on ``task``'s held-out set."""
    return evaluate_model(load_model(model_dir), task, n=n, seed=seed)


# ----------------------------------------------------------------------------- setup


@dataclass
class QualitySetup:
    workdir: str
    seed: int
    steps: int
    tasks: List[str]
    base: str
    models: List[str]          # fine-tuned model folders, one per task (same order as tasks)
    fishers: List[str]         # Fisher safetensors files, one per task
    config: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    setup: str = "random"      # "random" | "pretrained" (see the module docstring)
    init: Optional[str] = None  # the random init folder ("pretrained": base = after warm-up)

    @property
    def dirs(self) -> List[str]:
        """[base, model_task0, model_task1] - the ``dirs`` argument of a merge callable."""
        return [self.base] + list(self.models)

    def save(self):
        Path(self.workdir, "setup.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, workdir):
        return cls(**json.loads(Path(workdir, "setup.json").read_text()))


def make_quality_setup(workdir, seed: int = 0, steps: int = 200, *, hidden: int = 128,
                       layers: int = 2, heads: int = 4, batch_size: int = 32,
                       lr: Optional[float] = None, n_fisher: int = 256,
                       fisher_mode: str = "empirical", tasks: Sequence[str] = TASKS,
                       setup: str = "random", pretrain_steps: int = 500,
                       pretrain_lr: float = 2e-3, threads: Optional[int] = 1,
                       verbose: bool = False) -> QualitySetup:
    """Build the benchmark inputs in ``workdir``:

    ``init/`` (the shared random init), ``base/`` (the model both fine-tunes start from),
    ``<task>/`` (fine-tuned copies, ``steps`` AdamW steps each on their own task),
    ``fisher_<task>.safetensors`` (empirical Fisher of each fine-tune on ``n_fisher`` examples
    of its own task, per-sequence log-likelihood of the answer), and ``setup.json``. All
    Hugging Face folders are written with ``save_pretrained`` (safetensors).

    ``setup="random"`` (the literal setup): ``base`` = the random init; fine-tune lr
    ``lr`` (default 2e-3).
    ``setup="pretrained"``: ``base`` = the random init after ``pretrain_steps`` AdamW steps
    (lr ``pretrain_lr``) on the generic ``copy`` task; fine-tune lr ``lr`` (default 1e-3,
    half the warm-up lr, as fine-tuning usually uses a smaller lr than pretraining).

    The full default takes about one ("random") or two ("pretrained") minutes on one CPU
    thread; the test-suite size takes a few seconds.
    """
    from transformers import LlamaForCausalLM

    if setup not in SETUPS:
        raise ValueError(f"unknown setup {setup!r}; setups: {SETUPS}")
    if lr is None:
        lr = 2e-3 if setup == "random" else 1e-3
    mft = _ensure_mft()
    if threads:  # 1 by default: on a shared 2-core box, 2 OMP threads can be 5-10x slower
        torch.set_num_threads(threads)
    log = print if verbose else None
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    cfg = make_config(hidden, layers, heads)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(str(wd / "init"))
    timings = {}
    if setup == "pretrained":
        t0 = time.time()
        train(base, PRETRAIN_TASK, pretrain_steps, seed=seed * 7919 + 7,
              batch_size=batch_size, lr=pretrain_lr, log=log)
        timings["pretrain"] = {"train_s": round(time.time() - t0, 2)}
    base.save_pretrained(str(wd / "base"))
    init = {k: v.clone() for k, v in base.state_dict().items()}
    models, fishers = [], []
    for ti, task in enumerate(tasks):
        t0 = time.time()
        m = LlamaForCausalLM(cfg)
        m.load_state_dict(init)
        train(m, task, steps, seed=seed * 7919 + 101 * (ti + 1), batch_size=batch_size, lr=lr,
              log=log)
        t1 = time.time()
        d = wd / task
        m.save_pretrained(str(d))
        data = make_dataset(task, n_fisher, seed * 31 + 17 + ti)
        f = mft.estimate_fisher(m, batches(data, 32), mode=fisher_mode, device="cpu",
                                seed=seed)
        fp = wd / f"fisher_{task}.safetensors"
        mft.save_fisher(f, fp, {"model": task, "task": task})
        timings[task] = {"train_s": round(t1 - t0, 2), "fisher_s": round(time.time() - t1, 2)}
        if log:
            log(f"  [{task}] train {t1 - t0:.1f}s, fisher {time.time() - t1:.1f}s")
        models.append(str(d))
        fishers.append(str(fp))
    config = {"hidden": hidden, "layers": layers, "heads": heads, "batch_size": batch_size,
              "lr": lr, "n_fisher": n_fisher, "fisher_mode": fisher_mode,
              "n_params": sum(p.numel() for p in base.parameters())}
    if setup == "pretrained":
        config.update(pretrain_task=PRETRAIN_TASK, pretrain_steps=pretrain_steps,
                      pretrain_lr=pretrain_lr)
    qs = QualitySetup(workdir=str(wd), seed=seed, steps=steps, tasks=list(tasks),
                      base=str(wd / "base"), models=models, fishers=fishers, config=config,
                      timings=timings, setup=setup, init=str(wd / "init"))
    qs.save()
    return qs


# ----------------------------------------------------------------------------- reference merges


def _read_state(model_dir) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update({k: v.float() for k, v in load_file(str(f)).items()})
    return out


def _write_like(template_dir, state, out_dir):
    model = load_model(template_dir)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k in dict(model.named_parameters())]:
        raise KeyError(f"state mismatch: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(str(out_dir))


def reference_merge(method_name: str, dirs: Sequence[str], fisher_paths: Sequence[str],
                    out_dir: str, *, weights: Optional[Sequence[float]] = None,
                    lam: float = 1.0, eps: float = 1e-8) -> str:
    """Torch stopgap merges, in float32, written as a model folder at ``out_dir``.

    ``dirs[0]`` is the base, ``dirs[1:]`` the fine-tunes; ``fisher_paths`` is aligned with
    ``dirs[1:]``. ``weights`` (λ_i) default to 1 each.

    * ``average``:          θ = Σ λ_i θ_i / Σ λ_i
    * ``task_arithmetic``:  θ = θ_base + lam · Σ λ_i (θ_i − θ_base)
      (``task_arithmetic_<x>``, e.g. ``task_arithmetic_0.5``: lam = x)
    * ``fisher``:           θ = Σ λ_i (F_i+ε) θ_i / Σ λ_i (F_i+ε)   (tensors without a Fisher:
      plain weighted average)
    """
    base_dir, models = dirs[0], list(dirs[1:])
    if method_name.startswith("task_arithmetic_"):
        method_name, lam = "task_arithmetic", float(method_name[len("task_arithmetic_"):])
    w = [1.0] * len(models) if weights is None else list(weights)
    states = [_read_state(d) for d in models]
    out = {}
    if method_name == "average":
        for k in states[0]:
            out[k] = sum(wi * s[k] for wi, s in zip(w, states)) / sum(w)
    elif method_name == "task_arithmetic":
        base = _read_state(base_dir)
        for k in base:
            out[k] = base[k] + lam * sum(wi * (s[k] - base[k]) for wi, s in zip(w, states))
    elif method_name == "fisher":
        mft = _ensure_mft()
        fs = [mft.load_fisher(p) for p in fisher_paths]
        for k in states[0]:
            if all(k in f for f in fs):
                num = sum(wi * (f[k] + eps) * s[k] for wi, f, s in zip(w, fs, states))
                den = sum(wi * (f[k] + eps) for wi, f in zip(w, fs))
                out[k] = num / den
            else:
                out[k] = sum(wi * s[k] for wi, s in zip(w, states)) / sum(w)
    else:
        raise ValueError(f"reference_merge: unknown method {method_name!r}")
    _write_like(models[0], out, out_dir)
    return str(out_dir)
