"""Merging several PEFT LoRA adapters into one adapter, as PEFT's
``add_weighted_adapter(combination_type="svd")`` does: per adapted module
``Δ = Σ_i w_i · scale_i · B_i A_i`` truncated to rank ``r`` by SVD, written as
``B = U_r S_r`` and ``A = V_rᵀ`` with ``lora_alpha = r`` (scale 1).

No model is materialised, nor even one full ``Δ``: with ``B_cat = [w_i scale_i B_i]``
(out × R) and ``A_cat = [A_i]`` (R × in), ``R = Σ r_i``, thin QRs ``B_cat = Q_b R_b`` and
``A_catᵀ = Q_a R_a`` reduce the SVD of ``Δ = Q_b (R_b R_aᵀ) Q_aᵀ`` to that of an R × R core
(float64), which is exact. Modules absent from an adapter contribute nothing to its sum.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np

from . import _core
from ._errors import config_error
from ._output import check_output_dir, staged_dir
from .lora import read_adapter

PathLike = Union[str, Path]


def merge_adapters(
    adapters: Sequence[PathLike],
    weights: Sequence[float],
    out: PathLike,
    *,
    rank: Optional[int] = None,
    out_dtype: str = "float32",
    overwrite: bool = False,
) -> Dict[str, int]:
    """Writes the adapter folder ``out`` combining ``adapters`` with ``weights`` (one per
    adapter) by SVD to rank ``rank`` (default: the largest ``r`` among them, as PEFT).
    Returns ``{module: rank written}``. Adapters with full-rank tensors (``modules_to_save``)
    or with different layouts for the same module are refused (ConfigError). ``overwrite``
    replaces a previous output at ``out``."""
    adapters = [Path(a) for a in adapters]
    weights = [float(w) for w in weights]
    if not adapters:
        raise config_error("merge_adapters needs at least one adapter")
    if len(weights) != len(adapters):
        raise config_error(f"merge_adapters: {len(weights)} weights for {len(adapters)} adapters")
    if out_dtype not in ("float32", "bfloat16", "float16"):
        raise config_error(f"merge_adapters: out_dtype must be float32, bfloat16 or float16, got {out_dtype!r}")
    check_output_dir(out, adapters, overwrite=overwrite)
    ads = [read_adapter(a) for a in adapters]
    for ad in ads:
        if ad.replacements:
            raise config_error(f"LoRA adapter {ad.path}: full tensors ({sorted(ad.replacements)[0]}, ...) "
                              "cannot be merged by SVD; remove modules_to_save")
    if rank is None:
        rank = max(int(ad.config["r"]) for ad in ads)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise config_error(f"merge_adapters: rank must be a positive integer, got {rank!r}")
    cks = [_core.Checkpoint(str(ad.file)) for ad in ads]
    targets = sorted({t for ad in ads for t in ad.modules})
    dt = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[out_dtype]
    tensors, ranks = [], {}
    for target in targets:
        present = [(ad, ck, w, ad.modules[target]) for ad, ck, w in zip(ads, cks, weights) if target in ad.modules]
        first = present[0][3]
        if any(m.transpose != first.transpose or m.b_shape[0] != first.b_shape[0] or m.a_shape[1] != first.a_shape[1]
               for _, _, _, m in present):
            raise config_error(f"merge_adapters: module {target!r} has different shapes or layouts across adapters")
        bs = [w * m.scale * ck.read_f32(m.b).astype(np.float64).reshape(m.b_shape) for _, ck, w, m in present]
        as_ = [ck.read_f32(m.a).astype(np.float64).reshape(m.a_shape) for _, ck, w, m in present]
        b_cat, a_cat = np.concatenate(bs, axis=1), np.concatenate(as_, axis=0)
        qb, rb = np.linalg.qr(b_cat)
        qa, ra = np.linalg.qr(a_cat.T)
        u, s, vt = np.linalg.svd(rb @ ra.T)
        rows, cols = first.b_shape[0], first.a_shape[1]
        k = min(rank, rows, cols)
        kk = min(k, len(s))
        new_b = np.zeros((rows, k), dtype=np.float32)
        new_a = np.zeros((k, cols), dtype=np.float32)
        new_b[:, :kk] = (qb @ u[:, :kk]) * s[:kk]
        new_a[:kk] = vt[:kk] @ qa.T
        mod = target[: -len(".weight")]
        ranks[mod] = k
        # The factor names of the first adapter that has the module (lora_A / lora_embedding_A).
        tensors.append((present[0][3].a, new_a.ravel(), [k, cols], dt))
        tensors.append((present[0][3].b, new_b.ravel(), [rows, k], dt))
    cfg = dict(ads[0].config)
    mods = sorted({m.rsplit(".", 1)[-1] for m in ranks})
    pattern = {m: k for m, k in ranks.items() if k != rank}
    cfg.update(r=rank, lora_alpha=rank, rank_pattern=pattern, alpha_pattern=pattern, target_modules=mods,
               use_rslora=False, modules_to_save=None)
    meta = {"format": "pt", "merge_fast.merged_adapters": json.dumps([str(a) for a in adapters]),
            "merge_fast.weights": json.dumps(weights)}
    with staged_dir(Path(out), adapters, overwrite=overwrite) as tmp:
        _core.save_file(str(tmp / "adapter_model.safetensors"), tensors, meta)
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return ranks


__all__ = ["merge_adapters"]
