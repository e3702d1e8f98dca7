"""Two-stage search: a shortlist from global embeddings, then the exact fine-grained score.

Scoring every gallery item with the fine-grained similarity costs a pass over every token of
the gallery per query block (:func:`fastalign.streaming_topk`). A two-stage search scores
only a shortlist:

1. :func:`global_embeddings`: one vector per sequence, the mean of its valid tokens,
   L2-normalised (for a global-embedding model such as VSE++, whose sequences are one
   normalised token, the embedding itself). :func:`global_shortlist` keeps each query's
   ``shortlist`` gallery items of the highest inner product: exactly, in blocks
   (``shortlist_index="exact"``, the default), or with a faiss index (``"faiss"``, a flat
   inner-product index; ``"faiss:FACTORY"``, any ``faiss.index_factory`` string such as
   ``"faiss:HNSW32"``, approximate).
2. The exact fine-grained similarity of the query with its shortlist, each gallery item
   scored in full: the k best, equal scores to the lower gallery index.

The two-stage result is exact on what the shortlist holds; :func:`topk_recall` reports the
fraction of the exact search's top k that it found. A shortlist of the whole gallery is the
exact search: every item scored, the result of :func:`fastalign.streaming_topk`.

Galleries may be :class:`~fastalign.tokens.Tokens` (padded embeddings: tensors, or numpy
arrays and memory maps, read block by block) or :class:`PackedTokens` (the valid tokens of
every sequence end to end, as :mod:`fastalign.index` stores them); only the rows scored are
converted to float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastalign.evaluation import (
    _check_features,
    _region_word_score,
    _split_tokens,
    check_float_array,
    check_positive_int,
)
from fastalign.ops._checks import check_number
from fastalign.ops.region_word import check_lengths
from fastalign.progress import progress_bar, progress_iter
from fastalign.retrieval import QUERIES, _merge_topk
from fastalign.tokens import SimilarityFn, Tokens

FAISS_HINT = "pip install faiss-cpu"
# Queries whose global scores one block of the exact shortlist holds.
_QUERY_BLOCK = 256
# Bytes a (query, gallery item) pair of a shortlist block takes: its float32 score, the copies
# and the int64 indices and cumulative tie counts of the running top-k merge.
_PAIR_BYTES = 32


class PackedTokens:
    """The valid tokens of N sequences, end to end.

    Sequence n is ``flat[offsets[n]:offsets[n + 1]]``: ``flat`` (total, D) is a floating
    tensor or numpy array (a memory map is read in place, only the rows asked for), and
    ``offsets`` (N + 1,) integers from 0 to ``total``, increasing by at least 1 (every sequence
    holds a token).
    """

    def __init__(self, flat: Tensor | np.ndarray, offsets: Sequence[int] | np.ndarray) -> None:
        if isinstance(flat, Tensor):
            floating = flat.dtype.is_floating_point
        elif isinstance(flat, np.ndarray):
            floating = flat.dtype.kind == "f"
        else:
            raise TypeError(
                f"flat must be a torch.Tensor or numpy array, got {type(flat).__name__}"
            )
        if not floating:
            raise TypeError(f"flat must hold floating-point embeddings, got dtype {flat.dtype}")
        if flat.ndim != 2 or 0 in flat.shape:
            raise ValueError(f"flat must be 2-D (tokens, D), non-empty, got {tuple(flat.shape)}")
        offsets = np.asarray(offsets)
        if offsets.dtype.kind not in "iu":
            raise TypeError(f"offsets must hold integers, got dtype {offsets.dtype}")
        if offsets.ndim != 1 or len(offsets) < 2:
            raise ValueError(f"offsets must be 1-D (N + 1,) with N >= 1, got {offsets.shape}")
        offsets = offsets.astype(np.int64)
        if offsets[0] != 0 or offsets[-1] != flat.shape[0]:
            raise ValueError(
                f"offsets must run from 0 to the {flat.shape[0]} rows of flat, got "
                f"{offsets[0]} .. {offsets[-1]}"
            )
        empty = np.flatnonzero(np.diff(offsets) < 1)
        if len(empty):
            n = int(empty[0])
            raise ValueError(
                f"offsets must increase: sequence {n} spans {offsets[n]} .. {offsets[n + 1]}, "
                f"expected at least one token"
            )
        self.flat, self.offsets = flat, offsets
        self.lengths = np.diff(offsets)

    @classmethod
    def pack(cls, tokens: Tokens, dtype: torch.dtype = torch.float16) -> PackedTokens:
        """The valid tokens of ``tokens`` packed, in ``dtype``, in memory."""
        lengths = tokens.lengths.cpu()
        offsets = np.concatenate([[0], np.cumsum(lengths.numpy())])
        return cls(tokens.embs[tokens.valid_mask()].to(dtype), offsets)

    @property
    def count(self) -> int:
        """N, the number of sequences."""
        return len(self.lengths)

    @property
    def dim(self) -> int:
        """D, the embedding size."""
        return self.flat.shape[1]

    @property
    def longest(self) -> int:
        """The most tokens a sequence holds."""
        return int(self.lengths.max())

    def rows(self, indices: np.ndarray, device: torch.device | str = "cpu") -> Tokens:
        """Sequences ``indices`` as float32 :class:`Tokens` on ``device``, padded with zeros
        to the longest of them: (len(indices), longest, D)."""
        lengths = self.lengths[indices]
        longest = int(lengths.max())
        valid = np.arange(longest) < lengths[:, None]
        # The flat row of every valid token, sequence by sequence (increasing for sorted
        # indices: a memory map is read forward).
        source = (self.offsets[indices][:, None] + np.arange(longest))[valid]
        embs = torch.zeros(len(indices), longest, self.dim, device=device)
        if isinstance(self.flat, Tensor):  # index_select: 5x faster than [] on rows here
            part = self.flat.index_select(0, torch.from_numpy(source).to(self.flat.device))
        else:
            part = torch.from_numpy(np.asarray(self.flat[source], dtype=np.float32))
        embs[torch.from_numpy(valid).to(device)] = part.to(device, torch.float32)
        return Tokens(embs, torch.from_numpy(lengths).to(device))


# --------------------------------------------------------------------------- sides
class _Padded:
    """A side given as padded embeddings (a tensor or a numpy array) and CPU lengths."""

    def __init__(self, name: str, tokens: object) -> None:
        embs, lengths = _split_tokens(name, tokens)
        _check_features(f"{name}.embs", embs)
        if isinstance(lengths, Tensor):
            lengths = lengths.detach().cpu()
        self.embs = embs
        self.lengths = check_lengths(
            f"{name}.lengths", lengths, embs.shape[0], embs.shape[1], torch.device("cpu")
        )
        self.count, self.dim = embs.shape[0], embs.shape[2]
        self.longest = int(self.lengths.max())

    def rows(self, indices: np.ndarray, device: torch.device | str = "cpu") -> Tokens:
        """Sequences ``indices`` as float32 :class:`Tokens` on ``device``, cropped to the
        longest of them."""
        lengths = self.lengths[torch.from_numpy(indices)]
        longest = int(lengths.max())
        if isinstance(self.embs, Tensor):
            rows = torch.from_numpy(indices).to(self.embs.device)
            embs = self.embs.index_select(0, rows)[:, :longest]
        else:
            embs = torch.from_numpy(np.asarray(self.embs[indices, :longest], dtype=np.float32))
        return Tokens(embs.to(device, torch.float32), lengths.to(device))


def _side(name: str, tokens: object) -> PackedTokens | _Padded:
    """``tokens`` as a side: packed, or padded (checked)."""
    return tokens if isinstance(tokens, (PackedTokens, _Padded)) else _Padded(name, tokens)


def _budget_bytes(memory_budget_mb: float) -> int:
    check_number("memory_budget_mb", memory_budget_mb, 0.0, low_ok=False)
    return int(memory_budget_mb * 2**20)


# --------------------------------------------------------------------------- stage 1
@torch.no_grad()
def global_embeddings(
    tokens: Tokens | PackedTokens,
    *,
    memory_budget_mb: float = 256,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Tensor:
    """Each sequence's global embedding: the mean of its valid tokens, L2-normalised.

    Args:
        tokens: N sequences: :class:`~fastalign.tokens.Tokens` (embeddings (N, T, D), a
            tensor or numpy array of float16 / float32 / float64, and (N,) lengths or None)
            or :class:`PackedTokens`.
        memory_budget_mb: bound on the rows converted to float32 at once.
        device: where to compute and return the result.
        progress: a progress bar of the blocks (see :mod:`fastalign.progress`).

    Returns:
        (N, D) float32, unit rows (a sequence whose mean is 0 stays 0).
    """
    side = _side("tokens", tokens)
    block = max(1, _budget_bytes(memory_budget_mb) // (side.longest * side.dim * 4))
    result = torch.empty(side.count, side.dim, device=device)
    starts = range(0, side.count, block)
    for start in progress_iter(starts, "global embeddings", progress, unit="block"):
        stop = min(start + block, side.count)
        rows = side.rows(np.arange(start, stop), device)
        result[start:stop] = F.normalize(rows.mean_pooled(), dim=-1)
    return result


def _check_global(name: str, x: object, dim: int | None = None) -> None:
    check_float_array(name, x)
    if x.ndim != 2 or 0 in x.shape or (dim is not None and x.shape[1] != dim):
        expected = "(N, D)" if dim is None else f"(N, {dim})"
        raise ValueError(f"{name} must have shape {expected} with N >= 1, got {tuple(x.shape)}")


def _check_shortlist_index(name: str, index: object) -> None:
    if not isinstance(index, str) or not (index == "exact" or index.split(":")[0] == "faiss"):
        raise ValueError(f"{name} must be 'exact', 'faiss' or 'faiss:FACTORY', got {index!r}")


def _float_rows(x: Tensor | np.ndarray, start: int, stop: int, device) -> Tensor:
    if isinstance(x, Tensor):
        return x[start:stop].to(device, torch.float32)
    return torch.from_numpy(np.array(x[start:stop], dtype=np.float32)).to(device)  # writable


@torch.no_grad()
def global_shortlist(
    queries: Tensor,
    gallery: Tensor | np.ndarray,
    size: int,
    *,
    index: str = "exact",
    memory_budget_mb: float = 256,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Each query's ``size`` gallery items of the highest inner product.

    Args:
        queries: (Q, D) global embeddings of the queries (see :func:`global_embeddings`).
        gallery: (N, D) global embeddings of the gallery: a tensor or numpy array (a memory
            map is read block by block).
        size: items per query, 1 <= size <= N.
        index: ``"exact"``: every inner product, in gallery blocks, a running top-``size``
            merged with each (as :func:`fastalign.streaming_topk`); ``"faiss"``: a faiss flat
            inner-product index (exact too, ties in faiss's order); ``"faiss:FACTORY"``: the
            index ``faiss.index_factory(D, FACTORY, METRIC_INNER_PRODUCT)`` builds (trained
            on the gallery when it needs training), approximate for ANN indexes such as
            ``HNSW32``. faiss indexes hold the gallery in float32 memory.
        memory_budget_mb: ``"exact"``: bound on a block's converted gallery rows and scores.
        progress: a progress bar of the blocks (``"exact"``; see :mod:`fastalign.progress`).

    Returns:
        ``(scores, indices)``: (Q, size) float32 inner products, best first, on the queries'
        device, and their int64 gallery indices; ``"exact"``: equal scores in increasing
        index order.

    Raises:
        ImportError: a faiss index asked for without faiss installed (``pip install
            faiss-cpu``).
        TypeError, ValueError: bad arguments (naming them).
    """
    _check_global("queries", queries)
    if not isinstance(queries, Tensor):
        raise TypeError(f"queries must be a torch.Tensor, got {type(queries).__name__}")
    _check_global("gallery", gallery, queries.shape[1])
    size = check_positive_int("size", size)
    n_gallery = gallery.shape[0]
    if size > n_gallery:
        raise ValueError(f"size must be at most the gallery's {n_gallery} items, got {size}")
    _check_shortlist_index("index", index)
    budget = _budget_bytes(memory_budget_mb)
    if index != "exact":
        return _faiss_shortlist(queries, gallery, size, index.partition(":")[2] or "Flat")
    queries = queries.to(torch.float32)
    n_queries, dim = queries.shape
    query_blocks = range(0, n_queries, _QUERY_BLOCK)
    width = min(n_queries, _QUERY_BLOCK)
    block = max(1, budget // (4 * dim + _PAIR_BYTES * width))
    top_scores = torch.empty(n_queries, size, device=queries.device)
    top_index = torch.empty(n_queries, size, dtype=torch.int64, device=queries.device)
    gallery_blocks = range(0, n_gallery, block)
    bar = progress_bar(
        len(query_blocks) * len(gallery_blocks), "global shortlist", progress, "block"
    )
    try:
        for q0 in query_blocks:
            part = queries[q0 : q0 + _QUERY_BLOCK]
            scores = torch.empty(len(part), 0, device=queries.device)
            index_ = torch.empty(len(part), 0, dtype=torch.int64, device=queries.device)
            for g0 in gallery_blocks:  # in increasing index order: ties to the lower index
                rows = _float_rows(gallery, g0, g0 + block, queries.device)
                scores, index_ = _merge_topk(scores, index_, part @ rows.T, g0, size)
                if bar is not None:
                    bar.update(1)
            top_scores[q0 : q0 + len(part)], top_index[q0 : q0 + len(part)] = scores, index_
    finally:
        if bar is not None:
            bar.close()
    return top_scores, top_index


def _faiss_shortlist(
    queries: Tensor, gallery: Tensor | np.ndarray, size: int, factory: str
) -> tuple[Tensor, Tensor]:
    try:
        import faiss
    except ImportError:
        raise ImportError(
            f"a faiss shortlist index needs the faiss library: {FAISS_HINT} (or use the exact "
            f"shortlist, index='exact')"
        ) from None
    if isinstance(gallery, Tensor):
        gallery = gallery.detach().cpu().numpy()
    vectors = np.ascontiguousarray(gallery, dtype=np.float32)
    try:
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"faiss cannot build index {factory!r}: {exc}") from None
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    points = np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32)
    scores, indices = index.search(points, size)
    if (indices < 0).any():
        raise ValueError(
            f"faiss index {factory!r} returned fewer than {size} items for query "
            f"{int(np.flatnonzero((indices < 0).any(1))[0])}: widen its search (nprobe, "
            f"efSearch) or use a flat index"
        )
    device = queries.device
    return torch.from_numpy(scores).to(device), torch.from_numpy(indices).to(device, torch.int64)


