"""The canonical role vocabulary and :class:`CanonicalKey`.

Canonical key strings
=====================

Every parameter of every supported architecture is given one *canonical key*::

    <role>.<param>                   global tensors, e.g. ``embed.weight``, ``final_norm.weight``
    layers.<i>.<role>.<param>        per-block tensors, e.g. ``layers.3.attn.q.weight``

``<param>`` is ``weight`` or ``bias``.  ``<i>`` is the 0-based block index exactly as it
appears in the source name.  Roles (see :data:`ROLES`) may themselves contain a dot
(``attn.q``, ``mlp.up``); the parameter is always the last component.

Orientation: every 2-D canonical weight is in the ``torch.nn.Linear`` convention
``[out_features, in_features]`` (GPT-2's ``Conv1D`` weights, stored ``[in, out]``, are
transposed on the way in and back on the way out).  Embeddings are ``[vocab, hidden]``.

Non-gated MLPs (GPT-2, GPT-NeoX, OPT, Phi, BERT) map their first projection
(``fc1`` / ``c_fc`` / ``dense_h_to_4h`` / ``intermediate.dense``) to ``mlp.up`` and the
second (``fc2`` / ``c_proj`` / ``dense_4h_to_h`` / ``output.dense``) to ``mlp.down``; they
have no ``mlp.gate``.  Gated (SwiGLU/GeGLU) MLPs have ``mlp.gate``, ``mlp.up``, ``mlp.down``
where ``down(act(gate(x)) * up(x))``.

Norm roles are named by the sub-layer they belong to, not by the checkpoint's name:

* ``attn_norm``   the norm of the attention sub-layer (pre-norm models: applied to the
  block input; post-norm BERT: applied after the residual add - see the family attribute
  ``norm_placement``).
* ``mlp_norm``    the norm of the MLP sub-layer (Llama's ``post_attention_layernorm`` is the
  *pre*-MLP norm and maps here; so do Gemma-2/3's ``pre_feedforward_layernorm``, OPT's
  per-layer ``final_layer_norm``, GPT-2's ``ln_2``).
* ``attn_post_norm`` / ``mlp_post_norm``  Gemma-2/3 "sandwich" norms applied to the
  sub-layer *output* before the residual add (Gemma-2/3's ``post_attention_layernorm`` and
  ``post_feedforward_layernorm``).
* ``attn.q_norm`` / ``attn.k_norm``  per-head norms on queries/keys (Qwen3, Gemma-3,
  Phi with ``qk_layernorm``).

Encoder-decoder models (T5) map their *decoder* onto the per-layer roles (self-attention
``attn.*``, MLP ``mlp.*``); the decoder's attention over the encoder output is
``cross_attn.q/k/v/o`` with its norm ``cross_attn_norm``; the encoder itself is kept
verbatim (``passthrough``).

Custom roles (mapping files) may use any role starting with ``custom.``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Mapping

from .errors import CanonicalKeyError

__all__ = ["RoleInfo", "ROLES", "PARAMS", "CanonicalKey", "is_known_role", "role_scope"]

Scope = Literal["global", "layer"]


@dataclass(frozen=True)
class RoleInfo:
    """Description of one role of the vocabulary."""

    name: str
    scope: Scope
    description: str


def _r(name: str, scope: Scope, description: str) -> tuple[str, RoleInfo]:
    return name, RoleInfo(name, scope, description)


#: The role vocabulary: role name -> :class:`RoleInfo`.
ROLES: Mapping[str, RoleInfo] = dict(
    [
        # ---- global ----
        _r("embed", "global", "token embedding [vocab, hidden]"),
        _r("pos_embed", "global", "learned absolute position embedding [positions, hidden] (GPT-2, OPT, BERT)"),
        _r("type_embed", "global", "token-type (segment) embedding (BERT)"),
        _r("embed_norm", "global", "norm applied to the summed embeddings (BERT embeddings.LayerNorm)"),
        _r("embed_proj_in", "global", "projection from embedding width to hidden width (OPT project_in)"),
        _r("embed_proj_out", "global", "projection from hidden width back to embedding width (OPT project_out)"),
        _r("final_norm", "global", "norm after the last block"),
        _r("lm_head", "global", "output (unembedding) projection [vocab, hidden] and its bias; absent when tied"),
        _r("pooler", "global", "BERT pooler dense layer"),
        _r("mlm.dense", "global", "BERT MLM head transform dense layer"),
        _r("mlm.norm", "global", "BERT MLM head transform LayerNorm"),
        _r("nsp_head", "global", "BERT next-sentence-prediction head"),
        _r("classifier", "global", "sequence-classification head"),
        # ---- per layer ----
        _r("attn_norm", "layer", "norm of the attention sub-layer"),
        _r("attn.q", "layer", "query projection [heads*head_dim, hidden]"),
        _r("attn.k", "layer", "key projection [kv_heads*head_dim, hidden]"),
        _r("attn.v", "layer", "value projection [kv_heads*head_dim, hidden]"),
        _r("attn.o", "layer", "attention output projection [hidden, heads*head_dim]"),
        _r("attn.q_norm", "layer", "per-head query norm [head_dim]"),
        _r("attn.k_norm", "layer", "per-head key norm [head_dim]"),
        _r("attn_post_norm", "layer", "norm on the attention output before the residual add (Gemma-2/3)"),
        _r("mlp_norm", "layer", "norm of the MLP sub-layer"),
        _r("mlp.gate", "layer", "gate projection of a gated MLP [intermediate, hidden]"),
        _r("mlp.up", "layer", "up projection (fc1 for non-gated MLPs) [intermediate, hidden]"),
        _r("mlp.down", "layer", "down projection (fc2 for non-gated MLPs) [hidden, intermediate]"),
        _r("mlp_post_norm", "layer", "norm on the MLP output before the residual add (Gemma-2/3)"),
        # encoder-decoder (T5) decoder blocks: attention over the encoder's output
        _r("cross_attn_norm", "layer", "norm of the cross-attention sub-layer (T5 decoder)"),
        _r("cross_attn.q", "layer", "cross-attention query projection (reads the decoder stream)"),
        _r("cross_attn.k", "layer", "cross-attention key projection (reads the encoder output)"),
        _r("cross_attn.v", "layer", "cross-attention value projection (reads the encoder output)"),
        _r("cross_attn.o", "layer", "cross-attention output projection (writes the decoder stream)"),
    ]
)

#: Parameter names a canonical key may end with.
PARAMS: tuple[str, ...] = ("weight", "bias")

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def is_known_role(role: str) -> bool:
    """True for vocabulary roles and for free ``custom.*`` roles."""
    return role in ROLES or (role.startswith("custom.") and len(role) > len("custom."))


def role_scope(role: str) -> Scope | None:
    """``"global"`` / ``"layer"`` for vocabulary roles, ``None`` for ``custom.*`` roles."""
    info = ROLES.get(role)
    return info.scope if info else None


@dataclass(frozen=True, order=True)
class CanonicalKey:
    """One canonical tensor key, e.g. ``layers.0.attn.q.weight``.

    ``layer`` is ``None`` for global tensors.  ``str(key)`` gives the canonical string;
    :meth:`parse` is its inverse.
    """

    layer: int | None
    role: str
    param: str = "weight"

    def __post_init__(self) -> None:
        if not is_known_role(self.role):
            raise CanonicalKeyError(f"unknown canonical role {self.role!r} (known: {', '.join(ROLES)}, or custom.*)")
        if self.param not in PARAMS:
            raise CanonicalKeyError(f"unknown parameter {self.param!r} in canonical key (expected one of {PARAMS})")
        scope = role_scope(self.role)
        if scope == "layer" and self.layer is None:
            raise CanonicalKeyError(f"role {self.role!r} is per-layer but no layer index was given")
        if scope == "global" and self.layer is not None:
            raise CanonicalKeyError(f"role {self.role!r} is global but layer {self.layer} was given")
        if self.layer is not None and self.layer < 0:
            raise CanonicalKeyError(f"negative layer index {self.layer}")

    def __str__(self) -> str:
        base = f"{self.role}.{self.param}"
        return base if self.layer is None else f"layers.{self.layer}.{base}"

    @property
    def role_param(self) -> str:
        """``"<role>.<param>"`` without the layer part (e.g. ``"attn.q.weight"``)."""
        return f"{self.role}.{self.param}"

    @classmethod
    def parse(cls, key: "str | CanonicalKey") -> "CanonicalKey":
        """Parse a canonical key string (``CanonicalKey`` instances are returned as is)."""
        if isinstance(key, CanonicalKey):
            return key
        if not isinstance(key, str):
            raise CanonicalKeyError(f"canonical key must be a string, got {type(key).__name__}")
        layer: int | None = None
        rest = key
        m = _LAYER_RE.match(key)
        if m:
            layer, rest = int(m.group(1)), m.group(2)
        role, dot, param = rest.rpartition(".")
        if not dot or not role:
            raise CanonicalKeyError(f"{key!r} is not a canonical key (expected '[layers.<i>.]<role>.<param>')")
        return cls(layer, role, param)

    @classmethod
    def from_role_param(cls, role_param: str, layer: int | None) -> "CanonicalKey":
        """Build from ``"<role>.<param>"`` and a layer index."""
        role, dot, param = role_param.rpartition(".")
        if not dot or not role:
            raise CanonicalKeyError(f"{role_param!r} is not '<role>.<param>'")
        return cls(layer, role, param)
