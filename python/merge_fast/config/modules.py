"""``modules:`` configs (mergekit's form for models made of several networks, e.g. a
vision-language model's ``text_decoder``, ``vision_tower`` and ``multi_modal_projector``):
each module has its own ``models`` or ``slices`` and ``parameters``; ``merge_method``,
``base_model``, ``dtype``, the tokenizer and the top-level ``parameters`` are shared.

As in mergekit: a module's ``parameters`` sit between its slices' and the top level's;
gradients run over the module's own layers; a module's layer count is written to its
config key (``text_config.num_hidden_layers``, ``vision_config.num_hidden_layers``); only
the modules the config lists are written (tensors of other modules are left out, with a
warning).

A module is the tensors under its weight prefix, found in the first model of the module
from the names transformers uses (``language_model.``, ``vision_tower.``, ... with or
without a leading ``model.``); any other module name ``X`` is the prefix ``X.``. Tensors
under no module prefix (e.g. a top-level ``lm_head.weight``) belong to ``text_decoder``.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

from .schema import ModuleDef, parse_modules  # noqa: F401 - the schema of `modules:`, parsed with the rest

# module name -> (weight prefixes, most specific first; layer-count config keys)
KNOWN = {
    "text_decoder": (("model.language_model.", "language_model.", "model.text_model.", "text_model."),
                     (("text_config", "num_hidden_layers"),)),
    "vision_tower": (("model.vision_tower.", "vision_tower.", "model.visual.", "visual.", "model.vision_model.",
                      "vision_model."), (("vision_config", "num_hidden_layers"), ("vision_config", "depth"))),
    "multi_modal_projector": (("model.multi_modal_projector.", "multi_modal_projector."), ()),
}
ALL_PREFIXES = tuple(p for ps, _ in KNOWN.values() for p in ps)


def module_prefix(name: str, names: Sequence[str]) -> str:
    """The weight prefix of module `name` in a model with tensors `names`."""
    cands = KNOWN[name][0] if name in KNOWN else (f"model.{name}.", f"{name}.")
    for c in cands:
        if any(n.startswith(c) for n in names):
            return c
    return cands[-1]


def layer_keys(name: str) -> Tuple[Tuple[str, ...], ...]:
    return KNOWN[name][1] if name in KNOWN else ()


def selector(name: str, prefixes: Dict[str, str]):
    """Which tensors belong to module `name`, given every configured module's prefix."""
    own = prefixes[name]
    others = [p for m, p in prefixes.items() if m != name]

    def keep(n: str) -> bool:
        if n.startswith(own):
            return not any(n.startswith(o) and len(o) > len(own) for o in others)
        return name == "text_decoder" and not any(n.startswith(p) for p in ALL_PREFIXES + tuple(others))

    return keep
