"""Which tokenizer the output gets (``tokenizer_source``), and the embedding-row
permutations that go with it.

- unset: the base model's tokenizer (else the first model's), copied as is; models must
  then share a vocabulary size (a shape mismatch is reported otherwise);
- ``base``: the base model's tokenizer (else the first model's);
- a model path: that model's tokenizer;
- ``union``: the base tokenizer plus every other model's tokens not in it (appended as
  added tokens, in model order; built with transformers).

When a model's vocabulary differs from the output's, its vocabulary-indexed tensors
(embeddings, LM head) are read through a row-gathering source: output row ``j`` is the
model's own row for that token; for a token the model lacks, mergekit's rule: the row of
the only model that has it, else the base's row, else the mean of the models that have
it, else zeros. ``vocab_size`` in config.json is set to the output vocabulary.

``tokenizer: {source, tokens}`` (mergekit's form) is supported: per token, ``source: MODEL``
(that model's row), ``{kind: model_token, model, token | token_id}`` or ``{kind: zero}``,
with ``force: true`` to use it for every model, not only those lacking the token; tokens
missing from the output tokenizer are added to it. ``pad_to_multiple_of`` is not supported.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from ._source import ConfigSource
from .schema import MergeConfig, ModelRef, TokenSpec


def _folder(ref: ModelRef) -> Path:
    p = Path(ref.path)
    return p if p.is_dir() else p.parent


def read_vocab(folder: Path) -> Optional[Dict[str, int]]:
    """token -> id from tokenizer.json (model vocab + added tokens), else through
    transformers; None when the folder has no tokenizer."""
    f = folder / "tokenizer.json"
    if f.is_file():
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except ValueError:
            d = None
        if d is not None:
            vocab: Dict[str, int] = {}
            v = (d.get("model") or {}).get("vocab")
            if isinstance(v, dict):
                vocab.update(v)
            elif isinstance(v, list):  # Unigram: [[token, score], ...]
                vocab.update({tok[0]: i for i, tok in enumerate(v)})
            for t in d.get("added_tokens") or []:
                vocab[t["content"]] = t["id"]
            return vocab
    if not any((folder / n).is_file() for n in ("tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")):
        return None
    try:
        from transformers import AutoTokenizer

        return dict(AutoTokenizer.from_pretrained(str(folder)).get_vocab())
    except Exception:  # noqa: BLE001 - unreadable tokenizer: treated as absent
        return None


@dataclasses.dataclass
class VocabPlan:
    target: Dict[str, int]  # output token -> id
    size: int
    vocabs: Dict[Tuple[str, Optional[str]], Dict[str, int]]  # model key -> its vocab
    base_key: Optional[Tuple[str, Optional[str]]]
    tokenizer_folder: Optional[Path]
    src: ConfigSource  # for errors naming the config key of a token
    builder: Optional[Callable[[Path], None]] = None  # writes a built (union) tokenizer
    active: bool = False  # some model's vocabulary differs from the output's
    tokens: Dict[str, TokenSpec] = dataclasses.field(default_factory=dict)
    _cache: Dict = dataclasses.field(default_factory=dict)

    def _token_rows(self, spec: TokenSpec, tok: str, keys, vocabs) -> List[Tuple[int, int]]:
        if spec.kind == "zero":
            return []
        assert spec.model is not None  # every kind but "zero" names a model (schema.py)
        if spec.model.key not in keys:
            raise self.src.error(spec.path, f"token {tok!r} takes its embedding from {spec.model}, which is not an input "
                                            "of this tensor")
        m = keys.index(spec.model.key)
        if spec.kind == "model_token" and spec.token_id is not None:
            rid = spec.token_id
            if rid >= self._n_rows[m]:
                raise self.src.error(spec.path, f"token_id {rid} is out of range for {spec.model} ({self._n_rows[m]} rows)")
        else:
            name = spec.token if spec.kind == "model_token" else tok
            if name not in vocabs[m]:
                raise self.src.error(spec.path, f"token {name!r} is not in the vocabulary of {spec.model}")
            rid = vocabs[m][name]
        return [(m, rid)]

    def rows_for(self, keys: List[Tuple[str, Optional[str]]], n_rows: List[int], i: int) -> Optional[List[List[Tuple[int, int]]]]:
        """Row lists for source `i` of a tensor whose sources are the models `keys`
        (with `n_rows` rows each); None when the tensor can be read as it is."""
        ck = (tuple(keys), tuple(n_rows), i)
        if ck in self._cache:
            return self._cache[ck]
        vocabs = [{t: r for t, r in self.vocabs[k].items() if r < n} for k, n in zip(keys, n_rows)]
        self._n_rows = n_rows
        own = vocabs[i]
        forced = any(sp.force for sp in self.tokens.values())
        if not forced and n_rows[i] == self.size and all(own.get(t) == j for t, j in self.target.items()):
            self._cache[ck] = None
            return None
        base_i = keys.index(self.base_key) if self.base_key in keys else None
        rows: List[List[Tuple[int, int]]] = [[] for _ in range(self.size)]
        for tok, j in self.target.items():
            if j >= self.size:
                continue
            spec = self.tokens.get(tok)
            if tok in own and not (spec is not None and spec.force):
                rows[j] = [(i, own[tok])]
                continue
            if spec is not None:
                rows[j] = self._token_rows(spec, tok, keys, vocabs)
                continue
            present = [(m, v[tok]) for m, v in enumerate(vocabs) if tok in v]
            if len(present) == 1:
                rows[j] = present
            elif not present:
                rows[j] = []
            elif base_i is not None and tok in vocabs[base_i]:
                rows[j] = [(base_i, vocabs[base_i][tok])]
            else:
                rows[j] = present
        self._cache[ck] = rows
        return rows


def _union_tokenizer(base_folder: Path, folders: List[Path], sizes: List[Optional[int]]):
    from transformers import AutoTokenizer

    res = AutoTokenizer.from_pretrained(str(base_folder))
    have = set(res.get_vocab())
    normal: List[str] = []
    added = []
    seen_added = set()
    for folder, size in zip(folders, sizes):
        tok = AutoTokenizer.from_pretrained(str(folder))
        dec = tok.added_tokens_decoder
        added_names = {info.content for info in dec.values()}
        for t, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if size is not None and idx >= size:
                continue
            if t in added_names or t in have or t in normal:
                continue
            normal.append(t)
        for idx, info in sorted(dec.items()):
            if size is not None and idx >= size:
                continue
            if info.content not in seen_added:
                seen_added.add(info.content)
                added.append(info)
    if normal:
        res.add_tokens(normal)
    new_added = [a for a in added if a.content not in set(res.get_vocab())]
    if new_added:
        res.add_tokens(new_added)
    return res


def prepare(cfg: MergeConfig, planner) -> Optional[VocabPlan]:
    """The output vocabulary and tokenizer for `tokenizer_source`; None when unset."""
    src = cfg.src
    ts = cfg.tokenizer_source
    if ts is None:
        return None
    models = planner.models
    base_ref = cfg.base_model or cfg.referenced_models()[0]
    vocabs: Dict[Tuple[str, Optional[str]], Dict[str, int]] = {}
    for key, info in models.items():
        v = read_vocab(_folder(info.ref))
        if v is None:
            raise src.error(info.where, f"{info.ref} has no tokenizer, which tokenizer_source needs")
        vocabs[key] = v
    builder = None
    if ts == "base":
        folder = _folder(base_ref)
        target = vocabs[models[base_ref.key].ref.key]
    elif ts == "union":
        infos = [models[base_ref.key]] + [i for k, i in models.items() if k != base_ref.key]
        sizes = [i.config.get("vocab_size") if isinstance(i.config.get("vocab_size"), int) else None for i in infos]
        try:
            tok = _union_tokenizer(_folder(base_ref), [_folder(i.ref) for i in infos], sizes)
        except Exception as e:  # noqa: BLE001
            raise src.error(("tokenizer_source",), f"cannot build the union tokenizer: {e}") from None
        target = dict(tok.get_vocab())
        folder = None

        def builder(out: Path, tok=tok) -> None:
            _save(tok, out)
    else:
        info = models[ts.key]
        folder = _folder(ts)
        target = vocabs[ts.key]
        del info
    new = [t for t in cfg.tokens if t not in target]
    if new:
        if ts == "union":
            tok.add_tokens(new)
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(folder))
            tok.add_tokens(new)
            folder = None

            def builder(out: Path, tok=tok) -> None:
                _save(tok, out)
        target = dict(tok.get_vocab())
    size = max(target.values()) + 1 if target else 0
    return VocabPlan(target, size, vocabs, base_ref.key, folder, src, builder, tokens=cfg.tokens)


def _save(tok: Any, out: Path) -> None:
    """Saves a built tokenizer without the loading options transformers records in
    tokenizer_config.json (``local_files_only`` follows HF_HUB_OFFLINE at merge time, so the
    same merge online and offline would differ)."""
    tok.save_pretrained(str(out))
    p = Path(out) / "tokenizer_config.json"
    if p.exists():
        cfg = json.loads(p.read_text(encoding="utf-8"))
        if cfg.pop("local_files_only", None) is not None:
            p.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
