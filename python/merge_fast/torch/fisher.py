"""Diagonal Fisher information estimation for causal language models.

Definition used here (Matena & Raffel 2022, diagonal Fisher)::

    F[j] = (1/N) * sum_n ( d/dθ_j  log p_θ(y_n | x_n) )**2

* ``log p_θ(y_n | x_n)`` is the **per-sequence** log-likelihood: the sum over the example's
  predicted tokens (every position whose label is not ``-100``) of ``log p(y_t | x_<t)``.
  We deliberately sum (not average) over tokens: the sequence is the unit of "one example"
  and a sum is the log-likelihood of that example; the price is that F scales with the number
  of tokens per example (``n_tokens / n_examples`` in the metadata tells you by how much).
* The gradient is taken **per example** and then squared. Squaring the gradient of a batch's
  summed loss is a different (and wrong) quantity, because cross terms between examples do
  not vanish. Per-example gradients are computed with ``torch.func`` (``functional_call`` +
  ``vmap(grad(...))``); if ``vmap`` fails on a model (data-dependent control flow, unsupported
  op), we fall back to a plain loop over examples (one forward/backward each). Both give the
  same numbers.
* ``mode="empirical"`` uses the data's labels (the "empirical Fisher").
  ``mode="sampled"`` replaces every non-ignored label by a token drawn from the model's own
  predictive distribution at that position (``torch.multinomial`` with a seeded generator),
  teacher-forced on the data's inputs: the "true" Fisher, estimated with one sample per token.
* Labels follow the Hugging Face convention: ``labels`` is aligned with ``input_ids``, the
  logits at position ``t-1`` predict ``labels[t]``; ``labels[:, 0]`` is never predicted.
* Squares are accumulated in float32 buffers (one per tracked parameter) whatever the model
  dtype. The model is put in ``eval()`` mode (no dropout) during estimation and restored after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch

__all__ = [
    "FisherResult",
    "estimate_fisher",
    "sample_labels",
    "sequence_log_likelihood",
    "tied_parameter_names",
    "save_fisher",
    "load_fisher",
    "fisher_main",
    "main",
]

ParamSelector = Union[None, Sequence[str], Callable[[str, torch.nn.Parameter], bool], Callable[[str], bool]]


class FisherResult(dict):
    """``dict[str, torch.Tensor]`` (parameter name -> float32 diagonal Fisher, on CPU) with a
    ``.metadata`` attribute: ``mode``, ``n_examples``, ``n_tokens``, ``seed``, ``method``
    (``"vmap"``, ``"loop"`` or ``"vmap+loop"``), ``tied_weights`` (alias -> stored name)."""

    def __init__(self, *args, metadata: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.metadata: dict = dict(metadata or {})


# ----------------------------------------------------------------------------- helpers


def _resolve_device(model: torch.nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    try:
        p = next(model.parameters())
        if p.device.type != "cpu" and p.device.type != "meta":
            return p.device
    except StopIteration:
        pass
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tied_parameter_names(model: torch.nn.Module) -> Dict[str, str]:
    """Map alias name -> name returned by ``named_parameters()`` for tied (shared) parameters,
    e.g. ``{"lm_head.weight": "model.embed_tokens.weight"}`` for a model with tied embeddings.

    ``named_parameters()`` (and hence the Fisher dict) lists a shared parameter once, under its
    first name; ``state_dict()`` lists it under every name. The Fisher of a tied parameter is
    the Fisher of the shared tensor (its gradient sums both uses), stored under the first name.
    """
    first: Dict[int, str] = {}
    aliases: Dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def _select_params(model: torch.nn.Module, params: ParamSelector) -> List[str]:
    all_named = list(model.named_parameters())
    names = [n for n, _ in all_named]
    if params is None:
        return [n for n, p in all_named if p.requires_grad] or names
    if callable(params):
        pred: Callable[..., bool] = params  # takes (name, parameter) or (name): tried in that order
        out = []
        for n, p in all_named:
            try:
                keep = pred(n, p)
            except TypeError:
                keep = pred(n)
            if keep:
                out.append(n)
        if not out:
            raise ValueError("params predicate selected no parameter")
        return out
    if isinstance(params, str):
        params = [params]
    wanted = list(params)
    aliases = tied_parameter_names(model)
    known = set(names)
    out = []
    for n in wanted:
        n2 = aliases.get(n, n)
        if n2 not in known:
            raise KeyError(f"parameter {n!r} is not a parameter of the model "
                           f"(e.g. {names[:3]}...)")
        if n2 not in out:
            out.append(n2)
    return out


def _logits(out):
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def sequence_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence log-likelihood ``sum_t log p(labels[t] | x_<t)`` (HF shift convention:
    ``logits[..., t-1, :]`` predicts ``labels[..., t]``; ``-100`` is ignored). Works on
    ``(L, V)``/``(L,)`` or ``(B, L, V)``/``(B, L)`` (then returns shape ``(B,)``). float32."""
    lg = logits[..., :-1, :].float()
    lb = labels[..., 1:]
    valid = lb != -100
    logp = torch.log_softmax(lg, dim=-1)
    tok = torch.gather(logp, -1, lb.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * valid).sum(-1)


