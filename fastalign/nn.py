"""Module forms of the fastalign operators, for use inside models."""

from __future__ import annotations

from torch import Tensor, nn

from fastalign.ops.dimension_correlation import (
    DEFAULT_OFF_DIAGONAL_WEIGHT,
    dimension_correlation_loss,
)
from fastalign.ops.region_word import region_word_similarity
from fastalign.ops.sparse_spatial import sparse_spatial_loss


class RegionWordSimilarity(nn.Module):
    """:func:`fastalign.region_word_similarity` with its options fixed at construction.

    ``forward(regions (Ni, R, D), words (Nt, L, D), region_lengths=None, word_lengths=None)``
    returns the (Ni, Nt) score matrix.
    """

    def __init__(
        self,
        direction: str = "t2i",
        align: str = "max",
        aggregate: str = "mean",
        align_tau: float = 0.1,
        aggregate_tau: float = 0.1,
        score_activation: str | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.options = dict(
            direction=direction,
            align=align,
            aggregate=aggregate,
            align_tau=align_tau,
            aggregate_tau=aggregate_tau,
            score_activation=score_activation,
            backend=backend,
        )

    def forward(
        self,
        regions: Tensor,
        words: Tensor,
        region_lengths: Tensor | None = None,
        word_lengths: Tensor | None = None,
    ) -> Tensor:
        return region_word_similarity(regions, words, region_lengths, word_lengths, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class DimensionCorrelationLoss(nn.Module):
    """:func:`fastalign.dimension_correlation_loss` with its options fixed at construction.

    ``forward(a (N, D), b (N, D))`` returns the scalar regularizer of the paired features.
    """

    def __init__(
        self,
        mode: str = "barlow",
        off_diagonal_weight: float = DEFAULT_OFF_DIAGONAL_WEIGHT,
        tau: float = 0.1,
        eps: float = 1e-5,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.options = dict(
            mode=mode,
            off_diagonal_weight=off_diagonal_weight,
            tau=tau,
            eps=eps,
            backend=backend,
        )

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return dimension_correlation_loss(a, b, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class SparseSpatialLoss(nn.Module):
    """:func:`fastalign.sparse_spatial_loss` with its options fixed at construction.

    ``forward(img (N, D), txt (N, D))`` returns the scalar loss. ``alpha`` may be an
    ``nn.Parameter`` (0-d, or (N,) for a fixed batch size): it is registered, so that a soft
    threshold is learned with the model.
    """

    def __init__(
        self,
        kind: str = "inter",
        select: str = "threshold",
        alpha: float | Tensor = 1.0,
        k: int | None = None,
        temperature: float = 0.05,
        largest: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(alpha, nn.Parameter):
            self.alpha = alpha  # learned with the model
        elif isinstance(alpha, Tensor):
            self.register_buffer("alpha", alpha)  # moves with the model
        else:
            self.alpha = alpha
        self.options = dict(
            kind=kind, select=select, k=k, temperature=temperature, largest=largest, backend=backend
        )

    def forward(self, img: Tensor, txt: Tensor) -> Tensor:
        return sparse_spatial_loss(img, txt, alpha=self.alpha, **self.options)

    def extra_repr(self) -> str:
        alpha = "tensor" if isinstance(self.alpha, Tensor) else repr(self.alpha)
        return f"alpha={alpha}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())
