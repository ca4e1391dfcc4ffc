"""Family detection from ``config.json`` and/or tensor names.

Order of evidence:

1. ``config["model_type"]`` matched against every registered family's ``match.model_type``
   (user-registered families first, so a mapping file can claim any model_type);
2. ``config["architectures"]`` matched against ``match.architectures``;
3. tensor names alone: the first family (priority order: user families, then
   gemma3 (multimodal), gemma3_text, gemma2, qwen3, phi3, phi, gpt_neox, opt, gpt2, bert, roberta, t5_gated, t5, granite, qwen2, llama) under
   which *every* name is recognised (or is a known buffer), its ``required`` tensors of
   layer 0 are present and its ``detect`` signature holds.

Llama, Mistral and Gemma-1 checkpoints have identical tensor names, so without a config
name-only detection returns ``llama`` (the canonical keys are the same; only Gemma's
semantic attributes - ``norm_weight_offset``, ``embed_scale`` - differ).

When names are given, the returned family is bound to the name prefix they use
(e.g. ``model.`` for ``LlamaForCausalLM``, none for ``LlamaModel``).  A config-named family
under which *none* of the names is recognised raises :class:`UnknownFamilyError` (the
config and the weights disagree).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from .errors import UnknownFamilyError
from .families import registered_families
from .family import Family

__all__ = ["detect_family", "family_from_config", "family_from_names"]


def _config_candidates(config: Mapping[str, Any] | None) -> list[Family]:
    """Families claiming the config's ``model_type`` (else its ``architectures``), in priority order."""
    if not config:
        return []
    fams = registered_families()
    mt = config.get("model_type")
    if isinstance(mt, str):
        hit = [f for f in fams if mt in f.model_types]
        if hit:
            return hit
    archs = config.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    for a in archs:
        hit = [f for f in fams if a in f.architectures]
        if hit:
            return hit
    return []


def family_from_config(config: Mapping[str, Any] | None) -> Family | None:
    """The family named by ``model_type`` / ``architectures``, or ``None`` (several families
    may claim one model_type, e.g. T5's gated and ReLU variants: the first is returned;
    :func:`detect_family` with tensor names picks the one that knows every name)."""
    cands = _config_candidates(config)
    return cands[0] if cands else None


def _name_score(fam: Family, names: list[str]) -> tuple[Family, int, int]:
    """(bound family, recognised count, unknown count)."""
    b = fam.bind_to_names(names)
    known = unknown = 0
    for n in names:
        if b.match(n) is not None:
            known += 1
        elif not (b.is_ignored(n) or b.is_passthrough(n)):
            unknown += 1
    return b, known, unknown


def family_from_names(tensor_names: Iterable[str]) -> Family | None:
    """Name-only detection (see module docstring); ``None`` if no family fits."""
    names = list(tensor_names)
    if not names:
        return None
    for fam in registered_families():
        b, known, unknown = _name_score(fam, names)
        if known == 0 or unknown:
            continue
        present = set(names)
        if any(b.from_canonical(k) not in present for k in b.required_keys(1)):
            continue
        if not all(any(re.search(rx, n) for n in names) for rx in b.detect_require):
            continue
        if any(re.search(rx, n) for rx in b.detect_forbid for n in names):
            continue
        return b
    return None


def detect_family(config: Mapping[str, Any] | None = None, tensor_names: Iterable[str] | None = None) -> Family:
    """Detect the family of a checkpoint.

    Args:
        config: the parsed ``config.json`` (may be ``None`` or empty).
        tensor_names: the checkpoint's tensor names (optional but recommended: used to
            choose the name prefix, to cross-check the config, and as a fallback).

    Returns:
        The :class:`Family`, bound to the prefix the names use.

    Raises:
        UnknownFamilyError: nothing matches (register a mapping file with
            :func:`merge_fast.arch.load_mapping`), or the config names a family that does not
            recognise a single tensor name.
    """
    names = list(tensor_names) if tensor_names is not None else None
    cands = _config_candidates(config)
    if cands and names and len(cands) > 1:
        for c in cands:  # the first candidate whose table knows every name
            b, known, unknown = _name_score(c, names)
            if known and not unknown:
                return b
    fam = cands[0] if cands else None
    if fam is not None:
        if not names:
            return fam
        b, known, unknown = _name_score(fam, names)
        if known == 0:
            guess = family_from_names(names)
            hint = f" (they look like {guess.name!r})" if guess else ""
            raise UnknownFamilyError(
                f"config says family {fam.name!r} (model_type={(config or {}).get('model_type')!r}) but none of the "
                f"{len(names)} tensor names matches its table{hint}; first names: {names[:3]}"
            )
        return b
    if names:
        fam = family_from_names(names)
        if fam is not None:
            return fam
    what = []
    if config:
        what.append(f"model_type={config.get('model_type')!r}, architectures={config.get('architectures')!r}")
    if names:
        what.append(f"{len(names)} tensor names such as {names[:3]}")
    raise UnknownFamilyError(
        "cannot detect the model family from " + (" and ".join(what) or "nothing (no config, no names)")
        + "; supported: " + ", ".join(f.name for f in registered_families())
        + ". For a custom architecture write a mapping file (see merge_fast/arch/examples/qed.yaml) and "
        "load it with merge_fast.arch.load_mapping(path, register=True)."
    )
