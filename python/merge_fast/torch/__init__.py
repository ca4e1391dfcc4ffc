"""merge_fast.torch: the torch side of data-aware merges (needs torch; never imported by
``import merge_fast``).

- :func:`estimate_fisher`, :func:`save_fisher`, :func:`load_fisher`: diagonal Fisher of a
  causal LM (per-example gradients via torch.func), stored as safetensors under the model's
  own parameter names.
- :func:`fisher_main`: the ``merge-fast fisher`` command (argv list -> exit code).
- :func:`estimate_gram`, :func:`save_gram`, :func:`load_gram`, :func:`gram_main`: Gram
  matrices ``XᵀX`` of every linear layer's inputs (RegMean), keyed by weight name.
- :class:`SubspaceProjector`, :func:`load_masks`: gradient projection out of protected
  subspaces (plain parameters and PEFT LoRA A/B), with Adam-safe re-projection.
"""

from .fisher import (
    FisherResult,
    estimate_fisher,
    fisher_main,
    load_fisher,
    sample_labels,
    save_fisher,
    sequence_log_likelihood,
    tied_parameter_names,
)
from .gram import GramResult, estimate_gram, gram_main, load_gram, save_gram
from .projector import SubspaceProjector, load_masks, save_masks
from .data import load_jsonl_texts, make_batches, tokenize_texts

__all__ = [
    "FisherResult",
    "estimate_fisher",
    "fisher_main",
    "GramResult",
    "estimate_gram",
    "gram_main",
    "load_gram",
    "save_gram",
    "load_fisher",
    "sample_labels",
    "save_fisher",
    "sequence_log_likelihood",
    "tied_parameter_names",
    "SubspaceProjector",
    "load_masks",
    "save_masks",
    "load_jsonl_texts",
    "make_batches",
    "tokenize_texts",
]
