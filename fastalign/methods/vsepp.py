"""VSE++ (Faghri et al., BMVC 2018): global embeddings, cosine score, hardest-negative hinge.

The image's global embedding is the mean of its region embeddings and the caption's the
mean of its word embeddings (over the valid tokens; our choice for region features, where
VSE++ itself takes one pooled CNN feature), each L2-normalised; the score is their cosine
times ``model.score_scale`` (1 by default). The loss is the trainer's: VSE++'s hinge with
the hardest negative (``loss: hinge``, ``margin: 0.2``) after the warm-up epochs. It is the
baseline that the fine-grained methods are measured against.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastalign.encoders import l2_normalize
from fastalign.methods import register_method
from fastalign.methods.base import Method
from fastalign.models import MatchingModel
from fastalign.tokens import Tokens


def _global(tokens: Tokens) -> Tokens:
    """(B, T, D) tokens -> (B, 1, D): the L2-normalised mean of the valid tokens."""
    pooled = l2_normalize(tokens.mean_pooled())
    return Tokens.dense(pooled[:, None, :])


class GlobalEmbeddingModel(MatchingModel):
    """The backbone's encoders, each sequence pooled into one L2-normalised embedding."""

    def encode_images(self, regions: Tensor, region_lengths: Tensor) -> Tokens:
        """(B, R, F) region features -> (B, 1, D) global image embeddings."""
        return _global(super().encode_images(regions, region_lengths))

    def encode_captions(self, captions: Tensor, caption_lengths: Tensor) -> Tokens:
        """(B, L) token ids -> (B, 1, D) global caption embeddings."""
        return _global(super().encode_captions(captions, caption_lengths))

    def similarity(self, images: Tokens, captions: Tokens) -> Tensor:
        """(Ni, 1, D) x (Nt, 1, D) -> (Ni, Nt) scaled cosines."""
        return torch.mm(images.embs[:, 0], captions.embs[:, 0].T) * self.config.score_scale


@register_method
class VsePP(Method):
    """VSE++: one global embedding per image and per caption, scored by their cosine."""

    name = "vsepp"

    def build_model(self, vocab_size: int, word_vectors: Tensor | None = None) -> nn.Module:
        return GlobalEmbeddingModel(vocab_size, self.config.model, word_vectors)
