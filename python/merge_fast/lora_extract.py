"""LoRA extraction: a PEFT adapter approximating ``finetuned − base`` (the inverse of the
``base+adapter`` inputs), as mergekit-extract-lora does.

For every 2-D ``*.weight`` tensor (linear layers) the top-``rank`` SVD of
``Δ = W_ft − W_base`` (randomized and seeded, exact when the rank is close to full, or
always exact with ``exact=True``) gives ``B = U√S`` (out × r) and ``A = √S Vᵀ`` (r × in);
``lora_alpha = r`` so PEFT's scale is 1 and ``W_base + B A`` is the rank-r truncation.
With ``energy`` in (0, 1], each tensor keeps the fewest components whose share of
``|Δ|_F²`` reaches it (at most ``rank``; written to ``rank_pattern``/``alpha_pattern``).

As mergekit (without ``--embed-lora``): input embeddings and ``lm_head`` are not factored
but saved at full rank under ``modules_to_save``, and so are modules named in
``modules_to_save`` and modules with a changed tensor that is not a 2-D weight (norms,
biases); modules whose tensors are all unchanged are left out of ``modules_to_save``.

GPT-2's Conv1D weights (stored in × out) are written with ``fan_in_fan_out: true``.

Streamed: one tensor pair is read at a time; only the factors (and full-rank copies) are
kept until the adapter file is written. The relative reconstruction error
``|Δ − B A|_F / |Δ|_F`` of each factored tensor (0 for a zero delta) goes into the
safetensors metadata under ``merge_fast.lora_errors`` (JSON) and is returned.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Iterable, Optional, Union

import numpy as np

from . import _core
from ._errors import MergeError, TensorMismatch, config_error
from .plan import open_checkpoint
from .linalg import svd
from ._output import check_output_dir, staged_dir

PathLike = Union[str, Path]
_PREFIX = "base_model.model."
_FLOATS = ("F32", "F16", "BF16", "F64")
# Module names mergekit treats as embeddings (input and output).
_EMBED = re.compile(r"(^|\.)(embed_tokens|embed_in|embed_out|wte|wpe|word_embeddings|embed_positions|lm_head|embeddings)$")
_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_CONV1D_MODELS = ("gpt2",)


def _model_type(path: PathLike) -> Optional[str]:
    cfg = Path(path) / "config.json"
    try:
        return json.loads(cfg.read_text()).get("model_type") if cfg.is_file() else None
    except (OSError, ValueError):
        return None


def extract_lora(
    base: PathLike,
    finetuned: PathLike,
    rank: int,
    out: PathLike,
    *,
    energy: Optional[float] = None,
    modules_to_save: Iterable[str] = (),
    exact: bool = False,
    seed: int = 0,
    out_dtype: Optional[str] = None,
    overwrite: bool = False,
) -> Dict[str, float]:
    """Writes the PEFT adapter folder ``out`` (``adapter_config.json`` and
    ``adapter_model.safetensors``) approximating ``finetuned − base`` with rank ``rank``.
    ``modules_to_save``: module names (full, or their last component, as PEFT matches them)
    to store at full rank. ``out_dtype``: dtype of the written tensors (default: each
    tensor's dtype in ``finetuned``). ``overwrite`` replaces a previous output at ``out``.
    Returns ``{tensor name: relative error}`` for the factored tensors."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise config_error(f"extract_lora: rank must be a positive integer, got {rank!r}")
    if energy is not None and not (0.0 < float(energy) <= 1.0):
        raise config_error(f"extract_lora: energy must be in (0, 1], got {energy!r}")
    if out_dtype is not None and out_dtype not in _DTYPES:
        raise config_error(f"extract_lora: out_dtype must be one of {', '.join(_DTYPES)}, got {out_dtype!r}")
    check_output_dir(out, [base, finetuned], overwrite=overwrite)
    save = set(modules_to_save)
    b_ck, f_ck = open_checkpoint(base), open_checkpoint(finetuned)
    b_info = {n: (dt, tuple(s)) for n, dt, s in b_ck.tensors()}
    f_info = {n: (dt, tuple(s)) for n, dt, s in f_ck.tensors()}
    for n, (_dt, shape) in f_info.items():
        if n not in b_info:
            raise TensorMismatch(f"tensor {n}: in {finetuned} but missing from the base {base}")
        if b_info[n][1] != shape:
            raise TensorMismatch(f"tensor {n}: shape {list(shape)} in {finetuned} but {list(b_info[n][1])} in {base}")

    def module(name: str) -> str:
        return name.rsplit(".", 1)[0]

    def wanted(mod: str) -> bool:
        return mod in save or mod.rsplit(".", 1)[-1] in save or bool(_EMBED.search(mod))

    # Which modules are factored and which are copied whole (decided before any SVD).
    lora_names, full_modules = [], set()
    for n, (dt, shape) in f_info.items():
        if dt not in _FLOATS:
            continue
        mod = module(n)
        if wanted(mod):
            full_modules.add(mod)
        elif len(shape) == 2 and n.endswith(".weight"):
            lora_names.append(n)
        elif not np.array_equal(b_ck.read_f32(n), f_ck.read_f32(n)):
            full_modules.add(mod)  # a changed norm or bias: not expressible as a LoRA
    lora_names = [n for n in lora_names if module(n) not in full_modules]

    # GPT-2's Conv1D stores weights as (in, out): PEFT's fan_in_fan_out layout, B A = Δᵀ.
    fan_in_fan_out = _model_type(finetuned) in _CONV1D_MODELS

    def dtype_of(n: str) -> str:
        return _DTYPES[out_dtype] if out_dtype else f_info[n][0]

    tensors, errors, ranks = [], {}, {}
    for n in lora_names:
        rows, cols = f_info[n][1]
        delta = (f_ck.read_f32(n) - b_ck.read_f32(n)).reshape(rows, cols)
        if fan_in_fan_out:
            rows, cols, delta = cols, rows, np.ascontiguousarray(delta.T)
        k = min(rank, rows, cols)
        try:
            u, s, vt = svd(delta, None if exact else k, seed=seed)
        except MergeError as e:
            raise type(e)(f"tensor {n}: {e}") from None
        u, s, vt = u[:, :k], s[:k], vt[:k]
        total = float(np.dot(delta.ravel().astype(np.float64), delta.ravel().astype(np.float64)))
        if energy is not None and total > 0:
            captured = np.cumsum(s.astype(np.float64) ** 2) / total
            k = int(min(k, np.searchsorted(captured, float(energy) - 1e-12) + 1))
            u, s, vt = u[:, :k], s[:k], vt[:k]
        root = np.sqrt(np.maximum(s, 0.0))
        b_fac = np.ascontiguousarray(u * root[None, :], dtype=np.float32)
        a_fac = np.ascontiguousarray(root[:, None] * vt, dtype=np.float32)
        resid = delta - b_fac @ a_fac
        errors[n] = float(np.linalg.norm(resid) / np.sqrt(total)) if total > 0 else 0.0
        mod = module(n)
        ranks[mod] = k
        tensors.append((f"{_PREFIX}{mod}.lora_A.weight", a_fac.ravel(), [k, cols], dtype_of(n)))
        tensors.append((f"{_PREFIX}{mod}.lora_B.weight", b_fac.ravel(), [rows, k], dtype_of(n)))
    for n in f_info:
        if module(n) in full_modules:
            tensors.append((f"{_PREFIX}{n}", f_ck.read_f32(n), list(f_info[n][1]), dtype_of(n)))
    if not tensors:
        raise config_error(f"extract_lora: nothing to extract from {finetuned}")

    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": {m: k for m, k in ranks.items() if k != rank},
        "alpha_pattern": {m: k for m, k in ranks.items() if k != rank},
        "target_modules": _targets(ranks, full_modules),
        "modules_to_save": sorted(full_modules) or None,
        "use_rslora": False,
        "lora_dropout": 0.0,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "inference_mode": True,
    }
    meta = {"format": "pt", "merge_fast.lora_errors": json.dumps(errors, sort_keys=True),
            "merge_fast.seed": str(seed)}
    with staged_dir(Path(out), [base, finetuned], overwrite=overwrite) as tmp:
        _core.save_file(str(tmp / "adapter_model.safetensors"), tensors, meta)
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return errors


def _targets(factored: Iterable[str], full: Iterable[str]) -> list:
    """target_modules as PEFT matches them (name or '.'-suffix): the last name components,
    as mergekit writes them, unless one of those would also catch a module saved at full
    rank (e.g. a q_proj with a changed bias); then the full module names."""
    short = {m.rsplit(".", 1)[-1] for m in factored}
    if any(m.rsplit(".", 1)[-1] in short for m in full):
        return sorted(factored)
    return sorted(short)


__all__ = ["extract_lora"]
