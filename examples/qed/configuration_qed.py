"""QEDConfig: the configuration of the tiny QED-layout model used by examples/qed.py.

Keys follow the QED-75M card: ``d_model``, ``n_layers``, ``n_heads``, ``ffn_hidden_dim``,
``bias`` (attention projections), ``tie_word_embeddings``.
"""
from transformers import PretrainedConfig


class QEDConfig(PretrainedConfig):
    model_type = "qed"

    def __init__(self, vocab_size=256, d_model=64, n_layers=2, n_heads=4, ffn_hidden_dim=128, bias=False,
                 tie_word_embeddings=True, rope_theta=10000.0, norm_eps=1e-5, max_seq_len=256, **kwargs):
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.ffn_hidden_dim = ffn_hidden_dim
        self.bias = bias
        self.rope_theta = rope_theta
        self.norm_eps = norm_eps
        self.max_seq_len = max_seq_len
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
