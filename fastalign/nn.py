"""Module forms of the fastalign operators, for use inside models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastalign.ops.dimension_correlation import (
    DEFAULT_OFF_DIAGONAL_WEIGHT,
    dimension_correlation_loss,
)
from fastalign.ops.prototypes import prototype_assign, prototype_update
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


class PrototypeBank(nn.Module):
    """K prototypes of dimension D with :func:`fastalign.prototype_assign` and
    :func:`fastalign.prototype_update` (PICO prototypes, SwAV-style codes).

    The prototypes start as random unit rows (from ``generator`` when given). They are a
    buffer updated by :meth:`update` (EMA), or an ``nn.Parameter`` trained by the optimiser
    when ``learnable``; either way they live in ``state_dict`` under ``"prototypes"``.

    ``assign(x (N, D))`` / ``forward`` returns the (N, K) assignments; ``update(x (N, D),
    assignments (N, K))`` moves the prototypes in place and returns them.
    """

    prototypes: Tensor

    def __init__(
        self,
        num_prototypes: int,
        dim: int,
        mode: str = "softmax",
        tau: float = 0.1,
        iters: int = 3,
        normalize: bool = True,
        momentum: float = 0.9,
        learnable: bool = False,
        backend: str = "auto",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        initial = F.normalize(torch.randn(num_prototypes, dim, generator=generator), dim=1)
        if learnable:
            self.prototypes = nn.Parameter(initial)
        else:
            self.register_buffer("prototypes", initial)
        self.options = dict(mode=mode, tau=tau, iters=iters, normalize=normalize, backend=backend)
        self.momentum = momentum

    def assign(self, x: Tensor, mode: str | None = None) -> Tensor:
        """(N, K) assignments of x (N, D); ``mode`` overrides the bank's for this call."""
        options = self.options if mode is None else {**self.options, "mode": mode}
        return prototype_assign(x, self.prototypes, **options)

    def forward(self, x: Tensor) -> Tensor:
        return self.assign(x)

    @torch.no_grad()
    def update(self, x: Tensor, assignments: Tensor) -> Tensor:
        """EMA step towards the assignment-weighted means of x, in place (re-normalised rows
        when the bank assigns by cosine); returns the prototypes."""
        moved = prototype_update(
            self.prototypes,
            x,
            assignments,
            self.momentum,
            normalize=self.options["normalize"],
            backend=self.options["backend"],
        )
        self.prototypes.copy_(moved)
        return self.prototypes

    def extra_repr(self) -> str:
        count, dim = self.prototypes.shape
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{count}, {dim}, {options}, momentum={self.momentum}"