# --------------------------------------------------------------------------- stage 2
@torch.no_grad()
def two_stage_search(
    images: Tokens | PackedTokens | Tensor | np.ndarray,
    captions: Tokens | PackedTokens | Tensor | np.ndarray,
    similarity: SimilarityFn | None = None,
    *,
    k: int,
    queries: str = "captions",
    shortlist: int = 200,
    shortlist_index: str = "exact",
    gallery_global: Tensor | np.ndarray | None = None,
    memory_budget_mb: float = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
    **similarity_options,
) -> tuple[Tensor, Tensor]:
    """Each query's k best gallery items by the fine-grained score, among a shortlist of the
    gallery items nearest to it by their global embeddings.

    Args:
        images, captions: :class:`~fastalign.tokens.Tokens` (or bare embeddings) as
            :func:`fastalign.streaming_topk` takes them, or :class:`PackedTokens`.
        similarity: ``fn(images, captions) -> (ni, nt)`` scores; None:
            :func:`fastalign.region_word_similarity` with ``similarity_options``.
        k: gallery items per query, 1 <= k <= shortlist.
        queries: ``"captions"`` (the images are the gallery) or ``"images"``.
        shortlist: gallery items per query scored by ``similarity`` (at least k); the whole
            gallery or more: no first stage, every item scored (the exact search).
        shortlist_index: how the shortlist is found, see :func:`global_shortlist`.
        gallery_global: (N, D) global embeddings of the gallery (an index's stored ones);
            None: computed (:func:`global_embeddings`).
        memory_budget_mb: bound on the gallery rows converted to float32 at once (and on a
            block of the exact shortlist).
        device: where the scores are computed; None: the query side's device if it is a
            tensor, else the CPU.
        progress: progress bars of the global embeddings, the shortlist and the queries.

    Returns:
        ``(scores, indices)``: (n_queries, k) float32 scores, best first, and their int64
        gallery indices, on ``device``; equal scores in increasing index order. A shortlist
        holding the exact top k gives the exact result; the whole gallery gives
        :func:`fastalign.streaming_topk`'s (the same scores, to their last bit when the
        similarity's scores do not depend on the block they are computed in).

    Raises:
        ImportError: a faiss index without faiss (``pip install faiss-cpu``).
        TypeError, ValueError: bad inputs or arguments (naming them); NaN scores (naming the
            query and the gallery item).
    """
    if not isinstance(queries, str) or queries not in QUERIES:
        raise ValueError(f"queries must be one of {QUERIES}, got {queries!r}")
    k = check_positive_int("k", k)
    shortlist = check_positive_int("shortlist", shortlist)
    _check_shortlist_index("shortlist_index", shortlist_index)
    budget = _budget_bytes(memory_budget_mb)
    if similarity is not None and similarity_options:
        raise TypeError(
            f"similarity_options ({', '.join(sorted(similarity_options))}) apply to the "
            "default score only, not to a given similarity function"
        )
    similarity = similarity or _region_word_score(similarity_options)
    image_side, caption_side = _side("images", images), _side("captions", captions)
    if image_side.dim != caption_side.dim:
        raise ValueError(
            f"image and caption embeddings must share the feature size D, got "
            f"{image_side.dim} and {caption_side.dim}"
        )
    by_caption = queries == "captions"
    query_side, gallery = (caption_side, image_side) if by_caption else (image_side, caption_side)
    gallery_name = "images" if by_caption else "captions"
    if k > gallery.count:
        raise ValueError(
            f"k must be at most the gallery's size, {gallery.count} {gallery_name}, got {k}"
        )
    if shortlist < k:
        raise ValueError(f"shortlist must be at least k = {k}, got {shortlist}")
    if device is None:
        embs = getattr(query_side, "embs", getattr(query_side, "flat", None))
        device = embs.device if isinstance(embs, Tensor) else torch.device("cpu")
    device = torch.device(device)
    if shortlist >= gallery.count:
        candidates = None  # every item, in index order
    else:
        if gallery_global is None:
            gallery_global = global_embeddings(
                gallery, memory_budget_mb=memory_budget_mb, device=device, progress=progress
            )
        else:
            _check_global("gallery_global", gallery_global, gallery.dim)
            if gallery_global.shape[0] != gallery.count:
                raise ValueError(
                    f"gallery_global must hold one row per gallery item ({gallery.count} "
                    f"{gallery_name}), got {gallery_global.shape[0]}"
                )
        query_global = global_embeddings(
            query_side, memory_budget_mb=memory_budget_mb, device=device, progress=progress
        )
        candidates = global_shortlist(
            query_global,
            gallery_global,
            shortlist,
            index=shortlist_index,
            memory_budget_mb=memory_budget_mb,
            progress=progress,
        )[1]
        # In increasing index order, so that the stable sort breaks ties to the lower index.
        candidates = candidates.sort(dim=1).values.cpu().numpy()
    chunk = max(1, budget // (gallery.longest * gallery.dim * 4))
    top_scores = torch.empty(query_side.count, k, device=device)
    top_index = torch.empty(query_side.count, k, dtype=torch.int64, device=device)
    for q in progress_iter(range(query_side.count), "two-stage search", progress, unit="query"):
        query = query_side.rows(np.array([q]), device)
        items = np.arange(gallery.count) if candidates is None else candidates[q]
        scores = torch.cat(
            [
                _score(similarity, query, gallery, items[c0 : c0 + chunk], by_caption, q, device)
                for c0 in range(0, len(items), chunk)
            ]
        )
        best = scores.sort(descending=True, stable=True).indices[:k]
        top_scores[q] = scores[best]
        top_index[q] = torch.from_numpy(items).to(device)[best]
    return top_scores, top_index


def _score(
    similarity: SimilarityFn,
    query: Tokens,
    gallery: PackedTokens | _Padded,
    items: np.ndarray,
    by_caption: bool,
    q: int,
    device: torch.device,
) -> Tensor:
    """(len(items),) float32 scores of one query with gallery ``items``."""
    rows = gallery.rows(items, device)
    pair = (rows, query) if by_caption else (query, rows)
    scores = similarity(*pair)
    shape = (len(items), 1) if by_caption else (1, len(items))
    if not isinstance(scores, Tensor) or tuple(scores.shape) != shape:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(
            f"the similarity returned {got} for {pair[0].count} images x "
            f"{pair[1].count} captions, expected a tensor of shape {shape}"
        )
    scores = scores.reshape(-1).to(torch.float32)
    nan = torch.isnan(scores).nonzero()
    if len(nan):
        item = int(items[int(nan[0, 0])])
        query_name, item_name = ("caption", "image") if by_caption else ("image", "caption")
        raise ValueError(
            f"the similarity scored query {query_name} {q} x {item_name} {item} NaN; the "
            f"search is undefined for NaN scores"
        )
    return scores


# --------------------------------------------------------------------------- recall
def topk_recall(found: Tensor, reference: Tensor) -> float:
    """The fraction of ``reference``'s entries that ``found`` holds, row by row: the recall
    of a two-stage search (``found``, (Q, k') gallery indices) against the exact search's top
    k (``reference``, (Q, k)), over all Q x k entries. 1.0: every exact result found."""
    for name, x in (("found", found), ("reference", reference)):
        if not isinstance(x, Tensor) or x.dtype.is_floating_point or x.ndim != 2:
            raise TypeError(f"{name} must be a 2-D integer tensor of gallery indices")
    if found.shape[0] != reference.shape[0] or reference.numel() == 0:
        raise ValueError(
            f"found and reference must hold the same queries, at least one entry each, got "
            f"shapes {tuple(found.shape)} and {tuple(reference.shape)}"
        )
    reference = reference.to(found.device)
    hits = (found[:, :, None] == reference[:, None, :]).any(1)
    return float(hits.sum()) / reference.numel()
