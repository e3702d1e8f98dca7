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

Every weight and choice is a field of :class:`DiasOptions` (the ``dias`` config section); a
weight of 0 disables its term, which is then not computed at all (the ablation switch): with
all three at 0 DIAS trains exactly as the ``baseline`` method with the same ``model``
section.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastalign.fields import check_fields, setting
from fastalign.methods import register_method
from fastalign.methods.base import LossContext, Method
from fastalign.ops._options import CORRELATION_MODES, SPATIAL_SELECTS
from fastalign.ops.dimension_correlation import (
    DEFAULT_OFF_DIAGONAL_WEIGHT,
    dimension_correlation_loss,
)
from fastalign.ops.sparse_spatial import sparse_spatial_loss
from fastalign.tokens import Tokens

TERMS = ("dim", "inter", "intra")


@dataclass
class DiasOptions:
    """Weights and options of the DIAS regularizers (the ``dias`` config section).

    ``dim_*`` go to :func:`fastalign.dimension_correlation_loss`; ``select``, ``alpha``,
    ``k`` and ``temperature`` to :func:`fastalign.sparse_spatial_loss` (both kinds).
    """

    dim_weight: float = setting(10.0, minimum=0)
    inter_weight: float = setting(0.05, minimum=0)
    intra_weight: float = setting(0.1, minimum=0)
    dim_mode: str = setting("barlow", choices=CORRELATION_MODES)
    dim_off_diagonal_weight: float = setting(DEFAULT_OFF_DIAGONAL_WEIGHT, minimum=0)
    dim_tau: float = setting(0.1, above=0)
    select: str = setting("threshold", choices=SPATIAL_SELECTS)
    alpha: float = 1.0
    k: int | None = setting(None, minimum=1)
    temperature: float = setting(0.05, above=0)

    def __post_init__(self) -> None:
        check_fields(self, "dias.")

    def weight(self, term: str) -> float:
        return float(getattr(self, f"{term}_weight"))


def dias_regularizers(
    image_global: Tensor, text_global: Tensor, options: DiasOptions, backend: str = "auto"
) -> dict[str, Tensor]:
    """The unweighted DIAS regularizers of paired global embeddings (N, D), N >= 2.

    Returns a dict with ``"dim"``, ``"inter"`` and ``"intra"`` scalars, holding only the
    terms whose weight in ``options`` is positive (the others are not computed).
    """
    terms: dict[str, Tensor] = {}
    if options.dim_weight > 0:
        terms["dim"] = dimension_correlation_loss(
            image_global,
            text_global,
            mode=options.dim_mode,
            off_diagonal_weight=options.dim_off_diagonal_weight,
            tau=options.dim_tau,
            backend=backend,
        )
    for kind in ("inter", "intra"):
        if options.weight(kind) > 0:
            terms[kind] = sparse_spatial_loss(
                image_global,
                text_global,
                kind=kind,
                select=options.select,
                alpha=options.alpha,
                k=options.k,
                temperature=options.temperature,
                backend=backend,
            )
    return terms


@register_method
class Dias(Method):
    """DIAS: the baseline's fine-grained matching loss plus the dimension-correlation and
    sparse spatial regularizers of the mean-pooled embeddings of the global batch."""

    name = "dias"
    Options = DiasOptions
    base = "baseline"
    additions_off = {f"{term}_weight": 0.0 for term in TERMS}

    def loss_terms(
        self, model: nn.Module, images: Tokens, captions: Tokens, context: LossContext
    ) -> dict[str, Tensor]:
        terms = super().loss_terms(model, images, captions, context)
        if not any(self.options.weight(term) > 0 for term in TERMS):
            return terms
        # Pooled in float32 at least; under DDP every process computes the same
        # regularizers of the gathered global batch.
        dtype = torch.promote_types(images.embs.dtype, torch.float32)
        image = context.gather(images.to(dtype).mean_pooled())
        text = context.gather(captions.to(dtype).mean_pooled())
        backend = self.config.model.backend
        return terms | dias_regularizers(image, text, self.options, backend)

    def loss_weights(self) -> dict[str, float]:
        return super().loss_weights() | {term: self.options.weight(term) for term in TERMS}
