"""The shared matching backbone (VSE++ / SCAN / CHAN protocol).

Images: precomputed region features -> Linear (optionally one self-attention layer) ->
L2-normalised region embeddings. Captions: word embedding (optionally initialised from
word vectors) -> bidirectional GRU, the two directions averaged -> L2-normalised word
embeddings. Their fine-grained score is ``fastalign.region_word_similarity``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from fastalign.ops.region_word import region_word_similarity
from fastalign.recurrent import bidirectional_gru_mean


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


@dataclass
class ModelConfig:
    """Backbone and similarity options; the similarity ones are those of
    :func:`fastalign.region_word_similarity`. ``score_scale`` multiplies the score before
    the loss (CHAN's own score is ours divided by its tau: scale 10)."""

    feature_dim: int = 2048
    embed_dim: int = 1024
    word_dim: int = 300
    text_encoder: str = "bigru"  # "bigru", or "bert" (needs transformers and bert_path)
    bert_path: str | None = None  # a local save_pretrained folder; never downloaded
    self_attention: bool = False
    direction: str = "t2i"
    align: str = "max"
    aggregate: str = "mean"
    align_tau: float = 0.1
    aggregate_tau: float = 0.1
    score_activation: str | None = None
    score_scale: float = 1.0
    backend: str = "auto"

    def similarity_options(self) -> dict:
        keys = ("direction", "align", "aggregate", "align_tau", "aggregate_tau")
        return {k: getattr(self, k) for k in keys} | {
            "score_activation": self.score_activation,
            "backend": self.backend,
        }


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


class MatchingModel(nn.Module):
    """Region and word encoders plus the fused fine-grained similarity."""

    def __init__(
        self, vocab_size: int, config: ModelConfig, word_vectors: Tensor | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.image_encoder = RegionEncoder(
            config.feature_dim, config.embed_dim, config.self_attention
        )
        if config.text_encoder == "bigru":
            self.text_encoder = TextEncoder(
                vocab_size, config.word_dim, config.embed_dim, word_vectors
            )
        elif config.text_encoder == "bert":
            if word_vectors is not None:
                raise ValueError("word_vectors initialise the BiGRU's embedding, not BERT's")
            from fastalign.bert import BertTextEncoder  # transformers is optional

            self.text_encoder = BertTextEncoder(config.bert_path, config.embed_dim)
        else:
            raise ValueError(
                f"model.text_encoder must be 'bigru' or 'bert', got {config.text_encoder!r}"
            )

    def encode_images(self, regions: Tensor, region_lengths: Tensor) -> Tensor:
        """(B, R, F) -> (B, R, D)."""
        return self.image_encoder(regions, region_lengths)

    def encode_captions(self, captions: Tensor, caption_lengths: Tensor) -> Tensor:
        """(B, L) -> (B, L, D)."""
        return self.text_encoder(captions, caption_lengths)

    def similarity(
        self, region_embs: Tensor, region_lengths: Tensor, word_embs: Tensor, word_lengths: Tensor
    ) -> Tensor:
        """(Ni, R, D) x (Nt, L, D) embeddings -> (Ni, Nt) scaled scores."""
        scores = region_word_similarity(
            region_embs,
            word_embs,
            region_lengths,
            word_lengths,
            **self.config.similarity_options(),
        )
        return scores * self.config.score_scale

    def forward(
        self,
        regions: Tensor,
        region_lengths: Tensor,
        captions: Tensor,
        caption_lengths: Tensor,
        embeddings_only: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """A batch of pairs -> the (B, B) image x caption score matrix, or with
        ``embeddings_only`` the (B, R, D) region and (B, L, D) word embeddings (what a
        distributed loss gathers before scoring)."""
        region_embs = self.encode_images(regions, region_lengths)
        word_embs = self.encode_captions(captions, caption_lengths)
        if embeddings_only:
            return region_embs, word_embs
        return self.similarity(region_embs, region_lengths, word_embs, caption_lengths)

    def describe(self) -> dict:
        return {"vocab_size": self.vocab_size, **asdict(self.config)}
