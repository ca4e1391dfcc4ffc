"""A tiny implementation of the QED-75M layout (as its model card describes it), loaded with
``trust_remote_code=True`` from a folder whose config.json has ``auto_map``.

Tensors: ``model.embed_tokens`` [vocab, d_model]; per block ``model.layers.{i}.attn_norm``
(RMSNorm), ``attn.{q,k,v,o}_proj`` (Linear(d_model, d_model, bias=config.bias), RoPE,
head_dim = d_model / n_heads), ``mlp_norm`` (RMSNorm), ``mlp.{gate,up,down}_proj``
(SwiGLU); ``model.norm``; ``lm_head`` with a bias, its weight tied to ``embed_tokens``
when ``tie_word_embeddings`` (then the checkpoint holds ``lm_head.bias`` only).
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

try:
    from .configuration_qed import QEDConfig
except ImportError:  # imported as a plain module
    from configuration_qed import QEDConfig


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, theta):
    # x: [batch, heads, seq, head_dim]; rotate pairs (first half, second half)
    hd, seq = x.shape[-1], x.shape[-2]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=x.device) / hd))
    ang = torch.arange(seq, dtype=torch.float32, device=x.device)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(x.dtype), torch.cat([ang.sin()] * 2, -1).to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, b = cfg.d_model, cfg.bias
        self.n_heads, self.theta = cfg.n_heads, cfg.rope_theta
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=b), nn.Linear(d, d, bias=b)
        self.v_proj, self.o_proj = nn.Linear(d, d, bias=b), nn.Linear(d, d, bias=b)

    def forward(self, x):
        B, T, D = x.shape
        h = self.n_heads

        def split(t):
            return t.view(B, T, h, D // h).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        q, k = rope(q, self.theta), rope(k, self.theta)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden_dim, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.d_model, cfg.norm_eps), Attention(cfg)
        self.mlp_norm, self.mlp = RMSNorm(cfg.d_model, cfg.norm_eps), MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class QEDModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, input_ids):
        x = self.embed_tokens(input_ids)
        for blk in self.layers:
            x = blk(x)
        return self.norm(x)


class QEDPreTrainedModel(PreTrainedModel):
    config_class = QEDConfig
    base_model_prefix = "model"

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class QEDForCausalLM(QEDPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = QEDModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=True)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)
