"""Score-fusion re-ranking: a second model re-orders a base model's top-k of each query.

For each query (an image over the captions for i2t, a caption over the images for t2i),
the base model's k best gallery items are scored by a second model and re-ordered by a
fused score of the two; every other item keeps the base order and stays below those k
(MACK, NeurIPS 2022, re-ranks a base model's top 15 this way). The fusions of a query's
k pairs of scores (base b, second s):

- ``"zscore"``: ``z(b) + alpha * z(s)``, where z standardises the query's k scores (mean
  0, population std 1; k equal scores give 0). This is our reading of MASK (ICLR 2026),
  whose alpha is 0.15: z-scores make alpha independent of each model's score scale.
- ``"sum"``: ``b + alpha * s``, MACK's raw sum (the authors' script uses 0.1 for t2i and
  0.03 for i2t).

:func:`rerank_scores` returns a matrix whose order per query is the re-ranked one, so that
:func:`fastalign.evaluation.evaluate` ranks it unchanged; :func:`evaluate_reranked` gives
the recall table, each direction re-ranked along its own queries.
"""

from __future__ import annotations

from torch import Tensor

from fastalign.evaluation import RECALL_KS, RESULT_KEYS, check_positive_int, evaluate
from fastalign.ops._checks import check_finite, check_floating_tensor, check_number

FUSIONS = ("zscore", "sum")
# The options of ``fastalign eval --rerank-base``: MACK's k and MASK's alpha.
DEFAULT_K = 15
DEFAULT_ALPHA = 0.15
# What dim = 0 / 1 makes a query.
_QUERIES = {
    0: "t2i: each column a caption query over the images",
    1: "i2t: each row an image query over the captions",
}


def check_rerank_options(
    k: int, alpha: float, fusion: str, n_items: int | None = None, prefix: str = ""
) -> int:
    """Checks the re-ranking options; returns ``k`` as an int.

    ``n_items``: the number of items a query ranks (k may not exceed it), None: unchecked.
    ``prefix``: put before the options' names in the errors (``"--rerank-"`` on the command
    line).

    Raises:
        TypeError: k is not an int, alpha not a number.
        ValueError: k < 1 or k > n_items, alpha negative or not finite, an unknown fusion.
    """
    k = check_positive_int(f"{prefix}k", k)
    if n_items is not None and k > n_items:
        raise ValueError(
            f"{prefix}k must be <= {n_items}, the number of items a query ranks, got {k}"
        )
    check_number(f"{prefix}alpha", alpha, 0.0, low_ok=True)
    if fusion not in FUSIONS:
        raise ValueError(f"{prefix}fusion must be one of {FUSIONS}, got {fusion!r}")
    return k


def _top_k(scores: Tensor, k: int) -> Tensor:
    """(Q, k) column indices of each row's k highest scores, ascending; of the scores tied at
    the k-th place, those of the lowest indices (``torch.topk`` leaves ties unspecified)."""
    kth = scores.topk(k, dim=1).values[:, -1:]
    above = scores > kth
    tied = scores == kth
    room = k - above.sum(1, keepdim=True)  # >= 1: fewer than k scores are above the k-th
    chosen = above | (tied & (tied.cumsum(1) <= room))  # exactly k per row
    return chosen.nonzero()[:, 1].view(-1, k)  # nonzero lists them row by row


def _standardise(x: Tensor) -> Tensor:
    """z-scores of each row of ``x`` (Q, k): mean 0, population std 1; 0 for a row of equal
    values (whose std is 0, or the rounding noise of its mean)."""
    std = x.std(1, correction=0, keepdim=True)
    flat = (x.amax(1, keepdim=True) == x.amin(1, keepdim=True)) | (std == 0)
    z = (x - x.mean(1, keepdim=True)) / std.masked_fill(flat, 1.0)
    return z.masked_fill(flat, 0.0)


def _fuse(base: Tensor, second: Tensor, alpha: float, fusion: str) -> Tensor:
    if fusion == "zscore":
        return _standardise(base) + alpha * _standardise(second)
    return base + alpha * second


