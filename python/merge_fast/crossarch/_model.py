"""A checkpoint seen through the canonical namespace, read one tensor at a time."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from .._errors import InvalidCheckpoint, TensorMismatch, config_error
from ..plan import open_checkpoint
from ..arch import (
    PASSTHROUGH_PREFIX,
    ArchError,
    Family,
    UnknownFamilyError,
    UnknownTensorError,
    apply_recipe,
    get_family,
    load_mapping,
    missing_keys,
    plan_canonical,
)
from ..arch.roles import CanonicalKey

#: Bytes read (approx.) after which the memory map is dropped and the checkpoint reopened.
REOPEN_BYTES = 128 * 1024 * 1024

FamilyArg = Union[None, str, Family, "os.PathLike[str]", Mapping[str, Any]]


def resolve_family_arg(fam: FamilyArg) -> Optional[Family]:
    """None, a Family, a built-in family name, or a mapping file (path or parsed spec)."""
    if fam is None or isinstance(fam, Family):
        return fam
    if isinstance(fam, Mapping):
        return load_mapping(fam)
    s = str(fam)
    if isinstance(fam, str) and not (s.endswith((".yaml", ".yml", ".json")) or os.sep in s):
        return get_family(s)
    return load_mapping(s)


def read_vocab(path: Path) -> Optional[Dict[str, int]]:
    """token string -> id from ``tokenizer.json`` (model vocab + added tokens) or ``vocab.json``."""
    tj = path / "tokenizer.json"
    if tj.is_file():
        try:
            data = json.loads(tj.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        vocab: Dict[str, int] = {}
        v = (data.get("model") or {}).get("vocab")
        if isinstance(v, dict):
            vocab.update({str(k): int(i) for k, i in v.items()})
        elif isinstance(v, list):  # Unigram: [[token, score], ...], id = position
            for i, item in enumerate(v):
                tok = item[0] if isinstance(item, (list, tuple)) else item
                vocab.setdefault(str(tok), i)
        for t in data.get("added_tokens") or []:
            if isinstance(t, dict) and "content" in t and "id" in t:
                vocab[str(t["content"])] = int(t["id"])
        return vocab or None
    vj = path / "vocab.json"
    if vj.is_file():
        try:
            v = json.loads(vj.read_text(encoding="utf-8"))
            return {str(k): int(i) for k, i in v.items()} if isinstance(v, dict) else None
        except (OSError, ValueError):
            return None
    return None


def _cfg_number(config: Mapping[str, Any], key: str, family: Family) -> float:
    v = config.get(key)
    if v is None and isinstance(config.get("text_config"), Mapping):
        v = config["text_config"].get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v == 0:
        raise config_error(f"{family.name} config key '{key}' must be a finite non-zero number, got {v!r}")
    return float(v)


def function_scales(family: Family, config: Mapping[str, Any]) -> Dict[str, float]:
    """Per-role factors ``s`` such that ``s * W`` computes, in a plain pre-norm decoder
    (Llama convention), what ``W`` computes in ``family``:

    * Granite multipliers: embeddings x ``embedding_multiplier`` -> ``embed`` x m; sub-layer
      outputs x ``residual_multiplier`` -> ``attn.o``, ``mlp.down`` x m; scores x
      ``attention_multiplier`` instead of ``1/sqrt(head_dim)`` -> ``attn.q`` x
      ``m * sqrt(head_dim)``; logits / ``logits_scaling`` -> ``lm_head`` / m;
    * T5: unscaled scores -> ``attn.q`` x ``sqrt(head_dim)``; decoder output x ``d_model**-0.5``
      before the tied head (``scale_decoder_outputs``) -> ``lm_head`` x ``d_model**-0.5``;
    * Gemma: embeddings x ``sqrt(hidden_size)`` -> ``embed`` x ``sqrt(hidden_size)``.

    Every factor multiplies a linear map (and its bias) that the others do not touch, so
    moving ``W_d`` from family D into family A as ``W_d * s_D / s_A`` preserves the function."""
    attrs = family.attributes
    dims = family.resolve_dims(config)
    out: Dict[str, float] = {}
    mult = attrs.get("multipliers")
    if isinstance(mult, Mapping):
        if "embed" in mult:
            out["embed"] = _cfg_number(config, mult["embed"], family)
        if "residual" in mult:
            out["attn.o"] = out["mlp.down"] = _cfg_number(config, mult["residual"], family)
        if "attention" in mult:
            out["attn.q"] = _cfg_number(config, mult["attention"], family) * float(np.sqrt(dims["head_dim"]))
        if "logits" in mult:
            out["lm_head"] = 1.0 / _cfg_number(config, mult["logits"], family)
    if attrs.get("attention_scale") == "none":
        hd = config.get("d_kv") or dims.get("head_dim")
        out["attn.q"] = float(np.sqrt(float(hd or 0)))
    key = attrs.get("decoder_output_scale")
    if isinstance(key, str):
        on = config.get(key)
        if on is None:  # pre-5.x configs: T5 v1.0 (tied) scales, v1.1 (untied) does not
            on = config.get("tie_word_embeddings", True) is not False
        if on:
            out["lm_head"] = float(dims["hidden_size"]) ** -0.5
    if attrs.get("embed_scale") == "sqrt(hidden_size)":
        out["embed"] = out.get("embed", 1.0) * float(np.sqrt(dims["hidden_size"]))
    return out


class ModelView:
    """Canonical view of one checkpoint folder (lazy: tensors are read on demand)."""

    def __init__(self, path: Union[str, Path], family: FamilyArg = None, *, is_anchor: bool = False):
        self.path = Path(path)
        if not self.path.exists():
            raise InvalidCheckpoint(f"invalid checkpoint {self.path}: no such file or folder")
        self.ckpt = open_checkpoint(self.path)
        folder = self.path if self.path.is_dir() else self.path.parent
        self.folder = folder
        cfg_file = folder / "config.json"
        self.config: Dict[str, Any] = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.dtypes: Dict[str, str] = {}
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        for name, dt, shape in self.ckpt.tensors():
            self.dtypes[name] = dt
            self.shapes[name] = tuple(shape)
        names = list(self.shapes)
        try:
            fam = resolve_family_arg(family)
            self.plan = plan_canonical(
                self.shapes,
                self.config,
                fam,
                unknown="passthrough" if is_anchor else "error",
                buffers="passthrough" if is_anchor else "drop",
            )
        except UnknownFamilyError as e:
            raise config_error(
                f"cannot map tensor '{names[0] if names else '?'}' of {self.path} onto the canonical "
                f"namespace: {e}"
            ) from None
        except UnknownTensorError as e:
            bad = e.names[0] if e.names else "?"
            raise config_error(f"tensor '{bad}' of {self.path} has no canonical role: {e}") from None
        except ArchError as e:
            raise config_error(f"{self.path}: {e}") from None
        self.family: Family = self.plan.family
        self.recipes = self.plan.recipes
        self.keys = [k for k in self.recipes if not k.startswith(PASSTHROUGH_PREFIX)]
        layers = [CanonicalKey.parse(k).layer for k in self.keys]
        self.num_layers = max((x for x in layers if x is not None), default=-1) + 1
        if "embed.weight" not in self.recipes:
            raise TensorMismatch(
                f"tensor mismatch for 'embed.weight': {self.path} has no token embedding (needed to align the "
                f"residual stream)"
            )
        self.vocab_rows, self.hidden = self.recipes["embed.weight"].shape[:2]
        miss = missing_keys(self.keys, self.config, self.family, self.num_layers)
        if miss:
            where = self.family.from_canonical(miss[0])
            raise TensorMismatch(
                f"tensor mismatch for '{where}' (canonical '{miss[0]}'): missing from {self.path} "
                f"({len(miss)} required tensor(s) missing)"
            )
        attrs = self.family.attributes
        self.norm_offset = float(attrs.get("norm_weight_offset", 0.0) or 0.0)
        self.norm_kind = str(attrs.get("norm", "rmsnorm"))
        self._cache: Dict[str, np.ndarray] = {}
        self._mapped = 0
        self.vocab = read_vocab(folder)
        self.scales = function_scales(self.family, self.config)

    def scale(self, role: str) -> float:
        """Factor taking this family's stored ``role`` weights to the plain pre-norm convention
        (no multipliers, scores scaled by ``1/sqrt(head_dim)``): ``W_plain = scale * W``."""
        return self.scales.get(role, 1.0)

    # ------------------------------------------------------------------ reading
    def has(self, key: str) -> bool:
        return key in self.recipes

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.recipes[key].shape)

    def _stored(self, name: str) -> np.ndarray:
        hit = self._cache.get(name)
        if hit is not None:
            return hit
        arr = np.asarray(self.ckpt.read_f32(name)).reshape(self.shapes[name])
        # Checkpoint.read_f32 leaves the tensor's pages mapped (they count in RSS); reopen the
        # checkpoint (dropping the old mapping) every REOPEN_BYTES of reads to bound that.
        self._mapped += arr.size * {"F32": 4, "F64": 8}.get(self.dtypes[name], 2)
        if self._mapped >= REOPEN_BYTES:
            self.ckpt = open_checkpoint(self.path)
            self._mapped = 0
        # Keep only the last fused tensor (q/k/v parts are read one after another).
        self._cache = {name: arr} if self.family.is_fused(name) else {}
        return arr

    def get(self, key: str) -> Optional[np.ndarray]:
        """Canonical tensor as float32 (a fresh array or a read-only view), or None if absent."""
        r = self.recipes.get(key)
        if r is None:
            return None
        stored = self._stored(r.source)
        return stored if r.is_identity else np.ascontiguousarray(apply_recipe(r, stored))

    def need(self, key: str) -> np.ndarray:
        """:meth:`get` for a key the caller knows is there (TensorMismatch naming it if not)."""
        v = self.get(key)
        if v is None:
            raise TensorMismatch(f"tensor mismatch for '{key}': missing from {self.path}")
        return v

    def need_gain(self, key: str) -> np.ndarray:
        g = self.gain(key)
        if g is None:
            raise TensorMismatch(f"tensor mismatch for '{key}': missing from {self.path}")
        return g

    def gain(self, key: str) -> Optional[np.ndarray]:
        """Effective norm gain (``offset + weight``) of a norm weight key, or None."""
        w = self.get(key)
        return None if w is None else (w + np.float32(self.norm_offset) if self.norm_offset else w)

    def clear(self) -> None:
        self._cache = {}
