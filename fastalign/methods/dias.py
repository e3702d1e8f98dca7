"""DIAS (ACM MM 2024): dimension information alignment and sparse spatial constraint.

"Bridging the Modality Gap: Dimension Information Alignment and Sparse Spatial Constraint"
adds three regularizers to a fine-grained matching loss:

    L = L_loc + w_dim L_dim + w_inter L_inter + w_intra L_intra

- L_loc: the matching loss on the fine-grained (CHAN-style) score matrix, the trainer's
  hinge or InfoNCE [inferred: the paper's base model].
- Global embeddings: the masked mean of each image's region embeddings and of each
  caption's word embeddings [inferred: the paper's "mean-pooled local embeddings"].
- L_dim: :func:`fastalign.dimension_correlation_loss` of the paired global embeddings,
  barlow mode by default [inferred: the paper aligns each dimension with its counterpart and
  decorrelates the others].
- L_inter, L_intra: :func:`fastalign.sparse_spatial_loss` of the global embeddings, kind
  inter (|X - X^T|) and intra (|Y - Z|), with the threshold rule E_ij > mu_i + alpha sigma_i
  [inferred: the paper's sparse correlation selection].
- Weights w_dim = 10, w_inter = 0.05, w_intra = 0.1 [reported by a third-party
  reproduction, unverified].

Every weight and choice is a field of :class:`DiasConfig`; a weight of 0 disables its term,
which is then not computed at all (the ablation switch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fastalign.ops.dimension_correlation import (
    DEFAULT_OFF_DIAGONAL_WEIGHT,
    dimension_correlation_loss,
)
from fastalign.ops.sparse_spatial import sparse_spatial_loss

TERMS = ("dim", "inter", "intra")


@dataclass
class DiasConfig:
    """Weights and options of the DIAS regularizers (default weights: those a third-party
    reproduction reports, unverified).

    ``dim_*`` go to :func:`fastalign.dimension_correlation_loss`; ``select``, ``alpha``,
    ``k`` and ``temperature`` to :func:`fastalign.sparse_spatial_loss` (both kinds).
    """

    dim_weight: float = 10.0
    inter_weight: float = 0.05
    intra_weight: float = 0.1
    dim_mode: str = "barlow"
    dim_off_diagonal_weight: float = DEFAULT_OFF_DIAGONAL_WEIGHT
    dim_tau: float = 0.1
    select: str = "threshold"
    alpha: float = 1.0
    k: int | None = None
    temperature: float = 0.05

    def __post_init__(self) -> None:
        for term in TERMS:
            weight = getattr(self, f"{term}_weight")
            if not (isinstance(weight, (int, float)) and weight >= 0):
                raise ValueError(f"dias.{term}_weight must be a number >= 0, got {weight!r}")

    def weight(self, term: str) -> float:
        return float(getattr(self, f"{term}_weight"))


def pooled_embeddings(local: Tensor, lengths: Tensor | None) -> Tensor:
    """Masked mean over the valid tokens: (B, T, D) with (B,) lengths -> (B, D) [inferred]."""
    if lengths is None:
        return local.mean(dim=1)
    lengths = lengths.to(local.device)
    valid = torch.arange(local.shape[1], device=local.device) < lengths[:, None]
    # One batched product with the (B, T) averaging weights: no (B, T, D) temporary.
    weights = valid.to(local.dtype) / lengths[:, None].to(local.dtype)
    return torch.bmm(weights[:, None, :], local).squeeze(1)


def dias_regularizers(
    image_global: Tensor, text_global: Tensor, config: DiasConfig, backend: str = "auto"
) -> dict[str, Tensor]:
    """The unweighted DIAS regularizers of paired global embeddings (N, D), N >= 2.

    Returns a dict with ``"dim"``, ``"inter"`` and ``"intra"`` scalars, holding only the
    terms whose weight in ``config`` is positive (the others are not computed).
    """
    terms: dict[str, Tensor] = {}
    if config.dim_weight > 0:
        terms["dim"] = dimension_correlation_loss(
            image_global,
            text_global,
            mode=config.dim_mode,
            off_diagonal_weight=config.dim_off_diagonal_weight,
            tau=config.dim_tau,
            backend=backend,
        )
    for kind in ("inter", "intra"):
        if config.weight(kind) > 0:
            terms[kind] = sparse_spatial_loss(
                image_global,
                text_global,
                kind=kind,
                select=config.select,
                alpha=config.alpha,
                k=config.k,
                temperature=config.temperature,
                backend=backend,
            )
    return terms


def weighted_sum(terms: dict[str, Tensor], config: DiasConfig) -> Tensor | float:
    """sum_term w_term * term over the computed terms (0.0 when none is)."""
    return sum((config.weight(name) * value for name, value in terms.items()), 0.0)


def dias_loss(
    region_embs: Tensor,
    region_lengths: Tensor | None,
    word_embs: Tensor,
    word_lengths: Tensor | None,
    config: DiasConfig,
    backend: str = "auto",
    gather: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor | float, dict[str, Tensor]]:
    """The weighted DIAS regularizers of a batch's local embeddings, and the unweighted terms.

    The (B, R, D) region and (B, L, D) word embeddings are mean-pooled over their valid
    tokens (in float32 at least); ``gather`` (for example
    :func:`fastalign.distributed.all_gather_with_grad`) maps the pooled (B, D) embeddings to
    the global batch's before the terms are computed.
    """
    dtype = torch.promote_types(region_embs.dtype, torch.float32)
    image = pooled_embeddings(region_embs.to(dtype), region_lengths)
    text = pooled_embeddings(word_embs.to(dtype), word_lengths)
    if gather is not None:
        image, text = gather(image), gather(text)
    terms = dias_regularizers(image, text, config, backend)
    return weighted_sum(terms, config), terms