def rerank_scores(
    base: Tensor, second: Tensor, k: int, alpha: float, fusion: str = "zscore", dim: int = 1
) -> Tensor:
    """Re-ranks each query's top-k of ``base`` by the fused score of ``base`` and ``second``.

    Args:
        base: (n_images, n_captions) scores of the base model; floating point, finite.
        second: (n_images, n_captions) scores of the second model, on base's device.
        k: items re-ranked per query, 1 <= k <= ``base.shape[dim]`` (MACK: 15).
        alpha: weight of the second model, finite, >= 0 (alpha = 0 keeps the base order).
        fusion: ``"zscore"`` (``z(b) + alpha * z(s)`` over the query's k items) or ``"sum"``
            (``b + alpha * s``); see the module's docstring.
        dim: the dimension the queries' items run along: 1, each row is an image query over
            the captions (i2t); 0, each column is a caption query over the images (t2i).

    Returns:
        (n_images, n_captions) float64 scores on base's device whose order per query is:
        the base's top-k (of scores tied at the k-th place, the lowest indices) ordered by
        their fused score, then every other item in the base's order. Only that order per
        query is meaningful: outside the top-k the values are the base scores (ties among
        them stay ties, as :func:`fastalign.evaluation.evaluate` counts them), inside they
        are ``max(base over the query) + 1 + fused - min(fused over the top-k)``, above every
        other item (tied fused scores stay ties). float64 keeps fused scores that differ
        apart after that shift.

    Raises:
        TypeError: a matrix that is not a floating-point tensor, k not an int, alpha not a
            number.
        ValueError: shapes that are not 2-D or differ, devices that differ, non-finite scores
            (on CUDA under :func:`fastalign.set_finite_checks`' policy), dim not 0 or 1, k
            outside [1, base.shape[dim]], a negative or non-finite alpha, an unknown fusion.
    """
    check_floating_tensor("base", base, 2, "(n_images, n_captions)")
    check_floating_tensor("second", second, 2, "(n_images, n_captions)")
    if second.shape != base.shape:
        raise ValueError(
            f"second must have the shape of base, {tuple(base.shape)}, got {tuple(second.shape)}"
        )
    if second.device != base.device:
        raise ValueError(f"second must be on base's device {base.device}, got {second.device}")
    if isinstance(dim, bool) or dim not in (0, 1):
        raise ValueError(f"dim must be 1 ({_QUERIES[1]}) or 0 ({_QUERIES[0]}), got {dim!r}")
    k = check_rerank_options(k, alpha, fusion, n_items=base.shape[dim])
    check_finite("base", base)
    check_finite("second", second)
    # Queries as rows; float64 (a no-op for float64 inputs, which scatter does not modify).
    rows_base = (base if dim == 1 else base.t()).double()
    rows_second = (second if dim == 1 else second.t()).double()
    top = _top_k(rows_base, k)
    fused = _fuse(rows_base.gather(1, top), rows_second.gather(1, top), alpha, fusion)
    lift = rows_base.amax(1, keepdim=True) + 1 - fused.amin(1, keepdim=True)
    scores = rows_base.scatter(1, top, fused + lift)
    return scores if dim == 1 else scores.t().contiguous()


def evaluate_reranked(
    base: Tensor,
    second: Tensor,
    k: int,
    alpha: float,
    fusion: str = "zscore",
    captions_per_image: int = 5,
) -> dict[str, float]:
    """The recall table of :func:`fastalign.evaluation.evaluate` after re-ranking.

    i2t re-ranks each image's top-k captions (:func:`rerank_scores` with dim=1), t2i each
    caption's top-k images (dim=0); ``rsum`` is the sum of the six recalls. The arguments
    are those of :func:`rerank_scores` (k at most the number of images, the t2i gallery),
    and ``captions_per_image`` that of :func:`fastalign.evaluation.evaluate`.
    """
    by_direction = {
        "i2t": evaluate(rerank_scores(base, second, k, alpha, fusion, dim=1), captions_per_image),
        "t2i": evaluate(rerank_scores(base, second, k, alpha, fusion, dim=0), captions_per_image),
    }
    results = {key: by_direction[key[-3:]][key] for key in RESULT_KEYS if key != "rsum"}
    results["rsum"] = sum(results[f"r{r}_{d}"] for d in by_direction for r in RECALL_KS)
    return {key: results[key] for key in RESULT_KEYS}