def _prepare_batch(batch: Mapping[str, torch.Tensor]):
    if "input_ids" not in batch:
        raise KeyError("each batch must be a dict with at least 'input_ids'")
    ids = torch.as_tensor(batch["input_ids"])
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    am = batch.get("attention_mask")
    am = torch.ones_like(ids) if am is None else torch.as_tensor(am).reshape(ids.shape)
    labels = batch.get("labels")
    if labels is None:
        labels = ids.masked_fill(am == 0, -100)
    else:
        labels = torch.as_tensor(labels).reshape(ids.shape)
    return ids.long(), am.long(), labels.long()


@torch.no_grad()
def sample_labels(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Labels for ``mode="sampled"``: every position ``t >= 1`` whose data label is not -100
    gets a token drawn from ``p_θ(· | x_<t)`` (one ``torch.multinomial`` call per batch over
    all such positions in row-major order, with ``generator``). Ignored positions stay -100.
    The model must be in eval mode for the draw to be reproducible."""
    logits = _logits(model(input_ids=input_ids, attention_mask=attention_mask)).float()
    out = torch.full_like(labels, -100)
    valid = labels[:, 1:] != -100
    if valid.any():
        probs = torch.softmax(logits[:, :-1, :][valid], dim=-1)
        draws = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        sub = out[:, 1:]
        sub[valid] = draws.to(out.dtype)
        out[:, 1:] = sub
    return out


def _is_right_padded(am: torch.Tensor) -> bool:
    """True if every row is ones followed by zeros (or all ones)."""
    if am.shape[1] <= 1:
        return True
    return bool((am[:, 1:] <= am[:, :-1]).all())


# ----------------------------------------------------------------------------- distributed


def _dist_setup(device) -> "tuple[int, int]":
    """(rank, world size) of the default process group, initialising it from the environment
    (``torchrun`` sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``) when needed."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("estimate_fisher(distributed=True): torch.distributed is not available")
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise RuntimeError("estimate_fisher(distributed=True): no process group and no "
                               "torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")
        on_gpu = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        dist.init_process_group(backend="nccl" if on_gpu else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _batch_seed(seed: int, batch_index: int) -> int:
    # A fixed mix of (seed, batch): the draws of batch i are the same on any rank and world size.
    return (int(seed) * 1_000_003 + batch_index * 7_919 + 12_345) % (2 ** 63)


def _all_reduce(acc: Dict[str, torch.Tensor], n_examples: int, n_tokens: int, methods: set, dev):
    """Sums the per-rank squares (in place) and counts: one collective per tensor, once."""
    import torch.distributed as dist

    # float64 counts are exact far beyond any data set size; the flags are 0/1 sums.
    counts = torch.tensor([n_examples, n_tokens, "vmap" in methods, "loop" in methods],
                          dtype=torch.float64, device=dev)
    dist.all_reduce(counts)
    for n in acc:
        dist.all_reduce(acc[n])
    c = [int(x) for x in counts.tolist()]
    used = {m for m, k in (("vmap", c[2]), ("loop", c[3])) if k > 0}
    return c[0], c[1], used


# ----------------------------------------------------------------------------- estimation


def estimate_fisher(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    mode: str = "empirical",
    device=None,
    params: ParamSelector = None,
    progress: bool = False,
    seed: int = 0,
    max_examples: Optional[int] = None,
    chunk_size: Optional[int] = None,
    use_vmap: bool = True,
    distributed: bool = False,
) -> FisherResult:
    """Diagonal Fisher of a causal LM: mean over examples of squared per-example gradients of
    the per-sequence log-likelihood (see the module docstring).

    Args:
      model: a causal LM whose forward takes ``input_ids``/``attention_mask`` and returns
        logits (``.logits`` or first tuple element), e.g. any ``AutoModelForCausalLM``.
      batches: iterable of dicts with ``input_ids`` (B, L), ``attention_mask`` (B, L) and
        ``labels`` (B, L; padding and prompt positions = -100; HF alignment, the model's shift).
        Missing ``labels`` default to ``input_ids`` with padding masked. Right padding is
        preferred (it lets the vmap path drop the mask exactly); left padding is handled by the
        loop path.
      mode: ``"empirical"`` (data labels) or ``"sampled"`` (labels drawn from the model).
      device: ``None`` -> the model's device if it is already on an accelerator, else CUDA when
        available, else CPU. The model is moved there (``model.to(device)``) if needed.
      params: ``None`` (all parameters with ``requires_grad``; all if none do), a list of
        names, or a predicate ``f(name)`` / ``f(name, param)``.
      progress: show a tqdm bar over batches.
      seed: seed of the ``torch.Generator`` used by ``mode="sampled"``.
      max_examples: stop after this many examples.
      chunk_size: per-example gradients are materialized for this many examples at a time
        (memory: chunk_size x tracked parameter size). ``None`` -> whole batch.
      use_vmap: ``False`` forces the per-example loop.
      distributed: run as one rank of a ``torch.distributed`` job (e.g. under ``torchrun``;
        the process group is initialised from the environment if it is not yet: NCCL when
        CUDA is available, else gloo). Every rank iterates the same ``batches``; rank ``r``
        of ``W`` processes batches ``r, r+W, ...`` (``max_examples`` counts globally, in batch
        order), accumulates its squares locally, and the sums and counts are all-reduced once
        at the end, so every rank returns the Fisher of all examples: the single-process
        result up to float32 round-off of the summation order, whatever ``W``. In
        ``mode="sampled"`` the labels of batch ``i`` are drawn with a generator seeded from
        ``(seed, i)``, so the draws do not depend on ``W`` either (they differ from the
        non-distributed draws, which use one generator across batches).

    Returns a :class:`FisherResult` (``dict[name -> float32 CPU tensor]`` with ``.metadata``:
    ``mode``, ``n_examples``, ``n_tokens`` (predicted tokens), ``seed``, ``method``,
    ``tied_weights``). Names are ``named_parameters()`` names, which are the ``state_dict()``
    names for Hugging Face models (a tied parameter appears once; see
    :func:`tied_parameter_names`).
    """
    if mode not in ("empirical", "sampled"):
        raise ValueError(f"mode must be 'empirical' or 'sampled', got {mode!r}")
    from torch.func import functional_call, grad, vmap

    rank, world = _dist_setup(device) if distributed else (0, 1)
    if distributed and device is None and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    dev = _resolve_device(model, device)
    model.to(dev)
    was_training = model.training
    model.eval()

    names = _select_params(model, params)
    named = dict(model.named_parameters())
    tracked = {n: named[n].detach() for n in names}
    tracked_ids = {id(named[n]) for n in names}
    # Untracked parameters and buffers are constants of the functional call.
    others = {n: p.detach() for n, p in model.named_parameters() if id(p) not in tracked_ids}
    others.update({n: b for n, b in model.named_buffers()})
    acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=dev) for n, p in tracked.items()}
    # The loop path uses plain autograd: only tracked parameters need gradients (restored after).
    saved_rg = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(id(p) in tracked_ids)

    gen = None
    if mode == "sampled":
        gen = torch.Generator(device=dev)
        gen.manual_seed(int(seed))

    def loglik(tp, ids, am, lb):
        # ids, am, lb: (L,) for one example; attention_mask is dropped inside vmap (see below).
        full = dict(others)
        full.update(tp)
        kw = {"input_ids": ids.unsqueeze(0)}
        if am is not None:
            kw["attention_mask"] = am.unsqueeze(0)
        out = functional_call(model, full, (), kw)
        return sequence_log_likelihood(_logits(out)[0], lb)

    per_example_grad = vmap(grad(loglik), in_dims=(None, 0, None, 0))

    def loop_chunk(ids, am, lb):
        # One forward/backward per example with plain autograd. Exact also for left padding.
        gsq = {n: torch.zeros_like(a) for n, a in acc.items()}
        plist = [named[n] for n in names]
        for i in range(ids.shape[0]):
            with torch.enable_grad():
                out = model(input_ids=ids[i:i + 1], attention_mask=am[i:i + 1])
                ll = sequence_log_likelihood(_logits(out)[0], lb[i])
                if not ll.requires_grad:
                    continue
                gs = torch.autograd.grad(ll, plist, allow_unused=True)
            for n, g in zip(names, gs):
                if g is not None:
                    gsq[n] += g.float().pow(2)
        return gsq

    vmap_ok = use_vmap
    methods_used = set()
    n_examples = 0
    n_tokens = 0

    it: Iterable = batches
    bar = None
    if progress and rank == 0:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(batches, desc=f"fisher ({mode})", unit="batch")
            it = bar
        except ImportError:  # pragma: no cover
            pass

    # Silence torch.func's "no batching rule" performance warnings (SDPA on CPU).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        try:
            seen = 0  # examples of all ranks so far, in batch order (for max_examples)
            for bi, batch in enumerate(it):
                ids, am, lb = _prepare_batch(batch)
                if max_examples is not None:
                    room = max_examples - (seen if distributed else n_examples)
                    if room <= 0:
                        break
                    ids, am, lb = ids[:room], am[:room], lb[:room]
                seen += ids.shape[0]
                if bi % world != rank:
                    continue
                ids, am, lb = ids.to(dev), am.to(dev), lb.to(dev)
                if gen is not None:  # mode == "sampled"
                    if distributed:
                        gen.manual_seed(_batch_seed(seed, bi))
                    lb = sample_labels(model, ids, am, lb, gen)
                n_examples += ids.shape[0]
                n_tokens += int((lb[:, 1:] != -100).sum())
                cs = chunk_size or ids.shape[0]
                for s in range(0, ids.shape[0], cs):
                    cid, cam, clb = ids[s:s + cs], am[s:s + cs], lb[s:s + cs]
                    done = False
                    if vmap_ok and _is_right_padded(cam):
                        # Right padding + causal attention: real positions never attend to the
                        # padding that follows them, and padded labels are -100, so dropping
                        # the mask is exact (and avoids HF's data-dependent mask code in vmap).
                        try:
                            g = per_example_grad(tracked, cid, None, clb)
                            for n in names:
                                acc[n] += g[n].float().pow(2).sum(0)
                            del g
                            methods_used.add("vmap")
                            done = True
                        except Exception as e:  # noqa: BLE001 - any vmap failure -> loop
                            vmap_ok = False
                            warnings.warn(f"estimate_fisher: vmap per-example gradients failed "
                                          f"({type(e).__name__}: {str(e)[:200]}); falling back "
                                          f"to a loop over examples")
                    if not done:
                        gsq = loop_chunk(cid, cam, clb)
                        for n in names:
                            acc[n] += gsq[n]
                        methods_used.add("loop")
        finally:
            if bar is not None:
                bar.close()
            model.train(was_training)
            for n, p in model.named_parameters():
                p.requires_grad_(saved_rg[n])

    if distributed:
        n_examples, n_tokens, methods_used = _all_reduce(acc, n_examples, n_tokens, methods_used, dev)
    if n_examples == 0:
        raise ValueError("estimate_fisher: no examples in batches")
    result = FisherResult(
        {n: (a / n_examples).cpu() for n, a in acc.items()},
        metadata={
            "mode": mode,
            "n_examples": n_examples,
            "n_tokens": n_tokens,
            "seed": int(seed),
            "method": "+".join(sorted(methods_used, reverse=True)),
            "tied_weights": {a: t for a, t in tied_parameter_names(model).items() if t in acc},
            **({"world_size": world} if distributed else {}),
        },
    )
    return result


