"""Built-in family tables (facts read from transformers' modeling code) and the registry.

Each table is a spec mapping in the :mod:`.family` schema - the same schema user mapping
files use.  ``attributes`` record semantic facts that matter when moving weights *between*
families (they never change the data):

* ``norm``: ``rmsnorm`` | ``layernorm``; ``norm_weight_offset``: the norm multiplies by
  ``offset + weight`` (Gemma: 1.0, so a Gemma norm weight of 0 equals a Llama weight of 1);
* ``norm_placement``: ``pre`` | ``post`` (BERT) | ``sandwich`` (Gemma-2/3);
* ``mlp``: ``gated`` (act(gate)*up) | ``plain`` (fc1 -> act -> fc2, mapped to up/down);
  ``activation``: the config key or name of the activation;
* ``position``: ``rope`` | ``learned`` | ``partial_rope``; ``pos_embed_offset`` (OPT: 2);
* ``parallel_block``: attention and MLP read the same input (Phi, GPT-NeoX default);
* ``embed_scale``: embeddings are multiplied by ``sqrt(hidden_size)`` (Gemma family);
* ``tied_embeddings_default``: transformers' default for ``tie_word_embeddings``;
* ``multipliers`` (Granite): config keys of scalar multipliers the forward pass applies -
  ``embed`` (embeddings x m), ``residual`` (each sub-layer output x m before the residual
  add), ``attention`` (the score scale, replacing ``1/sqrt(head_dim)``), ``logits``
  (logits / m);
* ``attention_scale``: ``none`` when scores are not scaled by ``1/sqrt(head_dim)`` (T5);
* ``decoder_output_scale``: T5's ``d_model**-0.5`` on the decoder output before the tied
  head (config ``scale_decoder_outputs``);
* ``encoder_decoder``: only the decoder is mapped; the encoder passes through verbatim.

The multipliers never change stored data (same-family round trips and merges are plain
parameter-space operations under the base's config); cross-family alignment
(:mod:`merge_fast.crossarch`) folds them into the weights it moves between families.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from .errors import MappingFileError, UnknownFamilyError
from .family import Family

__all__ = ["BUILTIN_SPECS", "get_family", "list_families", "register_family", "unregister_family", "registered_families"]

_ROPE_BUFFERS = [r"(^|\.)rotary_emb\.inv_freq$"]


def _t(name: str, role: str, required: bool = False, **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name, "role": role}
    if required:
        d["required"] = True
    d.update(kw)
    return d


def _wb(name: str, role: str, required_weight: bool = False, required_bias: bool = False, **kw: Any) -> list[dict[str, Any]]:
    """weight + bias rules for a module."""
    return [
        _t(f"{name}.weight", f"{role}.weight", required_weight, **kw),
        _t(f"{name}.bias", f"{role}.bias", required_bias),
    ]


def _llama_like(*, q_norm: bool = False, sandwich: bool = False) -> list[dict[str, Any]]:
    L = "{prefix}layers.{layer}."
    t: list[dict[str, Any]] = [_t("{prefix}embed_tokens.weight", "embed.weight", True)]
    t += [_t(L + "input_layernorm.weight", "attn_norm.weight", True)]
    for s, r in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "o")):
        t += _wb(L + f"self_attn.{s}_proj", f"attn.{r}", required_weight=True)
    if q_norm:
        t += [_t(L + "self_attn.q_norm.weight", "attn.q_norm.weight", True),
              _t(L + "self_attn.k_norm.weight", "attn.k_norm.weight", True)]
    if sandwich:
        t += [_t(L + "post_attention_layernorm.weight", "attn_post_norm.weight", True),
              _t(L + "pre_feedforward_layernorm.weight", "mlp_norm.weight", True),
              _t(L + "post_feedforward_layernorm.weight", "mlp_post_norm.weight", True)]
    else:
        t += [_t(L + "post_attention_layernorm.weight", "mlp_norm.weight", True)]
    for s in ("gate", "up", "down"):
        t += _wb(L + f"mlp.{s}_proj", f"mlp.{s}", required_weight=True)
    t += [_t("{prefix}norm.weight", "final_norm.weight", True), _t("lm_head.weight", "lm_head.weight")]
    return t


_LLAMA_ATTRS = {"norm": "rmsnorm", "norm_weight_offset": 0.0, "norm_placement": "pre", "mlp": "gated",
                "activation": "hidden_act", "position": "rope", "parallel_block": False}
_GEMMA_ATTRS = dict(_LLAMA_ATTRS, norm_weight_offset=1.0, embed_scale="sqrt(hidden_size)",
                    activation="hidden_activation", tied_embeddings_default=True)


def _spec(family: str, model_types: list[str], architectures: list[str], tensors: list[dict[str, Any]],
          *, prefixes: list[str], attributes: Mapping[str, Any], ignore: Iterable[str] = (),
          passthrough: Iterable[str] = (),
          detect: Mapping[str, list[str]] | None = None, dims: Mapping[str, Any] | None = None,
          description: str = "") -> dict[str, Any]:
    d: dict[str, Any] = {
        "merge_fast_arch": 1, "family": family, "description": description,
        "match": {"model_type": model_types, "architectures": architectures},
        "prefixes": prefixes, "attributes": dict(attributes), "ignore": list(ignore), "tensors": tensors,
    }
    if detect:
        d["detect"] = dict(detect)
    if passthrough:
        d["passthrough"] = list(passthrough)
    if dims:
        d["dims"] = dict(dims)
    return d


def _phi3() -> list[dict[str, Any]]:
    L = "{prefix}layers.{layer}."
    return [
        _t("{prefix}embed_tokens.weight", "embed.weight", True),
        _t(L + "input_layernorm.weight", "attn_norm.weight", True),
        {"name": L + "self_attn.qkv_proj.weight", "required": True,
         "split": {"axis": 0, "layout": "concat", "parts": [
             ["attn.q.weight", "num_heads * head_dim"],
             ["attn.k.weight", "num_kv_heads * head_dim"],
             ["attn.v.weight", "num_kv_heads * head_dim"]]}},
        _t(L + "self_attn.o_proj.weight", "attn.o.weight", True),
        _t(L + "post_attention_layernorm.weight", "mlp_norm.weight", True),
        {"name": L + "mlp.gate_up_proj.weight", "required": True,
         "split": {"axis": 0, "layout": "concat", "parts": [
             ["mlp.gate.weight", "intermediate_size"], ["mlp.up.weight", "intermediate_size"]]}},
        _t(L + "mlp.down_proj.weight", "mlp.down.weight", True),
        _t("{prefix}norm.weight", "final_norm.weight", True),
        _t("lm_head.weight", "lm_head.weight"),
    ]


def _phi() -> list[dict[str, Any]]:
    L = "{prefix}layers.{layer}."
    t = [_t("{prefix}embed_tokens.weight", "embed.weight", True)]
    t += _wb(L + "input_layernorm", "attn_norm", True, True)
    for s in ("q", "k", "v"):
        t += _wb(L + f"self_attn.{s}_proj", f"attn.{s}", True)
    t += _wb(L + "self_attn.dense", "attn.o", True)
    t += _wb(L + "self_attn.q_layernorm", "attn.q_norm") + _wb(L + "self_attn.k_layernorm", "attn.k_norm")
    t += _wb(L + "mlp.fc1", "mlp.up", True) + _wb(L + "mlp.fc2", "mlp.down", True)
    t += _wb("{prefix}final_layernorm", "final_norm", True, True)
    t += _wb("lm_head", "lm_head")
    return t


def _gpt_neox() -> list[dict[str, Any]]:
    L = "{prefix}layers.{layer}."
    qkv_parts = [["attn.q.weight", "head_dim"], ["attn.k.weight", "head_dim"], ["attn.v.weight", "head_dim"]]
    qkv_bias = [["attn.q.bias", "head_dim"], ["attn.k.bias", "head_dim"], ["attn.v.bias", "head_dim"]]
    t = [_t("{prefix}embed_in.weight", "embed.weight", True)]
    t += _wb(L + "input_layernorm", "attn_norm", True, True)
    t += [{"name": L + "attention.query_key_value.weight", "required": True,
           "split": {"axis": 0, "layout": "interleave", "groups": "num_heads", "parts": qkv_parts}},
          {"name": L + "attention.query_key_value.bias",
           "split": {"axis": 0, "layout": "interleave", "groups": "num_heads", "parts": qkv_bias}}]
    t += _wb(L + "attention.dense", "attn.o", True)
    t += _wb(L + "post_attention_layernorm", "mlp_norm", True, True)
    t += _wb(L + "mlp.dense_h_to_4h", "mlp.up", True) + _wb(L + "mlp.dense_4h_to_h", "mlp.down", True)
    t += _wb("{prefix}final_layer_norm", "final_norm", True, True)
    t += [_t("embed_out.weight", "lm_head.weight")]
    return t


def _opt() -> list[dict[str, Any]]:
    L = "{prefix}layers.{layer}."
    t = [_t("{prefix}embed_tokens.weight", "embed.weight", True),
         _t("{prefix}embed_positions.weight", "pos_embed.weight", True),
         _t("{prefix}project_in.weight", "embed_proj_in.weight"),
         _t("{prefix}project_out.weight", "embed_proj_out.weight")]
    t += _wb(L + "self_attn_layer_norm", "attn_norm", True, True)
    for s in ("q", "k", "v"):
        t += _wb(L + f"self_attn.{s}_proj", f"attn.{s}", True)
    t += _wb(L + "self_attn.out_proj", "attn.o", True)
    t += _wb(L + "final_layer_norm", "mlp_norm", True, True)
    t += _wb(L + "fc1", "mlp.up", True) + _wb(L + "fc2", "mlp.down", True)
    t += _wb("{prefix}final_layer_norm", "final_norm")  # absent when do_layer_norm_before=False
    t += [_t("lm_head.weight", "lm_head.weight")]
    return t


def _gpt2() -> list[dict[str, Any]]:
    L = "{prefix}h.{layer}."
    qkv = [["attn.q.weight", "hidden_size"], ["attn.k.weight", "hidden_size"], ["attn.v.weight", "hidden_size"]]
    qkv_b = [["attn.q.bias", "hidden_size"], ["attn.k.bias", "hidden_size"], ["attn.v.bias", "hidden_size"]]
    t = [_t("{prefix}wte.weight", "embed.weight", True), _t("{prefix}wpe.weight", "pos_embed.weight", True)]
    t += _wb(L + "ln_1", "attn_norm", True, True)
    # Conv1D: weight [in, out]; transpose -> [3*hidden, hidden] then q|k|v along axis 0
    t += [{"name": L + "attn.c_attn.weight", "required": True, "transpose": True,
           "split": {"axis": 0, "layout": "concat", "parts": qkv}},
          {"name": L + "attn.c_attn.bias", "required": True,
           "split": {"axis": 0, "layout": "concat", "parts": qkv_b}}]
    t += [_t(L + "attn.c_proj.weight", "attn.o.weight", True, transpose=True),
          _t(L + "attn.c_proj.bias", "attn.o.bias", True)]
    t += _wb(L + "ln_2", "mlp_norm", True, True)
    t += [_t(L + "mlp.c_fc.weight", "mlp.up.weight", True, transpose=True), _t(L + "mlp.c_fc.bias", "mlp.up.bias", True),
          _t(L + "mlp.c_proj.weight", "mlp.down.weight", True, transpose=True),
          _t(L + "mlp.c_proj.bias", "mlp.down.bias", True)]
    t += _wb("{prefix}ln_f", "final_norm", True, True)
    t += [_t("lm_head.weight", "lm_head.weight")]
    return t


def _bert() -> list[dict[str, Any]]:
    E, L = "{prefix}embeddings.", "{prefix}encoder.layer.{layer}."
    t = [_t(E + "word_embeddings.weight", "embed.weight", True),
         _t(E + "position_embeddings.weight", "pos_embed.weight"),
         _t(E + "token_type_embeddings.weight", "type_embed.weight")]
    t += _wb(E + "LayerNorm", "embed_norm", True, True)
    t += _wb(L + "attention.self.query", "attn.q", True) + _wb(L + "attention.self.key", "attn.k", True)
    t += _wb(L + "attention.self.value", "attn.v", True) + _wb(L + "attention.output.dense", "attn.o", True)
    t += _wb(L + "attention.output.LayerNorm", "attn_norm", True, True)
    t += _wb(L + "intermediate.dense", "mlp.up", True) + _wb(L + "output.dense", "mlp.down", True)
    t += _wb(L + "output.LayerNorm", "mlp_norm", True, True)
    t += _wb("{prefix}pooler.dense", "pooler")
    t += _wb("cls.predictions.transform.dense", "mlm.dense") + _wb("cls.predictions.transform.LayerNorm", "mlm.norm")
    t += [_t("cls.predictions.decoder.weight", "lm_head.weight"), _t("cls.predictions.bias", "lm_head.bias")]
    t += _wb("cls.seq_relationship", "nsp_head") + _wb("classifier", "classifier")
    return t


def _roberta() -> list[dict[str, Any]]:
    E, L = "{prefix}embeddings.", "{prefix}encoder.layer.{layer}."
    t = [_t(E + "word_embeddings.weight", "embed.weight", True),
         _t(E + "position_embeddings.weight", "pos_embed.weight"),
         _t(E + "token_type_embeddings.weight", "type_embed.weight")]
    t += _wb(E + "LayerNorm", "embed_norm", True, True)
    t += _wb(L + "attention.self.query", "attn.q", True) + _wb(L + "attention.self.key", "attn.k", True)
    t += _wb(L + "attention.self.value", "attn.v", True) + _wb(L + "attention.output.dense", "attn.o", True)
    t += _wb(L + "attention.output.LayerNorm", "attn_norm", True, True)
    t += _wb(L + "intermediate.dense", "mlp.up", True) + _wb(L + "output.dense", "mlp.down", True)
    t += _wb(L + "output.LayerNorm", "mlp_norm", True, True)
    t += _wb("{prefix}pooler.dense", "pooler")
    t += _wb("lm_head.dense", "mlm.dense") + _wb("lm_head.layer_norm", "mlm.norm")
    t += [_t("lm_head.decoder.weight", "lm_head.weight"), _t("lm_head.bias", "lm_head.bias")]
    return t


def _t5(gated: bool) -> list[dict[str, Any]]:
    """The decoder of T5: block layer 0 = self-attention, 1 = cross-attention, 2 = MLP."""
    L = "decoder.block.{layer}.layer."
    t = [_t("shared.weight", "embed.weight", True)]
    t += [_t(L + "0.layer_norm.weight", "attn_norm.weight", True)]
    t += [_t(L + f"0.SelfAttention.{s}.weight", f"attn.{s}.weight", True) for s in "qkvo"]
    t += [_t(L + "1.layer_norm.weight", "cross_attn_norm.weight", True)]
    t += [_t(L + f"1.EncDecAttention.{s}.weight", f"cross_attn.{s}.weight", True) for s in "qkvo"]
    t += [_t(L + "2.layer_norm.weight", "mlp_norm.weight", True)]
    if gated:
        t += [_t(L + "2.DenseReluDense.wi_0.weight", "mlp.gate.weight", True),
              _t(L + "2.DenseReluDense.wi_1.weight", "mlp.up.weight", True)]
    else:
        t += [_t(L + "2.DenseReluDense.wi.weight", "mlp.up.weight", True)]
    t += [_t(L + "2.DenseReluDense.wo.weight", "mlp.down.weight", True)]
    t += [_t("decoder.final_layer_norm.weight", "final_norm.weight", True), _t("lm_head.weight", "lm_head.weight")]
    return t


_T5_ATTRS = {"norm": "rmsnorm", "norm_weight_offset": 0.0, "norm_placement": "pre", "activation": "dense_act_fn",
             "position": "relative_bias", "parallel_block": False, "attention_scale": "none",
             "decoder_output_scale": "scale_decoder_outputs", "encoder_decoder": True,
             "tied_embeddings_default": True}
# the encoder (and both stacks' relative position tables) pass through verbatim
_T5_PASS = [r"^encoder\.", r"relative_attention_bias\.weight$"]
# tied aliases of shared.weight (transformers does not save them; old checkpoints may)
_T5_IGNORE = [r"^(encoder|decoder)\.embed_tokens\.weight$"]

_LN = {"norm": "layernorm", "norm_weight_offset": 0.0, "norm_placement": "pre", "parallel_block": False}

#: Built-in family specs, in name-only detection priority order (most specific first).
BUILTIN_SPECS: tuple[dict[str, Any], ...] = (
    _spec("gemma3", ["gemma3"], ["Gemma3ForConditionalGeneration"],
          [*_llama_like(q_norm=True, sandwich=True)[:-1], _t("language_model.lm_head.weight", "lm_head.weight")],
          prefixes=["language_model.model."], attributes=dict(_GEMMA_ATTRS, norm_placement="sandwich", multimodal=True),
          ignore=_ROPE_BUFFERS, passthrough=[r"^vision_tower\.", r"^multi_modal_projector\."],
          detect={"require": [r"^language_model\.model\.layers\.\d+\.pre_feedforward_layernorm\.weight$",
                              r"self_attn\.q_norm\.weight$"]},
          description="Gemma 3 multimodal: the language model is mapped (same keys as gemma3_text), the vision "
                      "tower and projector pass through verbatim; sizes come from config['text_config']"),
    _spec("gemma3_text", ["gemma3_text"], ["Gemma3ForCausalLM"], _llama_like(q_norm=True, sandwich=True),
          prefixes=["model.", ""], attributes=dict(_GEMMA_ATTRS, norm_placement="sandwich"), ignore=_ROPE_BUFFERS,
          detect={"require": [r"pre_feedforward_layernorm\.weight$", r"self_attn\.q_norm\.weight$"]},
          description="Gemma 3 text decoder: sandwich norms, q/k norms, (1+w) RMSNorm"),
    _spec("gemma2", ["gemma2"], ["Gemma2ForCausalLM"], _llama_like(sandwich=True),
          prefixes=["model.", ""], attributes=dict(_GEMMA_ATTRS, norm_placement="sandwich"), ignore=_ROPE_BUFFERS,
          detect={"require": [r"pre_feedforward_layernorm\.weight$"], "forbid": [r"self_attn\.q_norm\.weight$"]},
          description="Gemma 2: sandwich norms, (1+w) RMSNorm"),
    _spec("qwen3", ["qwen3"], ["Qwen3ForCausalLM"], _llama_like(q_norm=True),
          prefixes=["model.", ""], attributes=_LLAMA_ATTRS, ignore=_ROPE_BUFFERS,
          detect={"require": [r"self_attn\.q_norm\.weight$"], "forbid": [r"pre_feedforward_layernorm"]},
          description="Qwen3 dense: Llama layout plus per-head q/k RMSNorm"),
    _spec("phi3", ["phi3"], ["Phi3ForCausalLM"], _phi3(), prefixes=["model.", ""],
          attributes=dict(_LLAMA_ATTRS), ignore=_ROPE_BUFFERS,
          description="Phi-3: fused qkv_proj (q|k|v, GQA sizes) and gate_up_proj (gate|up)"),
    _spec("phi", ["phi"], ["PhiForCausalLM"], _phi(), prefixes=["model.", ""],
          attributes=dict(_LN, mlp="plain", activation="hidden_act", position="partial_rope", parallel_block=True),
          ignore=_ROPE_BUFFERS,
          description="Phi-1/1.5/2: parallel block with one LayerNorm, plain MLP (fc1->up, fc2->down), lm_head bias"),
    _spec("gpt_neox", ["gpt_neox"], ["GPTNeoXForCausalLM"], _gpt_neox(), prefixes=["gpt_neox.", ""],
          attributes=dict(_LN, mlp="plain", activation="hidden_act", position="partial_rope",
                          parallel_block="use_parallel_residual"),
          ignore=[r"(^|\.)attention\.(bias|masked_bias)$", r"(^|\.)rotary_emb\.inv_freq$"],
          description="GPT-NeoX / Pythia: query_key_value interleaved per head ([heads, 3, head_dim])"),
    _spec("opt", ["opt"], ["OPTForCausalLM"], _opt(), prefixes=["model.decoder.", "decoder."],
          attributes=dict(_LN, mlp="plain", activation="activation_function", position="learned",
                          pos_embed_offset=2, tied_embeddings_default=True,
                          norm_placement="pre (post when do_layer_norm_before is false)"),
          description="OPT: learned positions (offset 2), optional project_in/out, plain MLP"),
    _spec("gpt2", ["gpt2"], ["GPT2LMHeadModel", "GPT2Model"], _gpt2(), prefixes=["transformer.", ""],
          attributes=dict(_LN, mlp="plain", activation="activation_function", position="learned",
                          tied_embeddings_default=True, conv1d_transposed=True),
          ignore=[r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$"],
          description="GPT-2: Conv1D weights stored [in, out] (transposed here), fused c_attn q|k|v"),
    _spec("bert", ["bert"], ["BertModel", "BertForMaskedLM", "BertForPreTraining", "BertForSequenceClassification"],
          _bert(), prefixes=["", "bert."],
          attributes=dict(_LN, norm_placement="post", mlp="plain", activation="hidden_act", position="learned",
                          encoder=True, tied_embeddings_default=True),
          # position_ids: buffer; cls.predictions.decoder.bias: tied alias of cls.predictions.bias
          ignore=[r"(^|\.)embeddings\.position_ids$", r"^cls\.predictions\.decoder\.bias$"],
          description="BERT encoder (post-LN): attention.output.LayerNorm->attn_norm, output.LayerNorm->mlp_norm"),
    _spec("roberta", ["roberta"], ["RobertaModel", "RobertaForMaskedLM", "RobertaForCausalLM"], _roberta(),
          prefixes=["roberta.", ""],
          attributes=dict(_LN, norm_placement="post", mlp="plain", activation="hidden_act", position="learned",
                          pos_embed_offset="pad_token_id + 1", encoder=True, tied_embeddings_default=True),
          # position_ids / token_type_ids: buffers; lm_head.decoder.bias: tied alias of lm_head.bias
          ignore=[r"(^|\.)embeddings\.(position_ids|token_type_ids)$", r"^lm_head\.decoder\.bias$"],
          detect={"require": [r"^lm_head\.layer_norm\.|^roberta\."]},
          description="RoBERTa encoder (post-LN, BERT layout under 'roberta.', MLM head 'lm_head.*')"),
    _spec("t5_gated", ["t5", "mt5"], ["T5ForConditionalGeneration", "MT5ForConditionalGeneration"], _t5(True),
          prefixes=[""], attributes=dict(_T5_ATTRS, mlp="gated"), passthrough=_T5_PASS, ignore=_T5_IGNORE,
          description="T5 v1.1 / mT5 / Flan-T5 (gated-gelu): the decoder is mapped (self-attention attn.*, "
                      "cross-attention cross_attn.*, wi_0->mlp.gate, wi_1->mlp.up, wo->mlp.down); the encoder and "
                      "relative position tables pass through"),
    _spec("t5", ["t5"], ["T5ForConditionalGeneration"], _t5(False),
          prefixes=[""], attributes=dict(_T5_ATTRS, mlp="plain"), passthrough=_T5_PASS, ignore=_T5_IGNORE,
          description="T5 (ReLU MLP): the decoder is mapped (self-attention attn.*, cross-attention cross_attn.*, "
                      "wi->mlp.up, wo->mlp.down); the encoder and relative position tables pass through"),
    _spec("granite", ["granite"], ["GraniteForCausalLM"], _llama_like(), prefixes=["model.", ""],
          attributes=dict(_LLAMA_ATTRS, multipliers={"embed": "embedding_multiplier",
                                                     "residual": "residual_multiplier",
                                                     "attention": "attention_multiplier",
                                                     "logits": "logits_scaling"}),
          ignore=_ROPE_BUFFERS, detect={"require": [r"^$"]},
          description="IBM Granite (3.x): Llama layout; embedding/residual/attention multipliers and logits "
                      "scaling are config scalars (folded into the weights by cross-family alignment)"),
    _spec("qwen2", ["qwen2"], ["Qwen2ForCausalLM"], _llama_like(), prefixes=["model.", ""],
          attributes=_LLAMA_ATTRS, ignore=_ROPE_BUFFERS,
          detect={"require": [r"self_attn\.q_proj\.bias$"], "forbid": [r"self_attn\.o_proj\.bias$"]},
          description="Qwen2 / Qwen2.5: Llama layout with q/k/v biases"),
    _spec("llama", ["llama"], ["LlamaForCausalLM"], _llama_like(), prefixes=["model.", ""],
          attributes=_LLAMA_ATTRS, ignore=_ROPE_BUFFERS,
          description="Llama 1-3 (optional attention_bias / mlp_bias)"),
    # same tensor names as llama: never chosen by name-only detection (llama is returned)
    _spec("mistral", ["mistral"], ["MistralForCausalLM"], _llama_like(), prefixes=["model.", ""],
          attributes=_LLAMA_ATTRS, ignore=_ROPE_BUFFERS, detect={"require": [r"^$"]},
          description="Mistral: Llama layout (sliding window is a config matter)"),
    _spec("gemma", ["gemma"], ["GemmaForCausalLM"], _llama_like(), prefixes=["model.", ""],
          attributes=_GEMMA_ATTRS, ignore=_ROPE_BUFFERS, detect={"require": [r"^$"]},
          description="Gemma 1: Llama layout, (1+w) RMSNorm, scaled embeddings, tied lm_head"),
)

_BUILTIN: dict[str, Family] = {}
_USER: dict[str, Family] = {}


def _builtins() -> dict[str, Family]:
    if not _BUILTIN:
        for spec in BUILTIN_SPECS:
            _BUILTIN[spec["family"]] = Family.from_spec(spec, source=f"<builtin {spec['family']}>")
    return _BUILTIN


def registered_families() -> list[Family]:
    """User-registered families (most recent first) followed by built-ins in priority order."""
    return [*reversed(list(_USER.values())), *_builtins().values()]


def list_families() -> list[str]:
    """Names of all known families (user-registered ones first)."""
    return [f.name for f in registered_families()]


def get_family(name: str) -> Family:
    """A family by name (user-registered families shadow built-ins of the same name)."""
    if name in _USER:
        return _USER[name]
    b = _builtins()
    if name in b:
        return b[name]
    for f in registered_families():  # model_type aliases, e.g. "gemma3_text"
        if name in f.model_types:
            return f
    raise UnknownFamilyError(f"unknown family {name!r}; known: {', '.join(list_families())}")


def register_family(family: "Family | Mapping[str, Any]", *, replace: bool = False) -> Family:
    """Register a family (or a spec mapping) so :func:`detect_family` and :func:`get_family` see it.

    Raises :class:`MappingFileError` if a user family of that name exists and not ``replace``.
    """
    fam = family if isinstance(family, Family) else Family.from_spec(family)
    if fam.name in _USER and not replace:
        raise MappingFileError(f"family {fam.name!r} is already registered (pass replace=True)")
    _USER.pop(fam.name, None)
    _USER[fam.name] = fam
    return fam


def unregister_family(name: str) -> None:
    """Remove a user-registered family (no-op if absent)."""
    _USER.pop(name, None)
