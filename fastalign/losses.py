"""Matching losses on a (B, B) image x caption score matrix whose diagonal holds the pairs.

``positive_mask`` (B, B, bool) marks further positives (two captions of one image in the
same batch): they are never used as negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_scores(scores: Tensor, positive_mask: Tensor | None) -> Tensor:
    if not isinstance(scores, Tensor) or scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a square (B, B) tensor, got {shape}")
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    if positive_mask is None:
        return eye
    if positive_mask.shape != scores.shape or positive_mask.dtype != torch.bool:
        raise ValueError(
            f"positive_mask must be a bool tensor of shape {tuple(scores.shape)}, got "
            f"{positive_mask.dtype} {tuple(positive_mask.shape)}"
        )
    return positive_mask | eye


def positives_from_image_index(image_index: Tensor) -> Tensor:
    """(B, B) bool: pair k and caption l come from the same image."""
    return image_index[:, None] == image_index[None, :]


def hinge_terms(
    scores: Tensor,
    positive_scores: Tensor,
    positive_mask: Tensor,
    margin: float = 0.2,
    max_violation: bool = True,
) -> Tensor:
    """Per-row VSE++ hinge terms of a rectangular block.

    ``term[k] = max_l (or sum_l) [margin + scores[k, l] - positive_scores[k]]_+`` over the
    negatives ``l`` (entries outside ``positive_mask``). On a square matrix the rows give
    the caption terms of :func:`hinge_triplet_loss`, the rows of its
    transpose the image terms.

    Args:
        scores: (N, M) scores; row k is the anchor, columns the candidates.
        positive_scores: (N,) the anchor's matched-pair score.
        positive_mask: (N, M) bool, True where the candidate is a positive (never a
            negative); it must include the matched pair itself.
        margin: the hinge margin.
        max_violation: hardest negative only (VSE++), else the sum over negatives.

    Returns:
        (N,) terms.
    """
    cost = (margin + scores - positive_scores[:, None]).clamp(min=0).masked_fill(positive_mask, 0)
    return cost.max(dim=1).values if max_violation else cost.sum(dim=1)


def info_nce_terms(
    scores: Tensor, target: Tensor, positive_mask: Tensor, temperature: float = 0.05
) -> Tensor:
    """Per-row InfoNCE cross-entropy of a rectangular block.

    ``term[k] = -log softmax(scores[k] / temperature)[target[k]]``, the other positives of
    row k (``positive_mask`` except the target) left out of the softmax, as in
    :func:`info_nce_loss`.

    Args:
        scores: (N, M) scores.
        target: (N,) int64 column of each row's matched pair.
        positive_mask: (N, M) bool, positives of each row.
        temperature: softmax temperature (> 0).

    Returns:
        (N,) cross-entropies.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    is_target = F.one_hot(target, scores.shape[1]).bool()
    logits = (scores / temperature).masked_fill(positive_mask & ~is_target, float("-inf"))
    return F.cross_entropy(logits, target, reduction="none")


def hinge_triplet_loss(
    scores: Tensor,
    margin: float = 0.2,
    max_violation: bool = True,
    positive_mask: Tensor | None = None,
) -> Tensor:
    """VSE++ hinge triplet loss, summed over the batch (as VSE++ / SCAN / CHAN do).

    Args:
        scores: (B, B) scores, image k x caption l; the diagonal holds the matched pairs.
        margin: the hinge margin.
        max_violation: only the hardest negative of every row and column (VSE++); else
            the sum over all negatives (used for a warm-up epoch).
        positive_mask: (B, B) bool, further positives that are not negatives.
    """
    positives = _check_scores(scores, positive_mask)
    diagonal = scores.diagonal()
    per_image = hinge_terms(scores, diagonal, positives, margin, max_violation)
    per_caption = hinge_terms(scores.T, diagonal, positives.T, margin, max_violation)
    return per_image.sum() + per_caption.sum()


def info_nce_loss(
    scores: Tensor, temperature: float = 0.05, positive_mask: Tensor | None = None
) -> Tensor:
    """Symmetric InfoNCE (mean over the batch): softmax over captions per image and over
    images per caption at ``temperature``; further positives are left out of the softmax.
    """
    positives = _check_scores(scores, positive_mask)
    target = torch.arange(len(scores), device=scores.device)
    per_image = info_nce_terms(scores, target, positives, temperature)
    per_caption = info_nce_terms(scores.T, target, positives.T, temperature)
    return (per_image.mean() + per_caption.mean()) / 2
