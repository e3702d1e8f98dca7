"""Knowledge folders of the unpaired methods (MASK / MACK): word-region pairs on disk.

A knowledge folder holds ``regions.npy``, an (n_rows, F) float16 or float32 array of
region features, and ``words.txt``, the word of each row (one per line, UTF-8); a
GloVe-format file gives the words' vectors. A word may name many rows; the concepts are
the distinct words (SPEC section 3).

Files of millions of rows (4 GB for 1M x 2048 float16) are never loaded whole: the
regions stay memory-mapped, :func:`word_prototypes` streams them in file order with
memory independent of n_rows, and :class:`KnowledgeLoader` visits them in shuffled
contiguous blocks, each read with one sequential slice.

* :func:`open_knowledge` -> :class:`Knowledge` (checked files, concept index, vectors);
* :func:`word_prototypes`: (K, D') per-concept mean of (transformed) regions;
* :class:`KnowledgeLoader`: reproducible shuffled batches of :class:`KnowledgeBatch`;
* :func:`map_caption_words`: which caption words are concepts, out-of-knowledge words
  with a vector, or dropped (:class:`CaptionWords`).
"""

from __future__ import annotations

import os
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from fastalign.data.precomp import _epoch_seed
from fastalign.data.vocab import count_words
from fastalign.data.word_vectors import read_word_vectors
from fastalign.progress import progress_iter

REGIONS_FILE = "regions.npy"
WORDS_FILE = "words.txt"
_REGION_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
_SHOWN_MISSING = 10  # missing word vectors named in the error message


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------
# the folder
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Knowledge:
    """An opened knowledge folder (see :func:`open_knowledge`).

    Attributes:
        folder: the knowledge folder.
        regions: (n_rows, F) ``np.memmap`` of ``regions.npy``, float16 or float32, read-only;
            never loaded whole.
        words: the K concept words, sorted; each names at least one row.
        row_concepts: (n_rows,) int64, the concept (index into ``words``) of each row.
        counts: (K,) int64, rows per concept (all >= 1).
        word_vectors: (K, Dw) float32; row k is the vector of ``words[k]``.
    """

    folder: Path
    regions: np.ndarray
    words: tuple[str, ...]
    row_concepts: np.ndarray
    counts: np.ndarray
    word_vectors: Tensor = field(repr=False)

    @property
    def n_rows(self) -> int:
        """Rows of ``regions.npy`` (word-region pairs)."""
        return int(self.regions.shape[0])

    @property
    def feature_dim(self) -> int:
        """Region feature size F."""
        return int(self.regions.shape[1])

    @property
    def n_concepts(self) -> int:
        """Concept words K."""
        return len(self.words)

    @cached_property
    def word_index(self) -> dict[str, int]:
        """Concept word -> its index in ``words`` (built once)."""
        return {word: k for k, word in enumerate(self.words)}

    def __repr__(self) -> str:
        return (
            f"Knowledge({str(self.folder)!r}, {self.n_rows} rows x {self.feature_dim} "
            f"{self.regions.dtype}, {self.n_concepts} concepts, "
            f"word vectors {self.word_vectors.shape[1]}-d)"
        )


def _open_regions(path: Path) -> np.ndarray:
    expected = "an (n_rows, feature_dim) float16 or float32 .npy array"
    if not path.is_file():
        raise FileNotFoundError(f"knowledge regions file not found: {path} (expected {expected})")
    try:
        regions = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(
            f"{path}: cannot memory-map as a .npy array ({err}); expected {expected}"
        ) from None
    if not isinstance(regions, np.ndarray):
        raise ValueError(f"{path}: expected {expected}, got {type(regions).__name__}")
    if regions.ndim != 2:
        raise ValueError(
            f"{path}: expected {expected}, got an array of shape {tuple(regions.shape)} "
            f"({regions.ndim}-D)"
        )
    if regions.dtype not in _REGION_DTYPES:
        raise ValueError(f"{path}: expected dtype float16 or float32, got {regions.dtype}")
    if 0 in regions.shape:
        raise ValueError(
            f"{path}: empty region array of shape {tuple(regions.shape)}, expected at least "
            "one row of at least one feature"
        )
    if not regions.flags.c_contiguous:
        raise ValueError(
            f"{path}: stored in Fortran (column-major) order, so a row is not contiguous on "
            "disk; expected C order (save np.ascontiguousarray(regions))"
        )
    return regions


