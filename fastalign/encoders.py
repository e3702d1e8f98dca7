"""The shared backbone's encoders (VSE++ / SCAN / CHAN protocol).

Images: precomputed region features -> Linear (optionally one self-attention layer) ->
L2-normalised region embeddings. Captions: word embedding (optionally initialised from
word vectors) -> bidirectional GRU, the two directions averaged -> L2-normalised word
embeddings (:class:`fastalign.bert.BertTextEncoder` is the optional alternative).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from fastalign.data import Vocabulary, read_captions
from fastalign.recurrent import bidirectional_gru_mean

if TYPE_CHECKING:
    from fastalign.models import ModelConfig


class _L2Normalize(torch.autograd.Function):
    """``F.normalize(x, dim=-1)`` that keeps only its output and the norms for the backward
    (autograd's version keeps the input too: one more embedding-sized tensor per encoder)."""

    @staticmethod
    def forward(ctx, x, eps):
        raw_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        clamped = raw_norm < eps  # there the divisor is the constant eps: no radial part
        norm = raw_norm.clamp_min_(eps)
        y = x / norm
        ctx.save_for_backward(y, norm, clamped)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        y, norm, clamped = ctx.saved_tensors
        radial = (grad_y * y).sum(-1, keepdim=True).masked_fill_(clamped, 0)
        return (grad_y - y * radial) / norm, None


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows of x (..., D) to unit L2 norm, as ``F.normalize(x, dim=-1, eps=eps)``."""
    return _L2Normalize.apply(x, eps)


class RegionEncoder(nn.Module):
    """(B, R, F) region features -> (B, R, D) L2-normalised region embeddings."""

    def __init__(self, feature_dim: int, embed_dim: int, self_attention: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(feature_dim, embed_dim)
        self.attention = (
            nn.TransformerEncoderLayer(
                embed_dim, nhead=8, dim_feedforward=embed_dim, batch_first=True
            )
            if self_attention
            else None
        )

    def forward(self, regions: Tensor, region_lengths: Tensor) -> Tensor:
        x = self.fc(regions)
        if self.attention is not None:
            padding = torch.arange(x.shape[1], device=x.device) >= region_lengths[:, None]
            x = self.attention(x, src_key_padding_mask=padding)
        return l2_normalize(x)


class TextEncoder(nn.Module):
    """(B, L) token ids with real lengths -> (B, L, D) L2-normalised word embeddings."""

    def __init__(
        self, vocab_size: int, word_dim: int, embed_dim: int, word_vectors: Tensor | None = None
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        if word_vectors is not None:
            if word_vectors.shape != (vocab_size, word_dim):
                raise ValueError(
                    f"word_vectors must have shape ({vocab_size}, {word_dim}), got "
                    f"{tuple(word_vectors.shape)}"
                )
            self.embedding.weight.data.copy_(word_vectors)
        self.gru = nn.GRU(word_dim, embed_dim, batch_first=True, bidirectional=True)
        self.embed_dim = embed_dim

    def forward(self, captions: Tensor, caption_lengths: Tensor) -> Tensor:
        # The GRU's parameters, run by the memory-lean implementation (same function).
        out = bidirectional_gru_mean(self.embedding(captions), caption_lengths, self.gru)
        return l2_normalize(out)


def caption_tokenizer(
    model_config: ModelConfig,
    state: dict | None = None,
    root: str | Path | None = None,
    split: str = "train",
):
    """The captions' tokenizer for a text encoder: BERT's own for ``text_encoder="bert"``,
    else the vocabulary saved in ``state`` (a checkpoint's), else one built from the
    ``split`` captions under ``root``."""
    if model_config.text_encoder == "bert":
        from fastalign.bert import BertCaptionTokenizer  # transformers is optional

        return BertCaptionTokenizer(model_config.bert_path)
    if state is not None:
        return Vocabulary.from_dict(state)
    if root is None:
        raise ValueError("caption_tokenizer needs a saved vocabulary or the data root to build one")
    return Vocabulary.build(read_captions(root, split))
