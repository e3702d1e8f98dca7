"""Retrieval at scale: evaluation and top-k search without the (n_images, n_captions) matrix.

Both stream the blocks of :class:`fastalign.evaluation.BlockScorer`, the scorer of
:func:`fastalign.evaluation.similarity_matrix`, and keep only per-query state:

- :func:`streaming_ranks` (and :func:`evaluate_streaming`, :func:`evaluate_streaming_folds`):
  the ranks of :func:`fastalign.evaluation.compute_ranks`, found in one pass. The blocks
  holding positive pairs come first (with aligned blocks, the default, image block k and
  caption block k hold the images and their captions: the diagonal blocks) and give every
  query its positive score; each block is then compared with those positives and the
  scores at or above them counted, ties counting against the positive as in
  :func:`fastalign.evaluate`. COCO 1K's folds are counted in the same pass, restricted to
  each fold's block. Memory: one block of scores and a few numbers per query.
- :func:`streaming_topk`: each query's k best gallery items, a running top-k merged with
  every block, ties to the lower index. Memory: one block and k entries per query.

Given the same block sizes, the results equal :func:`fastalign.evaluate` (and
``torch.topk``) on :func:`~fastalign.evaluation.similarity_matrix`'s matrix bit for bit:
the same blocks give the same scores.

Sharded (``sharded=True``, under torchrun's process group): each process holds a
contiguous shard of the gallery, in rank order (the images, for the ranks; the searched
side, for the top-k; :func:`shard_range` splits it), and the other side whole, and scores
its own blocks of the block grid planned for the whole gallery. For the ranks, the
processes share the positive scores once the blocks holding them are scored (a caption's
positive is scored by its image's process), then sum their counts; the search merges the
processes' top-k lists, ties to the lower index as between blocks. Every process returns
the whole result, that of one process: bit for bit when the shards are whole blocks (a
block that a shard boundary crosses is scored in two parts, whose scores may differ from
the whole block's in the last bit).
"""

from __future__ import annotations

import itertools
from bisect import bisect_left, bisect_right
from collections import Counter
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from fastalign import distributed
from fastalign.evaluation import (
    BlockScorer,
    PlanSizes,
    block_ranges,
    check_folds,
    check_positive_int,
    mean_over_folds,
    results_from_ranks,
)
from fastalign.progress import progress_bar
from fastalign.tokens import SimilarityFn, Tokens

QUERIES = ("captions", "images")


class FoldResults(NamedTuple):
    """:func:`evaluate_streaming_folds`'s tables: the whole gallery (COCO 5K), the mean over
    the folds (COCO 1K) and each fold's own table."""

    whole: dict[str, float]
    mean: dict[str, float]
    folds: list[dict[str, float]]