def _read_row_words(path: Path) -> tuple[list[str], np.ndarray]:
    """(distinct words in order of appearance, (n_rows,) int64 index into them), streamed:
    memory O(distinct words + n_rows), not O(n_rows) Python strings. Trailing blank lines
    are ignored; any other blank line is an error."""
    if not path.is_file():
        raise FileNotFoundError(
            f"knowledge words file not found: {path} (expected the word of each row of "
            f"{REGIONS_FILE}, one per line)"
        )
    index: dict[str, int] = {}
    rows = array("q")
    first_blank = None
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for number, line in enumerate(f, start=1):
                word = line.strip()
                if not word:
                    first_blank = first_blank or number
                    continue
                if first_blank is not None:
                    raise ValueError(
                        f"{path}:{first_blank}: empty word (blank line; expected one word per "
                        f"row of {REGIONS_FILE})"
                    )
                rows.append(index.setdefault(word, len(index)))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not valid UTF-8 ({err})") from None
    if not rows:
        raise ValueError(f"{path}: no words (expected one word per row of {REGIONS_FILE})")
    return list(index), np.frombuffer(rows, dtype=np.int64).copy()


def open_knowledge(
    folder: str | os.PathLike, word_vectors_path: str | os.PathLike, dim: int | None = None
) -> Knowledge:
    """Open and check a knowledge folder.

    Reads ``folder/regions.npy`` memory-mapped (``np.load(mmap_mode="r")``, no copy) and
    ``folder/words.txt`` (one word per row, stripped, UTF-8; trailing blank lines are
    ignored), then the concept words' vectors from ``word_vectors_path`` (streamed, see
    :func:`~fastalign.data.read_word_vectors`).

    Args:
        folder: the knowledge folder.
        word_vectors_path: GloVe-format text file holding a vector for every concept word.
        dim: expected word-vector dimension Dw; None: the file's.

    Returns:
        A :class:`Knowledge`: regions (n_rows, F), the K sorted concept words, row_concepts
        (n_rows,) int64, counts (K,) int64, word_vectors (K, Dw) float32.

    Raises:
        FileNotFoundError: missing folder, ``regions.npy``, ``words.txt`` or word-vector file.
        ValueError: regions not a 2-D float16/float32 .npy array, or empty; ``words.txt``
            empty, not UTF-8 or with a blank line (named by its 1-based line); row counts
            that disagree; concept words without a vector; word vectors of another
            dimension than ``dim``, or a malformed word-vector file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"knowledge folder not found: {folder} (expected a folder with {REGIONS_FILE} "
            f"and {WORDS_FILE})"
        )
    regions_path, words_path = folder / REGIONS_FILE, folder / WORDS_FILE
    regions = _open_regions(regions_path)
    seen, rows = _read_row_words(words_path)
    if len(rows) != regions.shape[0]:
        raise ValueError(
            f"{folder}: {REGIONS_FILE} has {regions.shape[0]} rows but {WORDS_FILE} has "
            f"{len(rows)} words; expected one word per row"
        )
    words = tuple(sorted(seen))
    rank = {word: k for k, word in enumerate(words)}
    remap = np.array([rank[word] for word in seen], dtype=np.int64)
    row_concepts = remap[rows]
    del rows
    counts = np.bincount(row_concepts, minlength=len(words)).astype(np.int64)

    found = read_word_vectors(word_vectors_path, words, dim=dim)
    missing = [word for word in words if word not in found]
    if missing:
        shown = ", ".join(repr(w) for w in missing[:_SHOWN_MISSING])
        more = (
            f", ... ({len(missing) - _SHOWN_MISSING} more)" if len(missing) > _SHOWN_MISSING else ""
        )
        raise ValueError(
            f"{word_vectors_path}: {len(missing)} of the {len(words)} concept words of "
            f"{words_path} have no vector: {shown}{more}; expected a vector for every word"
        )
    word_vectors = torch.from_numpy(np.stack([found[word] for word in words]))
    return Knowledge(
        folder=folder,
        regions=regions,
        words=words,
        row_concepts=row_concepts,
        counts=counts,
        word_vectors=word_vectors,
    )


def _check_knowledge(knowledge: object) -> Knowledge:
    if not isinstance(knowledge, Knowledge):
        raise TypeError(
            f"knowledge must be a Knowledge (see open_knowledge), got {type(knowledge).__name__}"
        )
    return knowledge


# ---------------------------------------------------------------------------------------
# prototypes
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def word_prototypes(
    knowledge: Knowledge,
    transform: Callable[[Tensor], Tensor] | None = None,
    chunk_rows: int = 4096,
    progress: bool = False,
) -> Tensor:
    """Per-concept mean of the (transformed) region features, streamed from the file.

    Reads ``knowledge.regions`` in file order, ``chunk_rows`` rows at a time (sequential
    reads only), applies ``transform`` to each (<= chunk_rows, F) float32 chunk and adds
    the result to concept ``k``'s row with ``index_add_`` into a float64 accumulator.
    Memory: one chunk (and its transform) plus the (K, D') accumulator, whatever n_rows.
    Runs under ``torch.no_grad()``.

    Args:
        knowledge: from :func:`open_knowledge`.
        transform: maps a (rows, F) float32 CPU tensor to (rows, D') (row i of the output
            belongs to row i of the input); None: identity (D' = F). The accumulator lives
            on the device of its output.
        chunk_rows: rows read per step (>= 1).
        progress: draw a progress bar (see :mod:`fastalign.progress`).

    Returns:
        (K, D') float32; row k is the mean over the rows of ``knowledge.words[k]``.

    Raises:
        ValueError: ``chunk_rows`` not a positive int; ``transform`` returning anything but
            a 2-D floating tensor with one row per input row and the same D' every chunk.
    """
    knowledge = _check_knowledge(knowledge)
    chunk_rows = _positive_int("chunk_rows", chunk_rows)
    regions, n_rows = knowledge.regions, knowledge.n_rows
    concepts = torch.from_numpy(knowledge.row_concepts)
    starts = range(0, n_rows, chunk_rows)
    sums: Tensor | None = None
    for start in progress_iter(starts, "word prototypes", progress, unit="chunk"):
        stop = min(start + chunk_rows, n_rows)
        if transform is None:
            # float16 / float32 -> float64 is exact: the same as going through float32.
            values = torch.from_numpy(np.asarray(regions[start:stop], dtype=np.float64))
        else:
            chunk = torch.from_numpy(np.array(regions[start:stop], dtype=np.float32))
            values = transform(chunk)
            _check_transformed(values, stop - start, sums)
            values = values.to(torch.float64)
        if sums is None:
            sums = torch.zeros(
                knowledge.n_concepts, values.shape[1], dtype=torch.float64, device=values.device
            )
        sums.index_add_(0, concepts[start:stop].to(sums.device), values)
        del values
    counts = torch.from_numpy(knowledge.counts).to(sums.device, torch.float64)
    return sums.div_(counts[:, None]).to(torch.float32)


def _check_transformed(values: object, rows: int, sums: Tensor | None) -> None:
    if not isinstance(values, Tensor):
        raise ValueError(f"transform must return a Tensor, got {type(values).__name__}")
    if values.ndim != 2 or values.shape[0] != rows:
        raise ValueError(
            f"transform must return shape ({rows}, D') for a chunk of {rows} rows, got "
            f"{tuple(values.shape)}"
        )
    if not values.is_floating_point():
        raise ValueError(f"transform must return a floating-point tensor, got {values.dtype}")
    if sums is not None and values.shape[1] != sums.shape[1]:
        raise ValueError(
            f"transform returned {values.shape[1]} columns, expected {sums.shape[1]} as for "
            "the first chunk"
        )


# ---------------------------------------------------------------------------------------
# loader
# ---------------------------------------------------------------------------------------


class KnowledgeBatch(NamedTuple):
    """A batch of knowledge rows (CPU).

    Attributes:
        regions: (B, F) float32 region features.
        concepts: (B,) int64 concept index (into ``Knowledge.words``) of each row.
        rows: (B,) int64 row numbers in ``regions.npy``.
    """

    regions: Tensor
    concepts: Tensor
    rows: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> KnowledgeBatch:
        """The same batch with every tensor moved to ``device``."""
        return KnowledgeBatch(*(t.to(device, non_blocking=non_blocking) for t in self))

    def describe(self) -> str:
        """The batch's rows, for messages."""
        return f"the batch of knowledge rows {self.rows.tolist()}"

    def source_rows(self) -> Tensor:
        """(B,) the row of each region in ``regions.npy``."""
        return self.rows


class KnowledgeLoader:
    """Shuffled batches of knowledge rows, read in sequential blocks.

    An epoch visits every row exactly once: the file is cut into contiguous blocks of
    ``chunk_rows`` rows, the blocks are visited in a random order, each is read with one
    sequential slice of the memmap and its rows are shuffled; batches of ``batch_size``
    rows are cut from that stream (a batch may span two blocks). Memory
    O(max(chunk_rows, batch_size) * F), reads sequential, however big the file.

    The order of epoch ``e`` depends only on ``(seed, e)`` (``torch.randperm`` with a
    generator seeded from both). Like :class:`~fastalign.data.EpochSampler`, each
    ``iter()`` uses the current epoch and then advances it by one; :meth:`set_epoch`
    picks it (e.g. when resuming).

    Args:
        knowledge: from :func:`open_knowledge`.
        batch_size: rows per batch (>= 1).
        seed: base seed of the order.
        shuffle: shuffle (else rows 0..n_rows-1 in order).
        drop_last: drop a last batch shorter than ``batch_size``.
        chunk_rows: rows per block (>= 1); larger blocks mix better, cost more memory.

    Yields:
        :class:`KnowledgeBatch` of (B, F) float32 regions, (B,) concepts and (B,) rows.
    """

    def __init__(
        self,
        knowledge: Knowledge,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
        chunk_rows: int = 65536,
    ) -> None:
        self.knowledge = _check_knowledge(knowledge)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.chunk_rows = _positive_int("chunk_rows", chunk_rows)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration produce the order of ``epoch``."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n, b = self.knowledge.n_rows, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[KnowledgeBatch]:
        epoch = self.epoch
        self.epoch += 1
        return self._batches(epoch)

    def _batches(self, epoch: int) -> Iterator[KnowledgeBatch]:
        regions, concepts = self.knowledge.regions, self.knowledge.row_concepts
        n_rows, size, block = self.knowledge.n_rows, self.batch_size, self.chunk_rows
        n_blocks = -(-n_rows // block)
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        if self.shuffle:
            order = torch.randperm(n_blocks, generator=generator).tolist()
        else:
            order = range(n_blocks)
        parts: list[tuple[np.ndarray, np.ndarray]] = []  # (features, rows) of the next batch
        pending = 0
        for b in order:
            start = b * block
            stop = min(start + block, n_rows)
            data = np.array(regions[start:stop])  # one sequential read, the file's dtype
            if self.shuffle:
                within = torch.randperm(stop - start, generator=generator).numpy()
            else:
                within = np.arange(stop - start)
            taken = 0
            while taken < len(within):
                pick = within[taken : taken + size - pending]
                parts.append((data[pick], pick + start))
                taken += len(pick)
                pending += len(pick)
                if pending == size:
                    yield _batch(parts, concepts)
                    parts, pending = [], 0
            del data
        if parts and not self.drop_last:
            yield _batch(parts, concepts)


def _batch(parts: list[tuple[np.ndarray, np.ndarray]], concepts: np.ndarray) -> KnowledgeBatch:
    features = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
    rows = parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts])
    rows = rows.astype(np.int64, copy=False)
    return KnowledgeBatch(
        regions=torch.from_numpy(features).to(torch.float32),
        concepts=torch.from_numpy(concepts[rows]),
        rows=torch.from_numpy(rows),
    )


# ---------------------------------------------------------------------------------------
# caption words
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CaptionWords:
    """How the words of a set of captions relate to a knowledge (:func:`map_caption_words`).

    Attributes:
        known: distinct caption words that are concept words, sorted.
        oov: distinct caption words that are not concept words but have a word vector,
            sorted (out of the knowledge; MASK / MACK represent them through their
            neighbours among the concepts).
        oov_vectors: (len(oov), Dw) float32; row i is the vector of ``oov[i]``.
        dropped: word -> occurrences, for caption words with neither.
        n_tokens, n_known_tokens, n_oov_tokens, n_dropped_tokens: token (occurrence)
            counts; the last three add up to ``n_tokens``.
    """

    known: tuple[str, ...]
    oov: tuple[str, ...]
    oov_vectors: Tensor = field(repr=False)
    dropped: Counter[str] = field(repr=False)
    n_tokens: int
    n_known_tokens: int
    n_oov_tokens: int
    n_dropped_tokens: int

    def summary(self) -> str:
        """One line for the log, e.g. ``caption words: 950 known (91.2% of tokens), 40 out
        of the knowledge with a word vector (6.1%), 12 dropped (2.7%; most frequent: a, b,
        c)``."""

        def share(n: int) -> str:
            return f"{100 * n / self.n_tokens:.1f}%" if self.n_tokens else "0.0%"

        frequent = ", ".join(word for word, _ in self.dropped.most_common(3))
        return (
            f"caption words: {len(self.known)} known ({share(self.n_known_tokens)} of tokens), "
            f"{len(self.oov)} out of the knowledge with a word vector "
            f"({share(self.n_oov_tokens)}), {len(self.dropped)} dropped "
            f"({share(self.n_dropped_tokens)}"
            + (f"; most frequent: {frequent})" if frequent else ")")
        )


def map_caption_words(
    knowledge: Knowledge,
    captions: Iterable[str],
    word_vectors_path: str | os.PathLike | None,
    oov: bool = True,
) -> CaptionWords:
    """Sort the words of ``captions`` into concept words, out-of-knowledge words with a
    vector, and dropped words.

    Each caption is split with :func:`~fastalign.data.tokenize` (lower-cased, so a concept
    word with capitals never matches). Non-concept words are looked up in
    ``word_vectors_path`` (streamed, exact then lower-cased match, dimension checked
    against ``knowledge.word_vectors``).

    Args:
        knowledge: from :func:`open_knowledge`.
        captions: caption strings.
        word_vectors_path: GloVe-format file (may be None when ``oov`` is False).
        oov: look out-of-knowledge words up; False: every non-concept word is dropped and
            no vector is read.

    Returns:
        A :class:`CaptionWords` (its ``summary()`` is one line for the log).

    Raises:
        TypeError: ``captions`` is a single str or holds a non-str.
        FileNotFoundError, ValueError: as :func:`~fastalign.data.read_word_vectors`.
    """
    knowledge = _check_knowledge(knowledge)
    if oov and word_vectors_path is None:
        raise ValueError("word_vectors_path is needed when oov=True")
    tokens = count_words(captions, "map_caption_words")
    index = knowledge.word_index
    known = tuple(sorted(w for w in tokens if w in index))
    others = sorted(w for w in tokens if w not in index)
    dim = knowledge.word_vectors.shape[1]
    found = read_word_vectors(word_vectors_path, others, dim=dim) if oov and others else {}
    oov_words = tuple(w for w in others if w in found)
    if oov_words:
        oov_vectors = torch.from_numpy(np.stack([found[w] for w in oov_words]))
    else:
        oov_vectors = torch.empty(0, dim, dtype=torch.float32)
    dropped = Counter({w: tokens[w] for w in others if w not in found})
    n_known = sum(tokens[w] for w in known)
    n_oov = sum(tokens[w] for w in oov_words)
    return CaptionWords(
        known=known,
        oov=oov_words,
        oov_vectors=oov_vectors,
        dropped=dropped,
        n_tokens=n_known + n_oov + dropped.total(),
        n_known_tokens=n_known,
        n_oov_tokens=n_oov,
        n_dropped_tokens=dropped.total(),
    )
