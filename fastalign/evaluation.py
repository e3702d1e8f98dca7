"""Image-text retrieval evaluation: similarity matrix, ranks and recalls.

The protocol of VSE++ / SCAN / CHAN, on an (n_images, n_captions) score matrix ``sims``
in which caption j belongs to image ``j // captions_per_image``:

- image-to-text (i2t): an image's rank is the rank of the best of its captions,
  ``1 + #{negative captions j : sims[i, j] >= max over its positives of sims[i, p]}``;
- text-to-image (t2i): a caption's rank is
  ``1 + #{other images i' : sims[i', j] >= sims[i(j), j]}``;
- R@K = percentage of queries with rank <= K (K = 1, 5, 10), ``rsum`` = the six recalls
  summed, ``medr`` = floor of the median rank and ``meanr`` = the mean rank (1-based, as
  SCAN reports them).

Ties count against the positive: a negative with a score equal to the positive's ranks
above it, so a constant score matrix gives the worst ranks, never the best. Ranks are
found by counting comparisons, in blocks of rows so that the temporary memory stays
bounded, never by sorting rows.

Protocols: Flickr30K 1K and COCO 5K are :func:`evaluate` on the whole test matrix (1000 x
5000 and 5000 x 25000); COCO 1K is :func:`evaluate_folds` (the mean over 5 folds of 1000
images and their 5000 captions).

:func:`similarity_matrix` builds the matrix from region and word embeddings by streaming
:func:`fastalign.region_word_similarity` over blocks sized to a memory budget: those of
:class:`BlockScorer`, which :mod:`fastalign.retrieval` shares to rank the same scores
without the matrix (and to search them for each query's top k). Features
stay in their storage dtype (float16 or float32, numpy memmaps included) and are computed
in float32 or lower, never in float64. Evaluation is model-agnostic: it takes embeddings,
however a model produced them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from fastalign.ops.region_word import check_lengths, region_word_similarity
from fastalign.progress import progress_bar
from fastalign.tokens import SimilarityFn, Tokens

RECALL_KS = (1, 5, 10)
RESULT_KEYS = (
    "r1_i2t",
    "r5_i2t",
    "r10_i2t",
    "r1_t2i",
    "r5_t2i",
    "r10_t2i",
    "rsum",
    "medr_i2t",
    "meanr_i2t",
    "medr_t2i",
    "meanr_t2i",
)
# Pairs scored per block of similarity_matrix at most, unless the caller sets the block
# sizes: a 1000 x 5000 matrix takes 20 blocks, so its progress bar moves, and a block still
# holds enough work (262144 pairs of R x L token products) to hide the cost of a call
# (measured: within 2 % of one block; blocks of half that size cost 2 to 5 % more).
_BLOCK_PAIRS = 1 << 18
# Elements of the score matrix compared at once when counting ranks, unless ``block_rows``
# says otherwise: 2 Mi, i.e. about 10 MiB of temporaries (a bool comparison and the int32
# copy that torch's sum over it makes).
_RANK_BLOCK_ELEMENTS = 1 << 21


# --------------------------------------------------------------------------- checks
def check_positive_int(name: str, value: object) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _as_score_matrix(sims: Tensor | np.ndarray, captions_per_image: int) -> Tensor:
    """Checks ``sims`` (n_images, n_images * captions_per_image); returns it as a tensor.

    Numpy arrays (memmaps included) are wrapped without a copy.
    """
    captions_per_image = check_positive_int("captions_per_image", captions_per_image)
    if isinstance(sims, np.ndarray):
        if sims.dtype.kind != "f":
            raise TypeError(f"sims must hold floating-point scores, got dtype {sims.dtype}")
        with warnings.catch_warnings():  # a read-only memmap: the scores are only read
            warnings.simplefilter("ignore", UserWarning)
            sims = torch.from_numpy(sims)
    elif not isinstance(sims, Tensor):
        raise TypeError(f"sims must be a torch.Tensor or numpy array, got {type(sims).__name__}")
    if sims.dim() != 2:
        raise ValueError(f"sims must be 2-D (n_images, n_captions), got shape {tuple(sims.shape)}")
    if not sims.dtype.is_floating_point:
        raise TypeError(f"sims must hold floating-point scores, got dtype {sims.dtype}")
    n_images, n_captions = sims.shape
    if n_images == 0 or n_captions != n_images * captions_per_image:
        raise ValueError(
            f"sims has shape {tuple(sims.shape)}: expected (n_images, n_images * "
            f"captions_per_image) with n_images >= 1 and captions_per_image = "
            f"{captions_per_image}, i.e. {n_images * captions_per_image} captions"
        )
    return sims


def _raise_nan(sims: Tensor, first_row: int, first_col: int, block_rows: int) -> None:
    count = sum(
        int(torch.isnan(sims[r : r + block_rows]).sum()) for r in range(0, len(sims), block_rows)
    )
    raise ValueError(
        f"sims holds {count} NaN value(s), the first at [{first_row}, {first_col}]; "
        f"ranks are undefined for NaN scores"
    )


# --------------------------------------------------------------------------- ranks
def compute_ranks(
    sims: Tensor | np.ndarray, captions_per_image: int = 5, *, block_rows: int | None = None
) -> tuple[Tensor, Tensor]:
    """1-based retrieval ranks of every image (i2t) and every caption (t2i).

    Args:
        sims: (n_images, n_captions) scores, n_captions = n_images * captions_per_image;
            caption j belongs to image j // captions_per_image. Any floating dtype and
            device; a numpy array is read in place.
        captions_per_image: captions per image (5 for Flickr30K and COCO).
        block_rows: rows of ``sims`` compared at once (the temporary memory is about 5
            bytes per element of a block_rows x n_captions block); None picks about 2 Mi
            elements (10 MiB). The result does not depend on it.

    Returns:
        ``(ranks_i2t, ranks_t2i)``: int64 tensors of shape (n_images,) and (n_captions,) on
        the device of ``sims``. Ties count against the positive.
    """
    sims = _as_score_matrix(sims, captions_per_image)
    n_images, n_captions = sims.shape
    if block_rows is None:
        block_rows = max(1, _RANK_BLOCK_ELEMENTS // n_captions)
    block_rows = check_positive_int("block_rows", block_rows)
    device = sims.device
    caption_ids = torch.arange(n_captions, device=device)
    positive_t2i = sims[caption_ids // captions_per_image, caption_ids]  # (n_captions,)
    offsets = torch.arange(captions_per_image, device=device)

    ranks_i2t = torch.empty(n_images, dtype=torch.int64, device=device)
    at_or_above = torch.zeros(n_captions, dtype=torch.int64, device=device)
    for start in range(0, n_images, block_rows):
        block = sims[start : start + block_rows]  # (b, n_captions)
        nan = torch.isnan(block)
        if bool(nan.any()):
            row, col = (int(v) for v in nan.nonzero()[0])
            _raise_nan(sims, start + row, col, block_rows)
        image_ids = torch.arange(start, start + len(block), device=device)
        columns = image_ids[:, None] * captions_per_image + offsets  # (b, captions_per_image)
        positives = block.gather(1, columns)
        best = positives.max(dim=1, keepdim=True).values  # (b, 1)
        # Captions at or above the best positive, minus the positives among them (the best
        # one itself and any positive tied with it): the negatives that outrank it.
        above = (block >= best).sum(1, dtype=torch.int32) - (positives >= best).sum(1)
        ranks_i2t[start : start + len(block)] = 1 + above
        # t2i: every image at or above the caption's positive score, the positive included.
        at_or_above += (block >= positive_t2i).sum(0, dtype=torch.int32)
    return ranks_i2t, at_or_above


def _rank_metrics(ranks: Tensor, suffix: str) -> dict[str, float]:
    """R@1/5/10 (percent), medr (floor of the median) and meanr of 1-based ``ranks``."""
    n = ranks.numel()
    metrics = {f"r{k}_{suffix}": 100.0 * int((ranks <= k).sum()) / n for k in RECALL_KS}
    ordered = ranks.sort().values  # one 1-D vector of ranks, not the score rows
    low, high = int(ordered[(n - 1) // 2]), int(ordered[n // 2])
    metrics[f"medr_{suffix}"] = float((low + high) // 2)
    metrics[f"meanr_{suffix}"] = int(ranks.sum()) / n
    return metrics


def evaluate(
    sims: Tensor | np.ndarray, captions_per_image: int = 5, *, block_rows: int | None = None
) -> dict[str, float]:
    """Recall@K, median and mean rank of image-to-text and text-to-image retrieval.

    Args:
        sims: (n_images, n_captions) scores, n_captions = n_images * captions_per_image;
            caption j belongs to image j // captions_per_image. Any floating dtype and
            device (numpy arrays are read in place); no NaN.
        captions_per_image: captions per image (5 for Flickr30K and COCO).
        block_rows: rows compared at once, see :func:`compute_ranks` (bounds memory only).

    Returns:
        ``r1_i2t, r5_i2t, r10_i2t, r1_t2i, r5_t2i, r10_t2i`` (percent), ``rsum`` (their
        sum), ``medr_i2t, meanr_i2t, medr_t2i, meanr_t2i`` (1-based ranks; medr is the floor
        of the median), all Python floats. An image's i2t rank is that of its best caption.
        Ties count against the positive (a negative scoring equal to it ranks above it).

    Raises:
        TypeError: ``sims`` is not a floating-point tensor / array.
        ValueError: wrong shape, NaN scores (with their count and the first position).
    """
    return results_from_ranks(*compute_ranks(sims, captions_per_image, block_rows=block_rows))


def results_from_ranks(ranks_i2t: Tensor, ranks_t2i: Tensor) -> dict[str, float]:
    """The table of :func:`evaluate` from 1-based ranks: (n_images,) i2t and (n_captions,)
    t2i ranks, as :func:`compute_ranks` (or :func:`fastalign.streaming_ranks`) returns them."""
    metrics = _rank_metrics(ranks_i2t, "i2t") | _rank_metrics(ranks_t2i, "t2i")
    metrics["rsum"] = sum(metrics[f"r{k}_{d}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    return {key: metrics[key] for key in RESULT_KEYS}


def check_folds(n_folds: object, n_images: int) -> int:
    """``n_folds`` checked: a positive int dividing ``n_images``."""
    n_folds = check_positive_int("n_folds", n_folds)
    if n_images % n_folds:
        raise ValueError(
            f"n_folds = {n_folds} must divide the number of images, got {n_images} images"
        )
    return n_folds


def mean_over_folds(per_fold: list[dict[str, float]]) -> dict[str, float]:
    """Every metric's mean over the folds' tables (``rsum`` is also the sum of the mean
    recalls): the COCO 1K result."""
    return {key: sum(fold[key] for fold in per_fold) / len(per_fold) for key in RESULT_KEYS}


def evaluate_folds(
    sims: Tensor | np.ndarray, n_folds: int = 5, captions_per_image: int = 5
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """The COCO 1K protocol: :func:`evaluate` on each fold, then the mean over the folds.

    Fold k holds images ``[k * m, (k + 1) * m)`` and their captions
    ``[k * m * captions_per_image, (k + 1) * m * captions_per_image)``, m = n_images /
    n_folds (1000 for COCO's 5000 test images). COCO 5K is :func:`evaluate` on the whole
    matrix.

    Args:
        sims: (n_images, n_images * captions_per_image) scores; n_images divisible by
            ``n_folds``.
        n_folds: number of folds (5 for COCO 1K).
        captions_per_image: captions per image.

    Returns:
        ``(mean, per_fold)``: the mean of every metric over the folds (``rsum`` is also the
        sum of the mean recalls) and the list of the folds' own results.
    """
    sims = _as_score_matrix(sims, captions_per_image)
    n_images = sims.shape[0]
    n_folds = check_folds(n_folds, n_images)
    size = n_images // n_folds
    width = size * captions_per_image
    per_fold = [
        evaluate(sims[k * size : (k + 1) * size, k * width : (k + 1) * width], captions_per_image)
        for k in range(n_folds)
    ]
    return mean_over_folds(per_fold), per_fold


def chance_results(n_images: int, captions_per_image: int = 5, seed: int = 0) -> dict[str, float]:
    """:func:`evaluate` of uniformly random scores: what a model must beat."""
    generator = torch.Generator().manual_seed(seed)
    sims = torch.rand(n_images, n_images * captions_per_image, generator=generator)
    return evaluate(sims, captions_per_image)


def format_results(results: Mapping[str, float]) -> str:
    """A small aligned table of :func:`evaluate`'s (or a fold mean's) results.

    Rows i2t and t2i with columns R@1, R@5, R@10, medr, meanr, then an rSum line.
    """
    if not isinstance(results, Mapping):
        raise TypeError(f"results must be a mapping, got {type(results).__name__}")
    missing = [key for key in RESULT_KEYS if key not in results]
    if missing:
        raise ValueError(f"results is missing the keys {missing}")
    header = ["", "R@1", "R@5", "R@10", "medr", "meanr"]
    rows = [header]
    for direction in ("i2t", "t2i"):
        recalls = [f"{results[f'r{k}_{direction}']:.2f}" for k in RECALL_KS]
        ranks = [f"{results[f'{m}_{direction}']:.1f}" for m in ("medr", "meanr")]
        rows.append([direction, *recalls, *ranks])
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = [
        "  ".join([row[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(row[1:], widths[1:])])
        for row in rows
    ]
    lines.append(f"{'rSum'.ljust(widths[0])}  {results['rsum']:.2f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- similarity
_NUMPY_FLOATS = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}


def check_float_array(name: str, x: object) -> None:
    """``x`` is a floating-point torch.Tensor, or a float16 / float32 / float64 numpy array."""
    if isinstance(x, np.ndarray):
        if x.dtype not in _NUMPY_FLOATS:
            raise TypeError(f"{name} must hold float16 / float32 / float64, got {x.dtype}")
    elif isinstance(x, Tensor):
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")


def _check_features(name: str, x: object, shard: bool = False) -> None:
    """3-D floating features with no empty dimension; a ``shard`` may hold no item."""
    check_float_array(name, x)
    if x.ndim != 3 or 0 in x.shape[1 if shard else 0 :]:
        empty = "tokens or D" if shard else "dimension"
        raise ValueError(
            f"{name} must be 3-D (N, tokens, D) with no empty {empty}, got shape {tuple(x.shape)}"
        )


def _on_cpu(lengths: object) -> object:
    return lengths.detach().cpu() if isinstance(lengths, Tensor) else lengths


def _torch_dtype(x: Tensor | np.ndarray) -> torch.dtype:
    if isinstance(x, Tensor):
        return x.dtype
    return {np.float16: torch.float16, np.float32: torch.float32}.get(x.dtype.type, torch.float64)


def _compute_dtype(regions: Tensor | np.ndarray, words: Tensor | np.ndarray, device) -> torch.dtype:
    """float32, or the shared half dtype on CUDA (whose kernels take it); never float64."""
    dtype = _torch_dtype(regions)
    if (
        device.type == "cuda"
        and dtype == _torch_dtype(words)
        and dtype
        in (
            torch.float16,
            torch.bfloat16,
        )
    ):
        return dtype
    return torch.float32


def _needs_copy(x: Tensor | np.ndarray, dtype: torch.dtype, device: torch.device) -> bool:
    """False only for a contiguous tensor already in ``dtype`` on ``device`` (sliced in place)."""
    if not isinstance(x, Tensor):
        return True
    return x.dtype != dtype or x.device != device or not x.is_contiguous()


def _load_block(
    x: Tensor | np.ndarray, start: int, stop: int, tokens: int, dtype: torch.dtype, device
) -> Tensor:
    """Items [start, stop) of ``x`` as a ``dtype`` tensor on ``device``.

    A tensor already in that dtype and place is sliced without a copy; anything else is
    cropped to ``tokens`` (the block's longest item) and converted directly to ``dtype``.
    """
    if not _needs_copy(x, dtype, device):
        return x[start:stop]
    if isinstance(x, np.ndarray):
        numpy_dtype = np.float16 if dtype == torch.float16 else np.float32
        block = torch.from_numpy(np.array(x[start:stop, :tokens], dtype=numpy_dtype))
        return block.to(device=device, dtype=dtype)
    return x[start:stop, :tokens].to(device=device, dtype=dtype).contiguous()


class PlanSizes(NamedTuple):
    """What :meth:`BlockScorer.plan` sizes blocks by: the numbers of images and captions, the
    bytes of one image and of one caption converted for scoring (0 for inputs used in place)
    and of one score."""

    n_images: int
    n_captions: int
    image_bytes: int
    caption_bytes: int
    pair_bytes: int


def plan_blocks(
    sizes: PlanSizes,
    block_images: int | None,
    block_captions: int | None,
    budget: int,
    captions_per_image: int | None = None,
) -> tuple[int, int]:
    """(images, captions) per block for inputs of ``sizes`` within ``budget`` bytes: what
    :meth:`BlockScorer.plan` gives for them (see :func:`_plan_blocks`)."""
    return _plan_blocks(
        sizes.n_images,
        sizes.n_captions,
        block_images,
        block_captions,
        sizes.image_bytes,
        sizes.caption_bytes,
        sizes.pair_bytes,
        budget,
        captions_per_image=captions_per_image,
    )


def _plan_blocks(
    n_images: int,
    n_captions: int,
    block_images: int | None,
    block_captions: int | None,
    image_bytes: int,
    caption_bytes: int,
    pair_bytes: int,
    budget: int,
    max_pairs: int | None = None,
    captions_per_image: int | None = None,
) -> tuple[int, int]:
    """Block sizes that keep converted inputs + the output block within ``budget`` bytes.

    ``image_bytes`` / ``caption_bytes``: memory of one converted item (0 when the input is
    used in place); ``pair_bytes``: memory of one score of the block output. A size that is
    not given is also bounded so that a block holds at most ``max_pairs`` scores (when the
    other size allows it; None: ``_BLOCK_PAIRS``).

    ``captions_per_image`` given: aligned blocks, ``block_captions = captions_per_image *
    block_images``, so that image block k and caption block k hold the images and their
    captions (the positive pairs of the streaming evaluation all lie in the diagonal
    blocks). Without sizes, the largest such blocks within the budget and ``max_pairs``,
    evened out over the images; ``block_captions`` alone gives ``block_captions //
    captions_per_image`` images (aligned when it is a multiple); both given are kept.
    """
    if max_pairs is None:
        max_pairs = _BLOCK_PAIRS
    if captions_per_image is not None and (block_images is None or block_captions is None):
        if block_images is None and block_captions is None:
            block_images = _aligned_block_images(
                n_images,
                captions_per_image,
                image_bytes + captions_per_image * caption_bytes,
                captions_per_image * pair_bytes,
                budget,
                max_pairs,
            )
        elif block_images is None:
            block_images = max(1, block_captions // captions_per_image)
        if block_captions is None:
            block_captions = captions_per_image * block_images
        return min(block_images, n_images), min(block_captions, n_captions)
    if block_images is None and block_captions is None:
        if n_images * image_bytes <= budget // 2:
            block_images = n_images
        else:
            block_images = max(1, budget // 2 // image_bytes)
    if block_captions is None:
        remaining = budget - block_images * image_bytes
        block_captions = max(1, remaining // (caption_bytes + block_images * pair_bytes))
        block_captions = min(block_captions, max(1, max_pairs // block_images))
    elif block_images is None:
        remaining = budget - block_captions * caption_bytes
        block_images = max(1, remaining // (image_bytes + block_captions * pair_bytes))
        block_images = min(block_images, max(1, max_pairs // block_captions))
    return min(block_images, n_images), min(block_captions, n_captions)


def _aligned_block_images(
    n_images: int,
    captions_per_image: int,
    row_bytes: int,
    square_bytes: int,
    budget: int,
    max_pairs: int,
) -> int:
    """Images per aligned block: the most b <= n_images with ``b * row_bytes + b * b *
    square_bytes <= budget`` and ``captions_per_image * b * b <= max_pairs`` (at least 1),
    then evened out: the same number of blocks, of equal sizes as far as they divide."""

    def fits(b: int) -> bool:
        pairs_ok = captions_per_image * b * b <= max_pairs
        return pairs_ok and b * row_bytes + b * b * square_bytes <= budget

    low, high = 1, n_images  # fits(low) is assumed: one image a block at the least
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return math.ceil(n_images / math.ceil(n_images / low))


def block_ranges(count: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of the consecutive blocks of ``size`` items (the last may be
    shorter) that cover ``count`` items."""
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def _region_word_score(options: dict) -> SimilarityFn:
    """:func:`fastalign.region_word_similarity` with ``options``, on tokens."""
    for name in ("regions", "words", "region_lengths", "word_lengths"):
        if name in options:
            raise TypeError(f"similarity_options must not contain {name!r}: it is set per block")

    def score(images: Tokens, captions: Tokens) -> Tensor:
        return region_word_similarity(
            images.embs, captions.embs, images.lengths, captions.lengths, **options
        )

    return score


def _split_tokens(name: str, tokens: object) -> tuple[object, object]:
    """(embeddings, lengths) of a :class:`Tokens` (lengths may be None, a sequence or an
    array), or of bare embeddings (every token valid)."""
    if isinstance(tokens, tuple) and len(tokens) == 2:
        return tokens
    if isinstance(tokens, (Tensor, np.ndarray)):
        return tokens, None
    raise TypeError(
        f"{name} must be a Tokens (embeddings, lengths) or an embeddings tensor / numpy array, "
        f"got {type(tokens).__name__}"
    )


class BlockScorer:
    """Scores of blocks of images x captions: the one block scorer of :func:`similarity_matrix`
    and of the streaming evaluation and search (:mod:`fastalign.retrieval`).

    The constructor checks the inputs (see :func:`similarity_matrix` for what they may be);
    :meth:`plan` sizes the blocks from the memory budget (:func:`_plan_blocks`); :meth:`score`
    returns the float32 scores of one block. Each side of a block is loaded cropped to its
    longest item and converted to the compute dtype (tensors already in it are sliced in
    place), and the last loaded block of each side is kept for the next call, so a pass that
    walks a row or a column of blocks loads that side once. Scoring the same block twice gives
    the same numbers: the same inputs take the same path.

    ``shard`` (``"images"`` or ``"captions"``): that side is one process's shard of a
    gallery split over processes (:mod:`fastalign.retrieval`), and may hold no item.
    """

    def __init__(
        self,
        images: Tokens | Tensor | np.ndarray,
        captions: Tokens | Tensor | np.ndarray,
        similarity: SimilarityFn | None = None,
        similarity_options: dict | None = None,
        *,
        memory_budget_mb: float = 256,
        device: torch.device | str | None = None,
        shard: str | None = None,
    ) -> None:
        if shard not in (None, "images", "captions"):
            raise ValueError(f"shard must be None, 'images' or 'captions', got {shard!r}")
        region_embs, region_lengths = _split_tokens("images", images)
        word_embs, word_lengths = _split_tokens("captions", captions)
        similarity_options = similarity_options or {}
        if similarity is not None and similarity_options:
            raise TypeError(
                f"similarity_options ({', '.join(sorted(similarity_options))}) apply to the "
                "default score only, not to a given similarity function"
            )
        self.similarity = similarity or _region_word_score(similarity_options)
        _check_features("images.embs", region_embs, shard == "images")
        _check_features("captions.embs", word_embs, shard == "captions")
        if region_embs.shape[2] != word_embs.shape[2]:
            raise ValueError(
                f"image and caption embeddings must share the feature size D, got "
                f"{region_embs.shape[2]} and {word_embs.shape[2]}"
            )
        self.n_images, n_regions, dim = region_embs.shape
        self.n_captions, n_words, _ = word_embs.shape
        # Lengths are kept on the CPU: blocks are cut from them before reaching the device.
        cpu = torch.device("cpu")
        region_lengths = check_lengths(
            "images.lengths", _on_cpu(region_lengths), self.n_images, n_regions, cpu
        )
        word_lengths = check_lengths(
            "captions.lengths", _on_cpu(word_lengths), self.n_captions, n_words, cpu
        )
        if not isinstance(memory_budget_mb, (int, float)) or isinstance(memory_budget_mb, bool):
            raise TypeError(
                f"memory_budget_mb must be a number, got {type(memory_budget_mb).__name__}"
            )
        if not (0 < memory_budget_mb < math.inf):
            raise ValueError(
                f"memory_budget_mb must be positive and finite, got {memory_budget_mb}"
            )
        self.budget = int(memory_budget_mb * 2**20)
        if device is None:
            device = region_embs.device if isinstance(region_embs, Tensor) else torch.device("cpu")
        self.device = torch.device(device)
        self.dtype = _compute_dtype(region_embs, word_embs, self.device)
        self.itemsize = torch.empty((), dtype=self.dtype).element_size()
        image_copies = _needs_copy(region_embs, self.dtype, self.device)
        caption_copies = _needs_copy(word_embs, self.dtype, self.device)
        self.sizes = PlanSizes(
            self.n_images,
            self.n_captions,
            n_regions * dim * self.itemsize * image_copies,
            n_words * dim * self.itemsize * caption_copies,
            self.itemsize,
        )
        self._sides = {
            "images": (region_embs, region_lengths),
            "captions": (word_embs, word_lengths),
        }
        self._loaded: dict[str, tuple[tuple[int, int], Tokens]] = {}

    def plan(
        self,
        block_images: int | None,
        block_captions: int | None,
        captions_per_image: int | None = None,
        sizes: PlanSizes | None = None,
    ) -> tuple[int, int]:
        """(images, captions) per block: the sizes given (checked), the others from the
        memory budget and at most 262144 scores a block; aligned blocks (``block_captions =
        captions_per_image * block_images``) when ``captions_per_image`` is given.
        ``sizes``: what to plan for, by default :attr:`sizes` (these inputs'); the whole
        gallery's when this scorer holds a shard of it."""
        if block_images is not None:
            block_images = check_positive_int("block_images", block_images)
        if block_captions is not None:
            block_captions = check_positive_int("block_captions", block_captions)
        return plan_blocks(
            self.sizes if sizes is None else sizes,
            block_images,
            block_captions,
            self.budget,
            captions_per_image,
        )

    def _side(self, side: str, start: int, stop: int) -> Tokens:
        """Items [start, stop) of one side, loaded (or the one kept from the last call)."""
        kept = self._loaded.get(side)
        if kept is not None and kept[0] == (start, stop):
            return kept[1]
        self._loaded.pop(side, None)  # freed before the next block is loaded
        embs, lengths = self._sides[side]
        lengths = lengths[start:stop]
        block = _load_block(embs, start, stop, int(lengths.max()), self.dtype, self.device)
        tokens = Tokens(block, lengths.to(self.device))
        self._loaded[side] = ((start, stop), tokens)
        return tokens

    def score(self, i0: int, i1: int, t0: int, t1: int) -> Tensor:
        """(i1 - i0, t1 - t0) float32 scores of images [i0, i1) x captions [t0, t1)."""
        block = self.similarity(self._side("images", i0, i1), self._side("captions", t0, t1))
        if not isinstance(block, Tensor) or tuple(block.shape) != (i1 - i0, t1 - t0):
            got = tuple(block.shape) if isinstance(block, Tensor) else type(block).__name__
            raise ValueError(
                f"the similarity returned {got} for a block of {i1 - i0} images x {t1 - t0} "
                f"captions, expected a tensor of shape ({i1 - i0}, {t1 - t0})"
            )
        return block.to(torch.float32)


@torch.no_grad()
def similarity_matrix(
    images: Tokens | Tensor | np.ndarray,
    captions: Tokens | Tensor | np.ndarray,
    *,
    similarity: SimilarityFn | None = None,
    block_images: int | None = None,
    block_captions: int | None = None,
    memory_budget_mb: float = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
    **similarity_options,
) -> Tensor:
    """The (n_images, n_captions) score matrix, streamed in blocks.

    Scores blocks of images x captions (with :func:`fastalign.region_word_similarity`, or
    ``similarity``) and writes each block into the result; the fused operator never forms
    the 4-D tensor, so blocks only bound the converted input pieces and the block output.
    The blocks are those of :class:`BlockScorer`, shared with :mod:`fastalign.retrieval`,
    whose streaming evaluation ranks the very same scores without this matrix.

    Args:
        images: :class:`~fastalign.tokens.Tokens` of the images: (n_images, R, D) region
            embeddings, a tensor or numpy array (memmaps included) of float16 / float32
            (float64 is accepted and down-cast block by block), and (n_images,) valid
            regions per image, 1..R, or None (all valid); or the embeddings alone. Never
            up-cast: blocks are computed in float32 (or, on CUDA, in the inputs' shared
            float16 / bfloat16).
        captions: (n_captions, L, D) word embeddings and (n_captions,) lengths, likewise.
        similarity: ``fn(images block, captions block) -> (ni, nt)`` scores (a method's
            similarity); None: :func:`fastalign.region_word_similarity` with
            ``similarity_options``.
        block_images: images per block; None = chosen from the memory budget (and, when
            ``block_captions`` is given, so that a block holds at most 262144 scores).
        block_captions: captions per block; None = chosen from the memory budget and so
            that a block holds at most 262144 scores (a 1000 x 5000 matrix: 20 blocks).
        memory_budget_mb: bound, in MiB, on what the blocks allocate beyond the result and
            the fused operator's fixed tile workspace: converted (cropped to the block's
            longest item) input blocks and one block of scores. Tensors already in the
            compute dtype and device are sliced in place and cost nothing.
        device: where to compute (and return the result); None = the device of the image
            embeddings if they are a tensor, else CPU.
        progress: show a progress bar of the blocks (see :mod:`fastalign.progress`: rank
            0 only, stderr a terminal only).
        **similarity_options: passed to :func:`fastalign.region_word_similarity`
            (direction, align, aggregate, align_tau, aggregate_tau, score_activation,
            backend); only without ``similarity``.

    Returns:
        (n_images, n_captions) float32 scores on ``device``. The result does not depend on
        the block sizes beyond the BLAS's last-bit rounding (the blocks' matrix products can
        take differently shaped BLAS paths).
    """
    scorer = BlockScorer(
        images,
        captions,
        similarity,
        similarity_options,
        memory_budget_mb=memory_budget_mb,
        device=device,
    )
    block_images, block_captions = scorer.plan(block_images, block_captions)
    image_blocks = block_ranges(scorer.n_images, block_images)
    caption_blocks = block_ranges(scorer.n_captions, block_captions)
    n_blocks = len(image_blocks) * len(caption_blocks)
    # A single block's output is the result itself, not copied into a second matrix.
    scores = None
    if n_blocks > 1:
        shape = (scorer.n_images, scorer.n_captions)
        scores = torch.empty(shape, dtype=torch.float32, device=scorer.device)
    bar = progress_bar(n_blocks, "similarity_matrix", progress, unit="block")
    try:
        for i0, i1 in image_blocks:
            for t0, t1 in caption_blocks:
                block = scorer.score(i0, i1, t0, t1)
                if scores is None:
                    scores = block
                else:
                    scores[i0:i1, t0:t1] = block
                del block  # freed before the next block is scored
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return scores