# --------------------------------------------------------------------------- shards
def shard_range(n_items: int, block: int = 1) -> tuple[int, int]:
    """This process's items ``[start, stop)`` of a gallery of ``n_items`` sharded over the
    processes of the default process group (torchrun), in rank order.

    The shards are whole blocks of ``block`` items (the last block may be shorter), as many
    on each process as they divide (the first ones take one more): a process holds none
    when there are fewer blocks than processes. The streaming functions given the same
    block size (``block_images``, or ``block_captions`` for a gallery of captions) then
    score the blocks of one process, so their results are one process's bit for bit.
    Without a process group: ``(0, n_items)``.

    Raises:
        TypeError, ValueError: ``n_items`` not an int >= 1, ``block`` not an int >= 1.
    """
    n_items = check_positive_int("n_items", n_items)
    block = check_positive_int("block", block)
    rank, world = distributed.rank(), distributed.world_size()
    per_rank, extra = divmod(-(-n_items // block), world)
    first = rank * per_rank + min(rank, extra)
    stop = first + per_rank + (rank < extra)
    return min(first * block, n_items), min(stop * block, n_items)


class _Layout(NamedTuple):
    """How one side of a pass lies over the processes: process r holds its items
    ``[bounds[r], bounds[r + 1])``, this one is ``rank``; ``sizes``: the whole pass's inputs,
    which its blocks are planned for (on every process alike)."""

    bounds: list[int]
    rank: int
    sizes: PlanSizes

    @property
    def start(self) -> int:
        return self.bounds[self.rank]

    @property
    def stop(self) -> int:
        return self.bounds[self.rank + 1]

    @property
    def shared(self) -> bool:
        """Whether other processes hold part of the side (the results are then combined)."""
        return len(self.bounds) > 2

    def blocks(self, size: int) -> list[tuple[int, int]]:
        """The side's blocks of ``size`` items, every block that a shard boundary crosses
        cut there (none is, with shards of whole blocks)."""
        total = self.bounds[-1]
        starts = sorted(set(range(0, total, size)) | {b for b in self.bounds if b < total})
        return list(zip(starts, [*starts[1:], total]))

    def mine(self, blocks: list[tuple[int, int]]) -> range:
        """The indices of this process's blocks among ``blocks`` (those of :meth:`blocks`)."""
        starts = [start for start, _ in blocks]
        return range(bisect_left(starts, self.start), bisect_left(starts, self.stop))


_SIDES = ("images", "captions")


def _layout(scorer: BlockScorer, side: str, sharded: bool) -> _Layout:
    """The layout of ``side`` (the scorer's inputs are a shard of it when ``sharded``, the
    other side whole): one all_gather of every process's :attr:`BlockScorer.sizes`."""
    # PlanSizes begins with the counts of the two sides, in _SIDES's order.
    this, other = _SIDES.index(side), 1 - _SIDES.index(side)
    if not sharded or distributed.world_size() == 1:
        return _Layout([0, scorer.sizes[this]], 0, scorer.sizes)
    mine = torch.tensor([scorer.sizes], dtype=torch.int64, device=scorer.device)
    every = distributed.all_gather_no_grad(mine, None, "sizes of the shards").cpu()
    if (every[:, other] != every[0, other]).any():
        counts = ", ".join(f"{int(n)} on rank {r}" for r, n in enumerate(every[:, other]))
        raise ValueError(
            f"a sharded pass takes every process's shard of the {side} and all the "
            f"{_SIDES[other]}, the same on every process: got {counts}"
        )
    bounds = [0, *itertools.accumulate(every[:, this].tolist())]
    # The whole side's count; the largest item and score sizes: what one process on the
    # whole inputs (padded to the longest item) plans for.
    whole = every.max(0).values.tolist()
    whole[this] = bounds[-1]
    return _Layout(bounds, distributed.rank(), PlanSizes(*whole))


# --------------------------------------------------------------------------- ranks
def _schedule(
    image_blocks: list[tuple[int, int]],
    caption_blocks: list[tuple[int, int]],
    per_image: int,
    mine: range,
) -> tuple[list[tuple[int, int, bool]], list[tuple[int, int]]]:
    """The scoring order of the blocks of image blocks ``mine`` (every one, unsharded) by
    index into ``image_blocks`` x ``caption_blocks``: ``(first, then)``.

    ``first``: ``(image block, caption block, counts)``, the blocks that hold positive
    pairs, caption block by caption block; each gives its positives, and is counted at once
    when it is the last of those its rows and columns need (every one of them, with aligned
    blocks and shards of whole blocks); else it is scored again in ``then``, which holds
    every other block, image block by image block. A column whose positives another process
    scores is counted once the positives are shared, after ``first``.
    """
    starts = [i0 for i0, _ in image_blocks]
    band = [
        (a, b)
        for b, (t0, t1) in enumerate(caption_blocks)
        for a in range(
            bisect_right(starts, t0 // per_image) - 1, bisect_right(starts, (t1 - 1) // per_image)
        )
    ]
    elsewhere = {b for a, b in band if a not in mine}
    band = [(a, b) for a, b in band if a in mine]
    rows_left = Counter(a for a, _ in band)
    columns_left = Counter(b for _, b in band)
    first, again = [], set()
    for a, b in band:
        rows_left[a] -= 1
        columns_left[b] -= 1
        complete = rows_left[a] == 0 and columns_left[b] == 0 and b not in elsewhere
        first.append((a, b, complete))
        if not complete:
            again.add((a, b))
    in_band = set(band)
    then = [
        (a, b)
        for a in mine
        for b in range(len(caption_blocks))
        if (a, b) not in in_band or (a, b) in again
    ]
    return first, then


class _RankCounts:
    """Per query: the positive scores and the counts of scores at or above them, over the
    whole gallery and, with folds, over the query's fold."""

    def __init__(self, n_images: int, per_image: int, fold_images: int | None, device) -> None:
        n_captions = n_images * per_image
        self.per_image, self.fold_images = per_image, fold_images
        # positives[j]: caption j against its image; viewed (n_images, per_image), an
        # image's scores against its captions.
        self.positives = torch.full((n_captions,), float("nan"), device=device)
        self.i2t = torch.zeros(n_images, dtype=torch.int64, device=device)
        self.t2i = torch.zeros(n_captions, dtype=torch.int64, device=device)
        if fold_images is not None:
            self.fold_i2t, self.fold_t2i = torch.zeros_like(self.i2t), torch.zeros_like(self.t2i)

    def take_positives(self, block: Tensor, i0: int, i1: int, t0: int, t1: int) -> None:
        """The positive pairs of images [i0, i1) x captions [t0, t1), from their scores."""
        first, stop = max(t0, i0 * self.per_image), min(t1, i1 * self.per_image)
        captions = torch.arange(first, stop, device=block.device)
        self.positives[first:stop] = block[captions // self.per_image - i0, captions - t0]

    def count(self, block: Tensor, i0: int, i1: int, t0: int, t1: int) -> None:
        """Adds the scores of the block at or above each row's best positive (i2t) and each
        column's positive (t2i), as :func:`fastalign.evaluation.compute_ranks` compares."""
        best = self.positives.view(-1, self.per_image)[i0:i1].max(1, keepdim=True).values
        outranks_image = block >= best
        outranks_caption = block >= self.positives[t0:t1]
        # int32 sums of a block (far below 2^31) added to int64 counts: torch sums a bool
        # tensor into int32 faster than into its default int64 (1.6x on one block here).
        self.i2t[i0:i1] += outranks_image.sum(1, dtype=torch.int32)
        self.t2i[t0:t1] += outranks_caption.sum(0, dtype=torch.int32)
        if self.fold_images is None:
            return
        size, width = self.fold_images, self.fold_images * self.per_image
        for fold in range(i0 // size, (i1 - 1) // size + 1):  # the folds the rows meet
            r0, r1 = max(i0, fold * size), min(i1, (fold + 1) * size)
            c0, c1 = max(t0, fold * width), min(t1, (fold + 1) * width)
            if c0 < c1:  # the block meets the fold's own images x captions square
                rows, columns = slice(r0 - i0, r1 - i0), slice(c0 - t0, c1 - t0)
                self.fold_i2t[r0:r1] += outranks_image[rows, columns].sum(1, dtype=torch.int32)
                self.fold_t2i[c0:c1] += outranks_caption[rows, columns].sum(0, dtype=torch.int32)

    def ranks(self, folds: bool = False) -> tuple[Tensor, Tensor]:
        """1-based (i2t, t2i) ranks: over the whole gallery, or each within its fold."""
        positives = self.positives.view(-1, self.per_image)
        best = positives.max(1, keepdim=True).values
        # The counts include the image's positives at or above its best: the best one
        # itself and any positive tied with it, none of them a negative.
        tied = (positives >= best).sum(1)
        i2t, t2i = (self.fold_i2t, self.fold_t2i) if folds else (self.i2t, self.t2i)
        return 1 + i2t - tied, t2i.clone()

    def share_positives(self, start: int, stop: int) -> None:
        """Every process's positives, this one holding those of captions [start, stop) (its
        images'): a sum over the processes of each one's, 0 elsewhere (exact)."""
        shared = torch.zeros_like(self.positives)
        shared[start:stop] = self.positives[start:stop]
        with distributed.collective("all_reduce of the positive scores"):
            dist.all_reduce(shared)
        self.positives = shared

    def share_counts(self) -> None:
        """The counts over the whole gallery: the sums of every process's counts over its
        own blocks (an image's i2t counts are 0 but on its own process)."""
        folds = self.fold_images is not None
        counts = [self.i2t, self.t2i] + ([self.fold_i2t, self.fold_t2i] if folds else [])
        summed = torch.cat(counts)
        with distributed.collective("all_reduce of the rank counts"):
            dist.all_reduce(summed)
        parts = summed.split([len(c) for c in counts])
        self.i2t, self.t2i = parts[:2]
        if folds:
            self.fold_i2t, self.fold_t2i = parts[2:]


def _check_no_nan(block: Tensor, i0: int, t0: int) -> None:
    # The block's sum is NaN if a score is (or if infinities of both signs meet): one
    # reduction, no (ni, nt) temporary; the scores are searched only then.
    if not bool(block.sum().isnan()):
        return
    nan = torch.isnan(block)
    if bool(nan.any()):
        row, column = (int(v) for v in nan.nonzero()[0])
        raise ValueError(
            f"the similarity scored image {i0 + row} x caption {t0 + column} NaN; ranks are "
            f"undefined for NaN scores"
        )


def _stream_counts(
    scorer: BlockScorer,
    layout: _Layout,
    per_image: int,
    block_images: int | None,
    block_captions: int | None,
    fold_images: int | None,
    progress: bool,
) -> _RankCounts:
    """The one pass of the streaming evaluation: every block of this process's images
    scored once (with aligned blocks), positives first, the counts of :class:`_RankCounts`
    filled; those of the whole gallery, sharded."""
    block_images, block_captions = scorer.plan(
        block_images, block_captions, per_image, layout.sizes
    )
    image_blocks = layout.blocks(block_images)
    caption_blocks = block_ranges(scorer.n_captions, block_captions)
    first, then = _schedule(image_blocks, caption_blocks, per_image, layout.mine(image_blocks))
    counts = _RankCounts(layout.bounds[-1], per_image, fold_images, scorer.device)

    def scored(a: int, b: int) -> tuple[Tensor, int, int, int, int]:
        (i0, i1), (t0, t1) = image_blocks[a], caption_blocks[b]
        block = scorer.score(i0 - layout.start, i1 - layout.start, t0, t1)
        _check_no_nan(block, i0, t0)
        return block, i0, i1, t0, t1

    bar = progress_bar(len(first) + len(then), "streaming_ranks", progress, unit="block")
    try:
        for a, b, counted in first:
            block, *where = scored(a, b)
            counts.take_positives(block, *where)
            if counted:
                counts.count(block, *where)
            del block  # freed before the next block is scored
            if bar is not None:
                bar.update(1)
        if layout.shared:
            counts.share_positives(layout.start * per_image, layout.stop * per_image)
        for a, b in then:
            block, *where = scored(a, b)
            counts.count(block, *where)
            del block
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if layout.shared:
        counts.share_counts()
    return counts


def _scorer(
    images, captions, similarity, options, per_image, memory_budget_mb, device, sharded
) -> tuple[BlockScorer, _Layout, int]:
    """The block scorer of a streaming evaluation, the layout of its images and
    ``captions_per_image``, the captions checked against the (whole gallery's) images."""
    per_image = check_positive_int("captions_per_image", per_image)
    scorer = BlockScorer(
        images,
        captions,
        similarity,
        options,
        memory_budget_mb=memory_budget_mb,
        device=device,
        shard="images" if sharded else None,
    )
    layout = _layout(scorer, "images", sharded)
    n_images = layout.bounds[-1]
    if scorer.n_captions != n_images * per_image:
        raise ValueError(
            f"got {n_images} images and {scorer.n_captions} captions: expected "
            f"n_images * captions_per_image = {n_images * per_image} captions (caption "
            f"j belongs to image j // captions_per_image, captions_per_image = {per_image})"
        )
    return scorer, layout, per_image


@torch.no_grad()
def streaming_ranks(
    images: Tokens | Tensor | np.ndarray,
    captions: Tokens | Tensor | np.ndarray,
    similarity: SimilarityFn | None = None,
    captions_per_image: int = 5,
    *,
    block_images: int | None = None,
    block_captions: int | None = None,
    memory_budget_mb: float = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
    sharded: bool = False,
    **similarity_options,
) -> tuple[Tensor, Tensor]:
    """1-based i2t and t2i ranks, as :func:`fastalign.evaluation.compute_ranks` finds them on
    the score matrix, without the matrix.

    Args:
        images, captions: :class:`~fastalign.tokens.Tokens` (or bare embeddings) as
            :func:`~fastalign.evaluation.similarity_matrix` takes them; caption j belongs
            to image ``j // captions_per_image``.
        similarity: ``fn(images block, captions block) -> (ni, nt)``; None:
            :func:`fastalign.region_word_similarity` with ``similarity_options``.
        captions_per_image: captions per image (5 for Flickr30K and COCO).
        block_images, block_captions: the block sizes; None: aligned blocks
            (``block_captions = captions_per_image * block_images``, so every block holding
            a positive pair is a diagonal block, scored once) sized to the memory budget and
            to at most 262144 scores; one size given: the other aligned to it. Any sizes
            work: blocks of unaligned sizes that hold positives needed elsewhere are scored
            twice. The ranks do not depend on the sizes beyond the scores' last bit, and
            equal ``compute_ranks(similarity_matrix(...))`` with the same sizes exactly.
        memory_budget_mb, device, similarity_options: as for ``similarity_matrix``.
        progress: a progress bar of the blocks (see :mod:`fastalign.progress`).
        sharded: this process holds a shard of the images, under the default process
            group of ``torch.distributed`` (torchrun): ``images`` are its contiguous part
            (the processes' parts in rank order make the gallery; :func:`shard_range`
            splits it), ``captions`` all of them; every process calls this alike and
            returns the whole gallery's ranks, one process's (bit for bit with shards of
            whole ``block_images`` blocks; see :mod:`fastalign.retrieval`). The blocks are
            planned for the whole gallery. False, or no process group: all the images.

    Returns:
        ``(ranks_i2t (n_images,), ranks_t2i (n_captions,))``, int64 on ``device``: an
        image's rank is that of its best caption, 1 + the negatives scoring at least that;
        a caption's is 1 + the other images scoring at least its own. Ties count against
        the positive.

    Raises:
        TypeError, ValueError: bad inputs or sizes (naming the argument); NaN scores
        (naming the pair).
    """
    scorer, layout, per_image = _scorer(
        images,
        captions,
        similarity,
        similarity_options,
        captions_per_image,
        memory_budget_mb,
        device,
        sharded,
    )
    counts = _stream_counts(scorer, layout, per_image, block_images, block_captions, None, progress)
    return counts.ranks()


def evaluate_streaming(
    images: Tokens | Tensor | np.ndarray,
    captions: Tokens | Tensor | np.ndarray,
    similarity: SimilarityFn | None = None,
    captions_per_image: int = 5,
    **options,
) -> dict[str, float]:
    """:func:`fastalign.evaluate`'s table (R@1/5/10 both ways, rsum, median and mean ranks)
    from :func:`streaming_ranks` (whose keyword arguments ``options`` go to): the same
    numbers, without the (n_images, n_captions) matrix. Flickr30K 1K and COCO 5K."""
    return results_from_ranks(
        *streaming_ranks(images, captions, similarity, captions_per_image, **options)
    )


@torch.no_grad()
def evaluate_streaming_folds(
    images: Tokens | Tensor | np.ndarray,
    captions: Tokens | Tensor | np.ndarray,
    similarity: SimilarityFn | None = None,
    captions_per_image: int = 5,
    *,
    n_folds: int = 5,
    block_images: int | None = None,
    block_captions: int | None = None,
    memory_budget_mb: float = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
    sharded: bool = False,
    **similarity_options,
) -> FoldResults:
    """COCO 5K and COCO 1K from one streaming pass.

    ``whole`` is :func:`evaluate_streaming` (:func:`fastalign.evaluate` on the whole
    matrix); ``mean`` and ``folds`` are :func:`fastalign.evaluation.evaluate_folds`'s: fold
    k holds images ``[k m, (k + 1) m)`` and their captions, m = n_images / n_folds, and its
    ranks count only the scores of its own images x captions. The arguments are those of
    :func:`streaming_ranks` (``sharded`` included), plus ``n_folds`` (5 for COCO 1K; it
    must divide n_images).
    """
    scorer, layout, per_image = _scorer(
        images,
        captions,
        similarity,
        similarity_options,
        captions_per_image,
        memory_budget_mb,
        device,
        sharded,
    )
    n_folds = check_folds(n_folds, layout.bounds[-1])
    size = layout.bounds[-1] // n_folds
    counts = _stream_counts(scorer, layout, per_image, block_images, block_captions, size, progress)
    fold_i2t, fold_t2i = counts.ranks(folds=True)
    width = size * per_image
    per_fold = [
        results_from_ranks(
            fold_i2t[k * size : (k + 1) * size], fold_t2i[k * width : (k + 1) * width]
        )
        for k in range(n_folds)
    ]
    return FoldResults(results_from_ranks(*counts.ranks()), mean_over_folds(per_fold), per_fold)


# --------------------------------------------------------------------------- top-k
def _merge_topk(
    scores: Tensor, index: Tensor, block: Tensor, first: int, k: int
) -> tuple[Tensor, Tensor]:
    """The k best of a running top-k (``scores``, ``index``: (n, <= k), best first, every
    index below ``first``) and of ``block`` (n, m), the scores of gallery items ``first ..
    first + m - 1``: best first, equal scores in increasing index order."""
    n, m = block.shape
    new_index = torch.arange(first, first + m, device=block.device).expand(n, m)
    # Candidates with equal scores stand in increasing index order: the running entries
    # (sorted so) before the block's, whose indices are all larger.
    return _best_k(torch.cat([scores, block], 1), torch.cat([index, new_index], 1), k)


def _best_k(scores: Tensor, index: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best (all, if fewer) of candidate ``scores`` (n, m) of gallery items ``index``
    (n, m), equal scores standing in increasing index order: best first, equal scores in
    increasing index order."""
    n = scores.shape[0]
    if scores.shape[1] > k:
        kth = scores.topk(k, dim=1).values[:, -1:]  # the k-th best score of each row
        above = scores > kth
        tied = scores == kth
        # Every score above the k-th best, and the lowest-index ties to fill the k places.
        room = k - above.sum(1, keepdim=True)
        keep = above | (tied & (tied.cumsum(1) <= room))
        kept = keep.nonzero()[:, 1].view(n, k)  # exactly k a row, in candidate order
        scores, index = scores.gather(1, kept), index.gather(1, kept)
    order = scores.sort(dim=1, descending=True, stable=True).indices
    return scores.gather(1, order), index.gather(1, order)


@torch.no_grad()
def streaming_topk(
    images: Tokens | Tensor | np.ndarray,
    captions: Tokens | Tensor | np.ndarray,
    similarity: SimilarityFn | None = None,
    *,
    k: int,
    queries: str = "captions",
    block_images: int | None = None,
    block_captions: int | None = None,
    memory_budget_mb: float = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
    sharded: bool = False,
    **similarity_options,
) -> tuple[Tensor, Tensor]:
    """Exact top-k search: each query's k best gallery items, without the score matrix.

    Args:
        images, captions, similarity, memory_budget_mb, device, similarity_options: as for
            :func:`~fastalign.evaluation.similarity_matrix`.
        k: gallery items per query, 1 <= k <= the gallery's size.
        queries: ``"captions"`` (text-to-image search: the images are the gallery) or
            ``"images"`` (image-to-text: the captions are).
        block_images, block_captions: block sizes; None: from the memory budget, as
            ``similarity_matrix`` plans them. The result does not depend on them beyond the
            scores' last bit.
        progress: a progress bar of the blocks (see :mod:`fastalign.progress`).
        sharded: this process holds a shard of the gallery, under the default process
            group of ``torch.distributed`` (torchrun): the gallery side (``images`` for
            caption queries, ``captions`` for image queries) is its contiguous part (the
            processes' parts in rank order make the gallery; :func:`shard_range` splits
            it), the queries all of them; every process calls this alike and returns the
            whole gallery's top k with whole-gallery indices: each process's top-k lists
            merged, one process's result (bit for bit with shards of whole gallery blocks;
            see :mod:`fastalign.retrieval`). False, or no process group: the whole gallery.

    Returns:
        ``(scores, indices)``: (n_queries, k) float32 scores, best first, and the int64
        gallery indices they belong to; equal scores in increasing index order (what a
        stable descending sort of the full score row gives). Memory: one block of scores
        and the running top-k, k entries per query.

    Raises:
        TypeError, ValueError: bad inputs, ``k`` or ``queries`` (naming the argument); NaN
        scores (naming the pair).
    """
    if not isinstance(queries, str) or queries not in QUERIES:
        raise ValueError(f"queries must be one of {QUERIES}, got {queries!r}")
    k = check_positive_int("k", k)
    by_caption = queries == "captions"
    gallery = "images" if by_caption else "captions"
    scorer = BlockScorer(
        images,
        captions,
        similarity,
        similarity_options,
        memory_budget_mb=memory_budget_mb,
        device=device,
        shard=gallery if sharded else None,
    )
    layout = _layout(scorer, gallery, sharded)
    n_gallery = layout.bounds[-1]
    if k > n_gallery:
        raise ValueError(f"k must be at most the gallery's size, {n_gallery} {gallery}, got {k}")
    block_images, block_captions = scorer.plan(block_images, block_captions, sizes=layout.sizes)
    if by_caption:
        n_queries, query_block, gallery_block = scorer.n_captions, block_captions, block_images
    else:
        n_queries, query_block, gallery_block = scorer.n_images, block_images, block_captions
    query_blocks = block_ranges(n_queries, query_block)
    gallery_blocks = layout.blocks(gallery_block)
    gallery_blocks = [gallery_blocks[g] for g in layout.mine(gallery_blocks)]
    shift = layout.start  # the first gallery item here
    kept = min(k, layout.stop - shift)  # this process's top k: of its items
    top_scores = torch.empty(n_queries, kept, device=scorer.device)
    top_index = torch.empty(n_queries, kept, dtype=torch.int64, device=scorer.device)
    bar = progress_bar(len(query_blocks) * len(gallery_blocks), "streaming_topk", progress, "block")
    try:
        for q0, q1 in query_blocks:
            scores = torch.empty(q1 - q0, 0, device=scorer.device)
            index = torch.empty(q1 - q0, 0, dtype=torch.int64, device=scorer.device)
            for g0, g1 in gallery_blocks:  # in increasing index order: see _merge_topk
                if by_caption:
                    block = scorer.score(g0 - shift, g1 - shift, q0, q1)
                    _check_no_nan(block, g0, q0)
                    block = block.T
                else:
                    block = scorer.score(q0, q1, g0 - shift, g1 - shift)
                    _check_no_nan(block, q0, g0)
                scores, index = _merge_topk(scores, index, block, g0, k)
                del block  # freed before the next block is scored
                if bar is not None:
                    bar.update(1)
            top_scores[q0:q1], top_index[q0:q1] = scores, index
    finally:
        if bar is not None:
            bar.close()
    if layout.shared:
        return _merge_shards(top_scores, top_index, layout.bounds, k)
    return top_scores, top_index


def _merge_shards(
    scores: Tensor, index: Tensor, bounds: list[int], k: int
) -> tuple[Tensor, Tensor]:
    """The k best of every process's top-k lists (n, min(k, its items)), this process's
    ``scores`` and ``index`` among them: the lists, in rank order, hold increasing indices
    (process r: ``[bounds[r], bounds[r + 1])``), as :func:`_best_k` takes them."""
    n, kept = scores.shape
    # Padded to k entries for the gather (the same shape on every process), then cut back.
    scores = torch.cat([scores, scores.new_zeros(n, k - kept)], 1)
    index = torch.cat([index, index.new_zeros(n, k - kept)], 1)
    every_score = distributed.all_gather_no_grad(scores, None, "top-k scores of the shards")
    every_index = distributed.all_gather_no_grad(index, None, "top-k indices of the shards")
    lengths = [min(k, stop - start) for start, stop in itertools.pairwise(bounds)]

    def listed(every: Tensor) -> Tensor:  # (W * n, k) -> (n, the lists' entries)
        return torch.cat([part[:, :m] for part, m in zip(every.split(n), lengths)], 1)

    return _best_k(listed(every_score), listed(every_index), k)
