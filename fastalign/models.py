"""The shared matching model: the backbone's encoders plus the fused fine-grained score.

:class:`MatchingModel` encodes a batch into region and word :class:`~fastalign.tokens.Tokens`
(see :mod:`fastalign.encoders`) and scores them with
:func:`fastalign.region_word_similarity`; methods build on it (``fastalign.methods``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from fastalign._backends import BACKENDS
from fastalign.encoders import RegionEncoder, TextEncoder
from fastalign.fields import check_fields, setting
from fastalign.ops._options import AGGREGATES, ALIGNS, DIRECTIONS
from fastalign.ops.region_word import SCORE_ACTIVATIONS, region_word_similarity
from fastalign.tokens import Tokens


@dataclass
class ModelConfig:
    """Backbone and similarity options; the similarity ones are those of
    :func:`fastalign.region_word_similarity`. ``score_scale`` multiplies the score before
    the loss (CHAN's own score is ours divided by its tau: scale 10)."""

    feature_dim: int = setting(2048, minimum=1)
    embed_dim: int = setting(1024, minimum=1)
    word_dim: int = setting(300, minimum=1)
    # "bert" needs transformers and bert_path
    text_encoder: str = setting("bigru", choices=("bigru", "bert"))
    bert_path: str | None = None  # a local save_pretrained folder; never downloaded
    self_attention: bool = False
    direction: str = setting("t2i", choices=DIRECTIONS)
    align: str = setting("max", choices=ALIGNS)
    aggregate: str = setting("mean", choices=AGGREGATES)
    align_tau: float = setting(0.1, above=0)
    aggregate_tau: float = setting(0.1, above=0)
    score_activation: str | None = setting(None, choices=SCORE_ACTIVATIONS)
    score_scale: float = setting(1.0, above=0)
    backend: str = setting("auto", choices=BACKENDS)

    def __post_init__(self) -> None:
        check_fields(self, "model.")

    def similarity_options(self) -> dict:
        keys = ("direction", "align", "aggregate", "align_tau", "aggregate_tau")
        return {k: getattr(self, k) for k in keys} | {
            "score_activation": self.score_activation,
            "backend": self.backend,
        }


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

    def encode_images(self, regions: Tensor, region_lengths: Tensor) -> Tokens:
        """(B, R, F) region features with (B,) lengths -> (B, R, D) region embeddings."""
        return Tokens(self.image_encoder(regions, region_lengths), region_lengths)

    def encode_captions(self, captions: Tensor, caption_lengths: Tensor) -> Tokens:
        """(B, L) token ids with (B,) lengths -> (B, L, D) word embeddings."""
        return Tokens(self.text_encoder(captions, caption_lengths), caption_lengths)

    def similarity(self, images: Tokens, captions: Tokens) -> Tensor:
        """(Ni, R, D) region and (Nt, L, D) word embeddings -> (Ni, Nt) scaled scores."""
        scores = region_word_similarity(
            images.embs,
            captions.embs,
            images.lengths,
            captions.lengths,
            **self.config.similarity_options(),
        )
        return scores * self.config.score_scale

    def forward(
        self, regions: Tensor, region_lengths: Tensor, captions: Tensor, caption_lengths: Tensor
    ) -> tuple[Tokens, Tokens]:
        """A batch of pairs -> (image tokens, caption tokens); scores come from
        :meth:`similarity` (a distributed loss gathers the tokens before scoring)."""
        return (
            self.encode_images(regions, region_lengths),
            self.encode_captions(captions, caption_lengths),
        )