# ----------------------------------------------------------------------------- I/O


def save_fisher(fisher: Mapping[str, torch.Tensor], path: Union[str, os.PathLike],
                metadata: Optional[Mapping] = None) -> None:
    """Write the Fisher as a safetensors file: one float32 tensor per parameter under the
    model's own name, plus string metadata (``format=merge_fast.fisher``, ``mode``,
    ``n_examples``, ``n_tokens``, ``model``, ``tied_weights`` as JSON, ...). ``metadata``
    entries override those attached to a :class:`FisherResult`; non-string values are
    JSON-encoded (strings are kept as they are). Written to a temp file then renamed."""
    save_stats(fisher, path, metadata, "merge_fast.fisher")


def save_stats(stats: Mapping[str, torch.Tensor], path: Union[str, os.PathLike], metadata: Optional[Mapping],
               fmt: str) -> None:
    """One float32 tensor per name plus string metadata (the `metadata` attribute of `stats`,
    then `metadata`; non-strings JSON-encoded; ``format=fmt`` unless given), written to a
    temporary file and renamed: the Fisher and Gram files share this layout."""
    from safetensors.torch import save_file

    meta = dict(getattr(stats, "metadata", {}) or {})
    meta.update(dict(metadata or {}))
    meta.setdefault("format", fmt)
    str_meta = {str(k): (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items()}
    tensors = {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in stats.items()}
    path = os.fspath(path)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=str_meta)
    os.replace(tmp, path)


