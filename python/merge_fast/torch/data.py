"""Small data helpers for Fisher estimation: jsonl texts -> token ids -> padded batches.

Batches are dicts of ``input_ids`` / ``attention_mask`` / ``labels`` (LongTensor ``(B, L)``),
**right**-padded, with ``labels = input_ids`` on real tokens and ``-100`` on padding (Hugging
Face convention: the model, or :func:`merge_fast.torch.fisher.sequence_log_likelihood`,
shifts labels by one).
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch

__all__ = ["load_jsonl_texts", "tokenize_texts", "make_batches"]


def load_jsonl_texts(path: Union[str, os.PathLike], max_examples: Optional[int] = None,
                     text_key: str = "text") -> List[str]:
    """Read ``{"text": ...}`` objects, one per line (blank lines skipped). A line that is not a
    JSON object with a string ``text_key`` raises ``ValueError`` naming file and line."""
    texts: List[str] = []
    with open(os.fspath(path), "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string "
                                 f"{text_key!r} field")
            texts.append(obj[text_key])
            if max_examples is not None and len(texts) >= max_examples:
                break
    return texts


def tokenize_texts(tokenizer, texts: Sequence[str], seq_len: int = 512,
                   add_special_tokens: bool = True) -> List[List[int]]:
    """Tokenize each text with the model's tokenizer, truncated to ``seq_len`` tokens. Texts
    with fewer than 2 tokens (nothing to predict) are dropped."""
    out: List[List[int]] = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=add_special_tokens, truncation=True,
                        max_length=seq_len)["input_ids"]
        ids = list(ids)
        if len(ids) >= 2:
            out.append(ids)
    return out


def make_batches(examples: Sequence[Sequence[int]], batch_size: int, pad_id: int = 0,
                 label_mask: Optional[Sequence[Sequence[int]]] = None
                 ) -> Iterator[Dict[str, torch.Tensor]]:
    """Yield right-padded batches. ``label_mask`` (same ragged shape as ``examples``; 1 = predict
    this token, 0 = ignore, e.g. a prompt) optionally restricts the labels."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        lm = None if label_mask is None else label_mask[s:s + batch_size]
        L = max(len(e) for e in chunk)
        ids = torch.full((len(chunk), L), int(pad_id), dtype=torch.long)
        am = torch.zeros((len(chunk), L), dtype=torch.long)
        labels = torch.full((len(chunk), L), -100, dtype=torch.long)
        for i, e in enumerate(chunk):
            n = len(e)
            t = torch.as_tensor(list(e), dtype=torch.long)
            ids[i, :n] = t
            am[i, :n] = 1
            if lm is None:
                labels[i, :n] = t
            else:
                keep = torch.as_tensor(list(lm[i]), dtype=torch.bool)
                labels[i, :n] = torch.where(keep, t, torch.full_like(t, -100))
        yield {"input_ids": ids, "attention_mask": am, "labels": labels}
