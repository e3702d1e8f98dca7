"""Tokenizer and vocabulary for captions.

The tokenizer is deliberately simple and fixed (its name is stored with every saved
vocabulary, so a vocabulary is never silently used with a different tokenizer):

* the text is lower-cased (``str.lower``);
* a word is a maximal run of Unicode letters, digits and apostrophes (``'``); every other
  character (spaces, punctuation, underscores, hyphens, ...) separates words;
* apostrophes at the start or end of a word are stripped (``"'hello'" -> "hello"``,
  ``"dogs'" -> "dogs"``, but ``"dog's"`` stays one word), and a run made only of
  apostrophes is dropped.

``"A man's dog, on-the-run!"`` -> ``["a", "man's", "dog", "on", "the", "run"]``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
PAD_ID = 0
UNK_ID = 1
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN)

TOKENIZER_NAME = "lower-alnum-apostrophe-v1"
_FORMAT = "fastalign.vocabulary"
_VERSION = 1

_WORD = re.compile(r"(?:[^\W_]|')+")


def tokenize(text: str) -> list[str]:
    """Split a caption into lower-case words (see the module docstring for the rules).

    Args:
        text: one caption.

    Returns:
        The words, in order; an empty list when the text holds no letter or digit.
    """
    if not isinstance(text, str):
        raise TypeError(f"tokenize expects a str, got {type(text).__name__}")
    words = []
    for match in _WORD.findall(text.lower()):
        word = match.strip("'")
        if word:
            words.append(word)
    return words


def count_words(captions: Iterable[str], caller: str) -> Counter[str]:
    """How often each word (:func:`tokenize`) occurs in ``captions``; TypeError (naming
    ``caller``) for a single str or a caption that is not a str."""
    if isinstance(captions, str):
        raise TypeError(f"{caller} expects an iterable of captions, got a single str")
    counts: Counter[str] = Counter()
    for index, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"caption {index} must be a str, got {type(caption).__name__}")
        counts.update(tokenize(caption))
    return counts


def _write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Readers see either the old file or the complete new one, never a half-written file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


class Vocabulary:
    """Word <-> id mapping with ``<pad>`` = 0 and ``<unk>`` = 1.

    Args:
        words: the ordinary words in id order; they get ids 2, 3, ... (the two special
            tokens are always prepended and must not appear in ``words``).

    Build one from training captions with :meth:`build`; store it with :meth:`save` /
    :meth:`load` (JSON) or inside a checkpoint with :meth:`to_dict` / :meth:`from_dict`.
    """

    pad_id: int = PAD_ID
    unk_id: int = UNK_ID

    def __init__(self, words: Iterable[str] = ()) -> None:
        itos = list(SPECIAL_TOKENS)
        stoi = {w: i for i, w in enumerate(itos)}
        for position, word in enumerate(words):
            if not isinstance(word, str) or not word:
                raise TypeError(f"vocabulary word {position} must be a non-empty str, got {word!r}")
            if word in stoi:
                raise ValueError(f"vocabulary word {word!r} (position {position}) is repeated")
            stoi[word] = len(itos)
            itos.append(word)
        self._itos: tuple[str, ...] = tuple(itos)
        self._stoi: dict[str, int] = stoi

    @classmethod
    def build(
        cls, captions: Iterable[str], min_count: int = 1, max_size: int | None = None
    ) -> Vocabulary:
        """Build a vocabulary from captions, deterministically.

        Words are counted with :func:`tokenize`; words seen at least ``min_count`` times are
        kept, ordered by count (descending) then alphabetically, so the same captions always
        give the same ids whatever their order.

        Args:
            captions: caption strings (for example the training split's ``*_caps.txt``).
            min_count: minimum number of occurrences for a word to be kept (>= 1).
            max_size: if given, keep at most this many ordinary words (the most frequent).

        Returns:
            The vocabulary; ``len(vocab)`` = kept words + 2 special tokens.
        """
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count must be an int >= 1, got {min_count!r}")
        if max_size is not None and (not isinstance(max_size, int) or max_size < 0):
            raise ValueError(f"max_size must be None or an int >= 0, got {max_size!r}")
        counts = count_words(captions, "Vocabulary.build")
        for special in SPECIAL_TOKENS:
            counts.pop(special, None)  # cannot come out of tokenize, but be safe
        kept = sorted(
            (w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w)
        )
        if max_size is not None:
            kept = kept[:max_size]
        return cls(kept)

    # -- mapping -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._itos)

    def __contains__(self, word: object) -> bool:
        return word in self._stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self._itos == other._itos

    def __hash__(self) -> int:
        return hash(self._itos)

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens)"

    @property
    def words(self) -> tuple[str, ...]:
        """All tokens in id order, special tokens included (``words[0] == "<pad>"``)."""
        return self._itos

    def token_to_id(self, word: str) -> int:
        """Id of ``word``, or ``unk_id`` when it is not in the vocabulary."""
        return self._stoi.get(word, UNK_ID)

    def id_to_token(self, index: int) -> str:
        """Token with id ``index`` (0 <= index < len(self))."""
        if isinstance(index, bool) or not isinstance(index, int):
            index = int(index)
        if not 0 <= index < len(self._itos):
            raise ValueError(f"token id {index} out of range [0, {len(self._itos)})")
        return self._itos[index]

    def encode(self, text: str) -> list[int]:
        """Token ids of a caption: ``tokenize(text)`` mapped to ids, unknown words -> 1.

        Returns an empty list for a text without words (callers that need at least one
        token, like :class:`~fastalign.data.PrecompDataset`, reject such captions).
        """
        stoi = self._stoi
        return [stoi.get(w, UNK_ID) for w in tokenize(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Words of ``ids`` joined by single spaces; ``<pad>`` ids are skipped.

        Args:
            ids: a sequence of ints, or a 1-D integer tensor / array.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        words = []
        for index in ids:
            if isinstance(index, bool) or not isinstance(index, int):
                raise TypeError(f"decode expects integer ids, got {index!r}")
            if index == PAD_ID:
                continue
            words.append(self.id_to_token(index))
        return " ".join(words)

    # -- storage -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, for example to store inside a model checkpoint."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "tokenizer": TOKENIZER_NAME,
            "words": list(self._itos),
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any], source: str = "vocabulary dict") -> Vocabulary:
        """Inverse of :meth:`to_dict`; ``source`` names the origin in error messages."""
        if not isinstance(state, Mapping):
            raise ValueError(f"{source}: expected a JSON object, got {type(state).__name__}")
        if state.get("format") != _FORMAT:
            raise ValueError(
                f"{source}: not a fastalign vocabulary (format {state.get('format')!r}, "
                f"expected {_FORMAT!r})"
            )
        if state.get("version") != _VERSION:
            raise ValueError(
                f"{source}: vocabulary version {state.get('version')!r} is not supported "
                f"(expected {_VERSION})"
            )
        if state.get("tokenizer") != TOKENIZER_NAME:
            raise ValueError(
                f"{source}: vocabulary made with tokenizer {state.get('tokenizer')!r}, this "
                f"version of fastalign uses {TOKENIZER_NAME!r}"
            )
        words = state.get("words")
        if not isinstance(words, Sequence) or isinstance(words, str):
            raise ValueError(f"{source}: 'words' must be a list of str, got {type(words).__name__}")
        words = list(words)
        if tuple(words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(
                f"{source}: the first words must be {list(SPECIAL_TOKENS)}, "
                f"got {words[: len(SPECIAL_TOKENS)]}"
            )
        try:
            return cls(words[len(SPECIAL_TOKENS) :])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the vocabulary as JSON (atomically: temporary file + rename).

        Returns:
            The path written.
        """
        text = json.dumps(self.to_dict(), ensure_ascii=False, indent=0)
        return _write_atomic(path, (text + "\n").encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        """Read a vocabulary written by :meth:`save`.

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: the file is not valid JSON or not a compatible vocabulary.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file not found: {path}")
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(
                f"{path}: corrupt vocabulary file, not valid UTF-8 JSON ({err})"
            ) from None
        return cls.from_dict(state, source=str(path))
