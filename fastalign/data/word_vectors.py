"""Word vectors in GloVe text format, restricted to a vocabulary or a set of words.

Format: one word per line, ``word v1 v2 ... vD`` separated by whitespace. A first line of
exactly two integers (``n_words D``, the word2vec / fastText header) is skipped. Blank
lines are ignored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastalign.data.vocab import PAD_ID, SPECIAL_TOKENS, Vocabulary


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_vectors(
    path: str | os.PathLike, wanted: Collection[str], dim: int | None
) -> tuple[dict[str, np.ndarray], int]:
    """The one parser of GloVe-format files, behind :func:`load_word_vectors` and
    :func:`read_word_vectors` (their docstrings give the rules).

    Returns:
        ``(vectors, D)``: ``vectors`` maps each word of ``wanted`` found in the file to its
        (D,) float32 vector (an exact match, else the first line whose lower-cased word
        equals it); ``D`` is the file's dimension.
    """
    path = Path(path)
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
        raise ValueError(f"dim must be None or an int >= 1, got {dim!r}")
    if not path.is_file():
        raise FileNotFoundError(f"word vector file not found: {path}")

    found: dict[str, np.ndarray] = {}  # exact matches
    found_lower: dict[str, np.ndarray] = {}  # lower-cased matches
    width = dim
    origin = f"dim={dim}"  # where the expected width comes from, for error messages
    saw_vector = False

    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if (
                not saw_vector
                and len(fields) == 2
                and fields[0].isdigit()
                and fields[1].isdigit()
                and (dim is None or int(fields[1]) == dim)
            ):
                width = int(fields[1])  # word2vec / fastText header "n_words dim"
                origin = f"the header on line {number}"
                if width < 1:
                    raise ValueError(f"{path}:{number}: header gives dimension {width}")
                continue
            n_values = len(fields) - 1
            if width is None:
                if n_values < 1:
                    raise ValueError(
                        f"{path}:{number}: expected 'word v1 ... vD', got a line with no values"
                    )
                width = n_values
                origin = f"the vector on line {number}"
            elif n_values != width:
                extra = fields[1 : len(fields) - width] if n_values > width else []
                if not extra or any(_is_number(x) for x in extra):
                    raise ValueError(
                        f"{path}:{number}: expected {width} values ({origin}), got {n_values}"
                    )
                saw_vector = True
                continue  # a word containing spaces: cannot be a wanted word
            saw_vector = True
            word = fields[0]
            exact = word in wanted
            if exact:
                target = word
                if target in found:
                    continue
            else:
                target = word.lower()
                if target not in wanted or target in found or target in found_lower:
                    continue
            try:
                vector = np.array([float(x) for x in fields[1:]], dtype=np.float32)
            except ValueError:
                bad = next(x for x in fields[1:] if not _is_number(x))
                raise ValueError(
                    f"{path}:{number}: non-numeric value {bad!r} in the vector of {word!r}"
                ) from None
            if not np.isfinite(vector).all():
                raise ValueError(f"{path}:{number}: non-finite value in the vector of {word!r}")
            (found if exact else found_lower)[target] = vector

    if not saw_vector:
        raise ValueError(f"{path}: empty word vector file (no 'word v1 ... vD' line)")
    for word, vector in found_lower.items():
        found.setdefault(word, vector)
    return found, width


def read_word_vectors(
    path: str | os.PathLike, words: Iterable[str], dim: int | None = None
) -> dict[str, np.ndarray]:
    """The vectors of ``words`` found in a GloVe-format text file, read as a stream.

    Same file rules, matching and errors as :func:`load_word_vectors` (one parser serves
    both): exact match first, else the first line whose lower-cased word equals the word;
    a word2vec header is skipped; lines whose word contains spaces are accepted and never
    match; every line's field count is checked. Memory O(len(words) * D), not the file.

    Args:
        path: the text file.
        words: the words wanted (repeats are fine).
        dim: expected dimension D; None: taken from the first vector line.

    Returns:
        ``{word: (D,) float32 vector}`` for the words found, in the order of ``words``'
        first occurrences; words absent from the file are absent from the dict.

    Raises:
        TypeError: ``words`` is a single str.
        FileNotFoundError: missing file.
        ValueError: as :func:`load_word_vectors` (the message names the file and line).
    """
    if isinstance(words, str):
        raise TypeError("read_word_vectors expects an iterable of words, got a single str")
    wanted = dict.fromkeys(words)
    found, _ = _read_vectors(path, wanted, dim)
    return {word: found[word] for word in wanted if word in found}


def load_word_vectors(
    path: str | os.PathLike,
    vocab: Vocabulary,
    dim: int | None = None,
    seed: int = 0,
    init_std: float = 0.1,
) -> tuple[Tensor, int]:
    """Embedding matrix for ``vocab`` from a GloVe-format text file, read as a stream.

    Only the vectors of vocabulary words are kept (memory O(len(vocab) * D), not the file).
    A word matches exactly; if a word has no exact match, a line whose lower-cased word
    equals it is used (cased files such as glove.840B). The first matching line wins.
    Lines whose word contains spaces (a few in glove.840B) are accepted when their leading
    extra fields are not numbers; they can never match a vocabulary word.

    Every line's field count is checked; values are parsed only on lines that are used.

    Args:
        path: the text file.
        vocab: the vocabulary; row ``i`` of the result is the vector of ``vocab.words[i]``.
        dim: expected dimension D; None: taken from the first vector line.
        seed: seed of the random vectors given to words that are not in the file.
        init_std: standard deviation of those random vectors (normal, mean 0).

    Returns:
        ``(vectors (len(vocab), D) float32, n_found)``: ``n_found`` = vocabulary words
        (special tokens excluded) found in the file. ``<pad>`` (row 0) is all zeros;
        ``<unk>`` and missing words get random vectors.

    Raises:
        FileNotFoundError: missing file.
        ValueError: empty file, wrong number of values, non-numeric or non-finite value,
            dimension different from ``dim`` (the message names the file and 1-based line).
    """
    if not isinstance(vocab, Vocabulary):
        raise TypeError(f"vocab must be a fastalign Vocabulary, got {type(vocab).__name__}")
    if not math.isfinite(float(init_std)) or init_std < 0:
        raise ValueError(f"init_std must be finite and >= 0, got {init_std}")

    words = vocab.words
    index = {w: i for i, w in enumerate(words) if i != PAD_ID}
    found, width = _read_vectors(path, index, dim)

    generator = torch.Generator().manual_seed(int(seed))
    vectors = torch.randn(len(words), width, generator=generator, dtype=torch.float32)
    vectors.mul_(float(init_std))
    vectors[PAD_ID] = 0.0
    for word, vector in found.items():
        vectors[index[word]] = torch.from_numpy(vector)
    n_found = sum(1 for word in found if index[word] >= len(SPECIAL_TOKENS))
    return vectors, n_found