def load_stats(path: Union[str, os.PathLike], device, json_keys: Sequence[str]) -> "tuple[dict, dict]":
    """The tensors and metadata of a file written by :func:`save_stats`, the `json_keys`
    entries decoded back from JSON."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    out = {}
    for k, v in meta.items():
        if k in json_keys:
            try:
                out[k] = json.loads(v)
                continue
            except (TypeError, ValueError):
                pass
        out[k] = v
    return tensors, out


def load_fisher(path: Union[str, os.PathLike], device="cpu") -> FisherResult:
    """Read a file written by :func:`save_fisher`. Returns a :class:`FisherResult`;
    ``n_examples``/``n_tokens``/``seed`` come back as ints and ``tied_weights`` as a dict."""
    tensors, meta = load_stats(path, device, ("n_examples", "n_tokens", "seed", "tied_weights"))
    return FisherResult(tensors, metadata=meta)


# ----------------------------------------------------------------------------- CLI


def data_arguments(p: argparse.ArgumentParser, params_help: str, dtype_help: str,
                   own: Optional[Mapping[str, Sequence[tuple]]] = None) -> None:
    """The options ``merge-fast fisher`` and ``merge-fast gram`` share, in their --help order;
    ``own[option]``: a command's own ``(flags, kwargs)`` pairs, added right after ``option``."""
    shared: List[tuple] = [
        (("model_dir",), dict(help="Hugging Face model folder (model + tokenizer)")),
        (("--data",), dict(required=True, help="jsonl file, one {\"text\": ...} per line")),
        (("--out",), dict(required=True, help="output .safetensors path")),
        (("--max-examples",), dict(type=int, default=None)),
        (("--seq-len",), dict(type=int, default=512, help="truncate texts to L tokens")),
        (("--batch-size",), dict(type=int, default=8)),
        (("--device",), dict(default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")),
        (("--dtype",), dict(choices=["float32", "bfloat16", "float16", "auto"], default="float32", help=dtype_help)),
        (("--params",), dict(default=None, help=params_help)),
        (("--text-key",), dict(default="text")),
        (("--quiet",), dict(action="store_true", help="no progress bar / summary")),
        (("--distributed",), dict(action=argparse.BooleanOptionalAction, default=None,
                                  help="one rank of a torch.distributed job (default: on under torchrun, i.e. "
                                       "when WORLD_SIZE is set); rank 0 writes --out")),
    ]
    for flags, kwargs in shared:
        p.add_argument(*flags, **kwargs)
        for own_flags, own_kwargs in (own or {}).get(flags[0], ()):
            p.add_argument(*own_flags, **own_kwargs)


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merge-fast fisher",
        description="Estimate the diagonal Fisher of a causal LM on a jsonl text file and "
                    "write it as safetensors (tensor names = the model's parameter names).")
    data_arguments(p, params_help="regex: only parameters whose name matches (re.search)",
                   dtype_help="dtype to load the model in (default float32)", own={
                       "--out": [(("--mode",), dict(choices=["empirical", "sampled"], default="empirical"))],
                       "--batch-size": [(("--chunk-size",), dict(
                           type=int, default=None,
                           help="per-example gradients held at once (memory); default = batch size"))],
                       "--text-key": [(("--seed",), dict(type=int, default=0, help="seed for --mode sampled"))],
                   })
    return p


def fisher_main(argv: Optional[Sequence[str]] = None) -> int:
    """``merge-fast fisher MODEL_DIR --data texts.jsonl --out fisher.safetensors
    [--mode empirical|sampled] [--max-examples N] [--seq-len L] [--batch-size B]
    [--device DEV] [--dtype D] [--params REGEX] [--seed S] [--quiet]``. Returns 0."""
    args = _build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from .._output import check_output_file

    check_output_file(args.out, [args.model_dir, args.data])  # before loading anything
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import load_jsonl_texts, make_batches, tokenize_texts

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
    texts = load_jsonl_texts(args.data, max_examples=args.max_examples, text_key=args.text_key)
    examples = tokenize_texts(tok, texts, seq_len=args.seq_len)
    if not examples:
        raise SystemExit(f"merge-fast fisher: no usable example in {args.data} "
                         f"(need texts of at least 2 tokens)")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    n_batches = math.ceil(len(examples) / args.batch_size)

    class _Sized:
        def __iter__(self):
            return make_batches(examples, args.batch_size, pad_id)

        def __len__(self):
            return n_batches

    params = None
    if args.params:
        rx = re.compile(args.params)
        params = lambda n: rx.search(n) is not None  # noqa: E731
    distributed = args.distributed if args.distributed is not None else "WORLD_SIZE" in os.environ
    fisher = estimate_fisher(model, _Sized(), mode=args.mode, device=args.device, params=params,
                             progress=not args.quiet, seed=args.seed,
                             chunk_size=args.chunk_size, distributed=distributed)
    if distributed:
        import torch.distributed as dist

        rank = dist.get_rank()
        if rank != 0:  # every rank holds the same all-reduced Fisher; rank 0 writes it
            dist.barrier()
            return 0
    name = getattr(model.config, "_name_or_path", "") or os.path.basename(
        os.path.abspath(args.model_dir))
    save_fisher(fisher, args.out, {"model": str(name),
                                   "model_type": str(getattr(model.config, "model_type", "")),
                                   "data": os.path.basename(args.data),
                                   "seq_len": str(args.seq_len)})
    if not args.quiet:
        m = fisher.metadata
        print(f"wrote {args.out}: {len(fisher)} tensors, mode={m['mode']}, "
              f"examples={m['n_examples']}, tokens={m['n_tokens']}, method={m['method']}")
    if distributed:
        dist.barrier()  # the other ranks exit only once the file is in place
    return 0


main = fisher_main

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(fisher_main())
