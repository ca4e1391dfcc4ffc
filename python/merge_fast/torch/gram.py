"""Gram matrices of the inputs of every linear layer, for RegMean (Jin et al. 2023).

For each ``nn.Linear`` (and Hugging Face ``Conv1D``, GPT-2's linear layer) the statistic is

    G = Σ_t x_t x_tᵀ  (= XᵀX, shape [in, in])

summed over every real token ``t`` the layer sees (positions where ``attention_mask`` is 0 are
excluded), accumulated in float32 by forward pre-hooks, together with the number of tokens.
The sum (not the mean) is stored: sums from several data shards, ranks or machines add up,
and ``G / n_tokens`` is one division away (``n_tokens`` is in the metadata).

Keys are the checkpoint names of the layers' weights (``model.layers.0.self_attn.q_proj.weight``),
so a Gram file sits beside the model like a Fisher file. A layer whose weight is tied to
another parameter (``lm_head`` sharing the embedding) is skipped: its weight is not a tensor of
its own in the checkpoint, and the embedding is not a linear map of its inputs. ``Conv1D``
weights are stored ``[in, out]``; their names are listed in the metadata (``fan_in_fan_out``)
so the merge reads them the right way round.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch

from .fisher import _dist_setup, _resolve_device, data_arguments, load_stats, save_stats, tied_parameter_names

__all__ = ["GramResult", "estimate_gram", "save_gram", "load_gram", "gram_main"]

ModuleSelector = Union[None, str, Callable[[str], bool]]


class GramResult(dict):
    """``dict[weight name -> float32 Gram [in, in] on CPU]`` with ``.metadata``:
    ``n_tokens`` (weight name -> tokens seen), ``n_examples``, ``fan_in_fan_out`` (names of
    ``Conv1D`` weights, stored ``[in, out]``), ``skipped_tied`` (tied weights left out)."""

    def __init__(self, *args, metadata: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.metadata: dict = dict(metadata or {})


def _is_conv1d(m: torch.nn.Module) -> bool:
    # transformers' Conv1D (GPT-2 family), recognised without importing transformers.
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def _linear_modules(model: torch.nn.Module, modules: ModuleSelector):
    """(module name, module, weight name, in_features, is_conv1d), tied weights excluded."""
    tied = tied_parameter_names(model)
    if isinstance(modules, str):
        rx = re.compile(modules)
        keep = lambda n: rx.search(n) is not None  # noqa: E731
    else:
        keep = modules or (lambda n: True)
    out, skipped = [], []
    for name, m in model.named_modules():
        conv = _is_conv1d(m)
        if not (isinstance(m, torch.nn.Linear) or conv):
            continue
        wname = f"{name}.weight" if name else "weight"
        if not keep(wname):
            continue
        if wname in tied:
            skipped.append(wname)
            continue
        n_in = m.weight.shape[0] if conv else m.in_features
        out.append((name, m, wname, int(n_in), conv))
    return out, skipped


def estimate_gram(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    device=None,
    modules: ModuleSelector = None,
    progress: bool = False,
    max_examples: Optional[int] = None,
    distributed: bool = False,
) -> GramResult:
    """Gram matrix ``XᵀX`` of the inputs of every linear layer (see the module docstring).

    Args:
      model: any torch module (e.g. an ``AutoModelForCausalLM``) taking ``input_ids`` and
        ``attention_mask``.
      batches: iterable of dicts with ``input_ids`` (B, L) and optionally ``attention_mask``
        (B, L; 0 = padding, excluded). Other keys (``labels``) are ignored.
      device: as :func:`merge_fast.torch.estimate_fisher`.
      modules: ``None`` (all linear layers), a regex on the weight name (``re.search``), or a
        predicate on the weight name.
      progress: tqdm bar over batches.
      max_examples: stop after this many examples (rows of the batches).
      distributed: one rank of a ``torch.distributed`` job (``torchrun``): rank ``r`` of ``W``
        runs batches ``r, r+W, ...``; the sums and token counts are all-reduced once at the
        end, so every rank returns the Gram of all the data (the single-process result up to
        float32 round-off of the summation order).

    Returns a :class:`GramResult`. The model is run in ``eval()`` mode under ``no_grad``.
    """
    rank, world = _dist_setup(device) if distributed else (0, 1)
    if distributed and device is None and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    dev = _resolve_device(model, device)
    model.to(dev)
    layers, skipped = _linear_modules(model, modules)
    if not layers:
        raise ValueError("estimate_gram: the model has no (selected) nn.Linear or Conv1D layer")
    acc = {w: torch.zeros((n, n), dtype=torch.float32, device=dev) for _, _, w, n, _ in layers}
    counts = {w: 0 for _, _, w, _, _ in layers}
    mask_now: Dict[str, Optional[torch.Tensor]] = {"m": None}

    def hook_for(wname: str, n_in: int):
        def hook(_mod, args):
            x = args[0] if args else None
            if not torch.is_tensor(x) or x.shape[-1] != n_in:
                return
            m = mask_now["m"]
            x2 = x.reshape(-1, n_in)
            if m is not None and m.numel() == x2.shape[0]:
                # Leading dims are (B, L) in the batch's layout: drop the padding rows.
                x2 = x2[m.reshape(-1)]
            x2 = x2.float()
            acc[wname].addmm_(x2.t(), x2)
            counts[wname] += int(x2.shape[0])
        return hook

    handles = [m.register_forward_pre_hook(hook_for(w, n)) for _, m, w, n, _ in layers]
    was_training = model.training
    model.eval()
    it: Iterable = batches
    bar = None
    if progress and rank == 0:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(batches, desc="gram", unit="batch")
            it = bar
        except ImportError:  # pragma: no cover
            pass
    n_examples = 0
    seen = 0
    try:
        with torch.no_grad():
            for bi, batch in enumerate(it):
                if "input_ids" not in batch:
                    raise KeyError("each batch must be a dict with at least 'input_ids'")
                ids = torch.as_tensor(batch["input_ids"])
                if ids.dim() == 1:
                    ids = ids.unsqueeze(0)
                am = batch.get("attention_mask")
                am = torch.ones_like(ids) if am is None else torch.as_tensor(am).reshape(ids.shape)
                if max_examples is not None:
                    room = max_examples - seen
                    if room <= 0:
                        break
                    ids, am = ids[:room], am[:room]
                seen += ids.shape[0]
                if bi % world != rank:
                    continue
                ids, am = ids.long().to(dev), am.long().to(dev)
                mask_now["m"] = am.bool()
                model(input_ids=ids, attention_mask=am)
                n_examples += ids.shape[0]
    finally:
        mask_now["m"] = None
        for h in handles:
            h.remove()
        if bar is not None:
            bar.close()
        model.train(was_training)

    names = [w for _, _, w, _, _ in layers]
    if distributed:
        import torch.distributed as dist

        c = torch.tensor([n_examples] + [counts[w] for w in names], dtype=torch.float64, device=dev)
        dist.all_reduce(c)
        for w in names:
            dist.all_reduce(acc[w])
        n_examples = int(c[0])
        counts = {w: int(v) for w, v in zip(names, c[1:].tolist())}
    if n_examples == 0:
        raise ValueError("estimate_gram: no examples in batches")
    never = [w for w in names if counts[w] == 0]
    if never:
        raise ValueError(f"estimate_gram: {len(never)} linear layer(s) never ran on the data, e.g. {never[:3]} "
                         f"(select the layers the forward pass uses with modules=...)")
    return GramResult(
        {w: acc[w].cpu() for w in names},
        metadata={
            "n_examples": n_examples,
            "n_tokens": counts,
            "fan_in_fan_out": [w for _, _, w, _, conv in layers if conv],
            "skipped_tied": skipped,
            **({"world_size": world} if distributed else {}),
        },
    )


_JSON_KEYS = ("n_examples", "n_tokens", "fan_in_fan_out", "skipped_tied", "world_size")


def save_gram(gram: Mapping[str, torch.Tensor], path: Union[str, os.PathLike],
              metadata: Optional[Mapping] = None) -> None:
    """Write Grams as one safetensors file (float32 ``[in, in]`` per weight name) with string
    metadata (``format=merge_fast.gram``; ``n_tokens`` etc. JSON-encoded). Written to a
    temporary file, then renamed."""
    save_stats(gram, path, metadata, "merge_fast.gram")


def load_gram(path: Union[str, os.PathLike], device="cpu") -> GramResult:
    """Read a file written by :func:`save_gram` (metadata decoded back to ints/dicts/lists)."""
    tensors, out = load_stats(path, device, _JSON_KEYS)
    return GramResult(tensors, metadata=out)


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merge-fast gram",
        description="Gram matrices XᵀX of the inputs of every linear layer of a causal LM on a jsonl "
                    "text file (RegMean statistics), written as safetensors keyed by weight name.")
    data_arguments(p, params_help="regex: only layers whose weight name matches (re.search)",
                   dtype_help="dtype to load the model in (default float32; Grams are float32 always)")
    return p


def gram_main(argv: Optional[Sequence[str]] = None) -> int:
    """``merge-fast gram MODEL_DIR --data texts.jsonl --out G.safetensors [...]``. Returns 0."""
    args = _build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from .._output import check_output_file

    check_output_file(args.out, [args.model_dir, args.data])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import load_jsonl_texts, make_batches, tokenize_texts

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
    texts = load_jsonl_texts(args.data, max_examples=args.max_examples, text_key=args.text_key)
    examples = tokenize_texts(tok, texts, seq_len=args.seq_len)
    if not examples:
        raise SystemExit(f"merge-fast gram: no usable example in {args.data} (need texts of at least 2 tokens)")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    n_batches = math.ceil(len(examples) / args.batch_size)

    class _Sized:
        def __iter__(self):
            return make_batches(examples, args.batch_size, pad_id)

        def __len__(self):
            return n_batches

    distributed = args.distributed if args.distributed is not None else "WORLD_SIZE" in os.environ
    gram = estimate_gram(model, _Sized(), device=args.device, modules=args.params,
                         progress=not args.quiet, distributed=distributed)
    if distributed:
        import torch.distributed as dist

        if dist.get_rank() != 0:  # every rank holds the same all-reduced sums; rank 0 writes
            dist.barrier()
            return 0
    name = getattr(model.config, "_name_or_path", "") or os.path.basename(os.path.abspath(args.model_dir))
    save_gram(gram, args.out, {"model": str(name), "model_type": str(getattr(model.config, "model_type", "")),
                               "data": os.path.basename(args.data), "seq_len": str(args.seq_len)})
    if not args.quiet:
        m = gram.metadata
        print(f"wrote {args.out}: {len(gram)} Gram matrices, examples={m['n_examples']}, "
              f"tokens={max(m['n_tokens'].values())}")
    if distributed:
        dist.barrier()
    return 0


main = gram_main
