"""Canonical tensor-name namespace across model families (pure Python, numpy only).

Every supported architecture's tensor names map onto one vocabulary of roles
(:mod:`.roles`): ``embed.weight``, ``layers.{i}.attn.q.weight``, ``layers.{i}.mlp.up.weight``,
``final_norm.weight``, ``lm_head.weight``, ...  and back, losslessly (fused tensors are split
on the way in and re-fused on the way out).

Quick use::

    from merge_fast.arch import detect_family, canonicalize, decanonicalize
    fam = detect_family(config, tensors.keys())
    canon = canonicalize(tensors, config, fam)        # {"layers.0.attn.q.weight": ndarray, ...}
    back = decanonicalize(canon, config, fam)         # == tensors, bit for bit

Lazy / streaming form (only shapes needed, e.g. from safetensors headers)::

    plan = plan_canonical(read_shapes(model_dir), read_config(model_dir))  # plan.recipes[key] -> Recipe
    outs = plan_decanonical({key: shape}, config, fam, source_family=fam)

Built-in families: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, gemma3
(multimodal: language model mapped, vision tower passed through), phi, phi3, gpt_neox, opt,
gpt2, bert, roberta, granite, t5 and t5_gated (decoder mapped, encoder passed through).
Custom ones: :func:`load_mapping` (see ``examples/qed.yaml``).

This subpackage imports nothing from the compiled core, so it works without ``_core``.
"""

from __future__ import annotations

from .convert import (
    PASSTHROUGH_PREFIX,
    CanonicalDict,
    CanonicalPlan,
    canonicalize,
    check_complete,
    decanonicalize,
    missing_keys,
    plan_canonical,
    plan_decanonical,
)
from .detect import detect_family, family_from_config, family_from_names
from .dims import DEFAULT_DIMS, resolve_dims
from .errors import (
    ArchError,
    CanonicalKeyError,
    FusedTensorError,
    MappingFileError,
    MissingTensorError,
    UnknownFamilyError,
    UnknownTensorError,
)
from .families import BUILTIN_SPECS, get_family, list_families, register_family, unregister_family
from .family import Family, RuleMatch, TensorRule
from .fused import OutputRecipe, Recipe, Segment, SplitPart, SplitSpec, apply_output_recipe, apply_recipe
from .headers import TensorInfo, read_config, read_header, read_shapes
from .mapping_file import EXAMPLES_DIR, dump_mapping, load_mapping, parse_mapping
from .roles import PARAMS, ROLES, CanonicalKey, RoleInfo

__all__ = [
    # keys and roles
    "CanonicalKey", "ROLES", "RoleInfo", "PARAMS",
    # families
    "Family", "TensorRule", "RuleMatch", "get_family", "list_families", "register_family", "unregister_family",
    "BUILTIN_SPECS", "detect_family", "family_from_config", "family_from_names",
    # conversion
    "canonicalize", "decanonicalize", "plan_canonical", "plan_decanonical", "CanonicalDict", "CanonicalPlan",
    "PASSTHROUGH_PREFIX", "missing_keys", "check_complete",
    # recipes
    "Recipe", "OutputRecipe", "Segment", "SplitSpec", "SplitPart", "apply_recipe", "apply_output_recipe",
    # dims
    "resolve_dims", "DEFAULT_DIMS",
    # safetensors headers (lazy path)
    "read_shapes", "read_header", "read_config", "TensorInfo",
    # mapping files
    "load_mapping", "parse_mapping", "dump_mapping", "EXAMPLES_DIR",
    # errors
    "ArchError", "UnknownFamilyError", "UnknownTensorError", "MissingTensorError", "FusedTensorError",
    "MappingFileError", "CanonicalKeyError",
]
