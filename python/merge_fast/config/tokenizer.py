"""Which tokenizer the output gets (``tokenizer_source``), and whether embedding rows must
be permuted to it.

- unset: the base model's tokenizer (else the first model's), copied as is;
- ``base`` / a model path: that tokenizer; every model must share its vocabulary;
- ``union``: works when every model has the same vocabulary (then it is that vocabulary).
  Different vocabularies (a union tokenizer and embedding rows gathered and permuted per
  model) are NOT implemented yet: they are refused with a ConfigError before anything is
  written. The engine already has the row-gathering source (``{kind: rows}``) this needs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

from .schema import MergeConfig, ModelRef


def _folder(ref: ModelRef) -> Path:
    p = Path(ref.path)
    return p if p.is_dir() else p.parent


def read_vocab(folder: Path) -> Optional[Dict[str, int]]:
    """token -> id from tokenizer.json (model vocab + added tokens); None if unreadable."""
    f = folder / "tokenizer.json"
    if not f.is_file():
        return None
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except ValueError:
        return None
    vocab: Dict[str, int] = {}
    v = (d.get("model") or {}).get("vocab")
    if isinstance(v, dict):
        vocab.update(v)
    elif isinstance(v, list):  # Unigram: [[token, score], ...]
        vocab.update({tok[0]: i for i, tok in enumerate(v)})
    for t in d.get("added_tokens") or []:
        vocab[t["content"]] = t["id"]
    return vocab


def plan_vocabulary(cfg: MergeConfig, plan) -> None:
    src = cfg.src
    ts = cfg.tokenizer_source
    if ts is None:
        plan.vocab = {"tokenizer_folder": _folder(plan.donor.ref)}
        return
    if ts == "base":
        if cfg.base_model is None:
            raise src.error(("tokenizer_source",), "tokenizer_source: base needs a base_model")
        tok = _folder(cfg.base_model)
    elif ts == "union":
        tok = _folder(plan.donor.ref)
    else:
        tok = _folder(ts)
    ref_vocab = read_vocab(tok)
    for info in plan.models.values():
        v = read_vocab(_folder(info.ref))
        if ref_vocab is not None and v is not None and v != ref_vocab:
            what = ("a union of different vocabularies" if ts == "union"
                    else f"permuting embedding rows to the tokenizer of {tok}")
            raise src.error(("tokenizer_source",), f"{info.ref} has a different vocabulary; {what} is not supported yet "
                                                   "(merge models that share a tokenizer)")
    plan.vocab = {"tokenizer_folder": tok}
