"""The text side of the ECAMP pre-training model: context fusion (image tokens into the report) and the 6-layer
BERT masked-language model, built from transformers' BERT modules (the ``train`` extra)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MissingDependencyError
from .pretrain_config import ECAMPPretrainConfig

__all__ = ["ContextFusionLayer", "TextModel"]


def _bert_config(cfg: ECAMPPretrainConfig):
    try:
        from transformers import BertConfig
    except ImportError as e:
        raise MissingDependencyError("The full pre-training model (its BERT text side) needs transformers: "
                                     "pip install \"ecamp[train]\". Image encoders load without it.") from e

    bc = BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden_size,
                    num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                    intermediate_size=cfg.text_intermediate_size, hidden_act="gelu",
                    hidden_dropout_prob=cfg.text_dropout, attention_probs_dropout_prob=cfg.text_dropout,
                    max_position_embeddings=cfg.max_text_len, type_vocab_size=2, layer_norm_eps=1e-12,
                    pad_token_id=0, position_embedding_type="absolute")
    bc._attn_implementation = "sdpa"
    return bc


class ContextFusionLayer(nn.Module):
    """The authors' fusion layer, once before BERT: text self-attention, cross-attention from text to the visible
    image tokens plus the projected pooled-image token (local and global context), output projection, FFN."""

    def __init__(self, bert_config):
        super().__init__()
        from transformers.models.bert.modeling_bert import (
            BertAttention,
            BertCrossAttention,
            BertIntermediate,
            BertOutput,
            BertSelfOutput,
        )

        hidden = bert_config.hidden_size
        self.attention = BertAttention(bert_config)
        self.cross_self_attention = BertCrossAttention(bert_config)
        self.gap_mlp = nn.Linear(hidden, hidden)
        self.out_layer = BertSelfOutput(bert_config)
        self.intermediate = BertIntermediate(bert_config)
        self.output = BertOutput(bert_config)
        # `ecamp sr-windows` sets this to keep the text-to-image attention probabilities [B, heads, T, patches]
        self.keep_attention = False
        self.last_cross_attention: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor, attn_mask: torch.Tensor, image_tokens: torch.Tensor,
                gap_token: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(hidden, attn_mask)
        context, weights = self.cross_self_attention(attended, encoder_hidden_states=image_tokens,
                                                     attention_mask=None)
        if self.keep_attention:
            self.last_cross_attention = weights
        context = context + self.gap_mlp(gap_token)
        fused = self.out_layer(context, attended)
        return self.output(self.intermediate(fused), fused)


class TextModel(nn.Module):
    """BERT embeddings -> context fusion -> BERT encoder layers -> MLM head (no pooler: it was unused)."""

    def __init__(self, cfg: ECAMPPretrainConfig):
        super().__init__()
        self.bert_config = _bert_config(cfg)  # first: a clear error without transformers
        from transformers.models.bert.modeling_bert import BertEmbeddings, BertEncoder, BertOnlyMLMHead

        self.embeddings = BertEmbeddings(self.bert_config)
        self.context_fusion_layer = ContextFusionLayer(self.bert_config)
        self.encoder = BertEncoder(self.bert_config)
        self.cls = BertOnlyMLMHead(self.bert_config)
        # One output bias, as in BERT (the head's decoder bias and its `bias` are the same parameter).
        self.cls.predictions.decoder.bias = self.cls.predictions.bias
        if cfg.tie_word_embeddings:
            self.cls.predictions.decoder.weight = self.embeddings.word_embeddings.weight

    def forward(self, input_ids, attention_mask, token_type_ids, image_tokens, gap_token) -> torch.Tensor:
        hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        hidden = self.context_fusion_layer(hidden, additive, image_tokens, gap_token)
        hidden = self.encoder(hidden, attention_mask=additive).last_hidden_state
        return self.cls(hidden)
