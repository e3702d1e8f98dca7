"""The calling convention above the operators: a batch of token sequences and their lengths.

Models return :class:`Tokens`, and the similarity functions of methods, the evaluation's
similarity matrix, the method losses and the distributed loss all take them, image side
first: ``similarity(images, captions) -> (Ni, Nt)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


class Tokens(NamedTuple):
    """Token embeddings ``embs`` (N, T, D) of N sequences, of which the first
    ``lengths[n]`` (N,) int64 tokens of sequence n are valid (1 <= lengths[n] <= T); the
    others are padding, which no score reads."""

    embs: Tensor
    lengths: Tensor

    @classmethod
    def dense(cls, embs: Tensor) -> Tokens:
        """Every one of the T tokens valid."""
        lengths = torch.full((embs.shape[0],), embs.shape[1], dtype=torch.int64, device=embs.device)
        return cls(embs, lengths)

    @property
    def count(self) -> int:
        """N, the number of sequences."""
        return self.embs.shape[0]

    def valid_mask(self) -> Tensor:
        """(N, T) bool: True at the valid tokens (the first lengths[n] of sequence n)."""
        device = self.embs.device
        return torch.arange(self.embs.shape[1], device=device) < self.lengths.to(device)[:, None]

    def mean_pooled(self) -> Tensor:
        """The mean over each sequence's valid tokens: (N, D)."""
        valid = self.valid_mask()
        # One batched product with the (N, T) averaging weights: no (N, T, D) temporary.
        weights = valid.to(self.embs.dtype) / self.lengths[:, None].to(self.embs.dtype)
        return torch.bmm(weights[:, None, :], self.embs).squeeze(1)

    def rows(self, start: int, stop: int) -> Tokens:
        """Sequences [start, stop)."""
        return Tokens(self.embs[start:stop], self.lengths[start:stop])

    def to(self, *args, **kwargs) -> Tokens:
        """``Tensor.to`` of the embeddings; the lengths follow to the same device only."""
        embs = self.embs.to(*args, **kwargs)
        return Tokens(embs, self.lengths.to(embs.device))


# (images (Ni, R, D), captions (Nt, L, D)) -> (Ni, Nt) scores.
SimilarityFn = Callable[[Tokens, Tokens], Tensor]
