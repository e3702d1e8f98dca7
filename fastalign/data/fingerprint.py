"""A short identity of a precomputed-feature folder (real or synthetic), cheap to compute.

:func:`data_fingerprint` hashes, for every split of the folder (every ``{split}_caps.txt``
and ``{split}_ims.npy``, plus ``{split}_ids.txt`` when present), the full caption and id
files, and of each feature file its shape, dtype, size in bytes and a sample of its bytes
(the first and the last MiB). A 5000-image COCO folder (about 1.5 GB of features) costs a
few MiB of reads, not a full read of the features. Two folders with the same fingerprint
hold the same captions and (very probably) the same features; a change in the middle of a
feature file that keeps its shape goes unseen.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

SAMPLE_BYTES = 1 << 20  # bytes read at the start and at the end of each feature file
DIGEST_CHARS = 16

_SUFFIXES = ("_caps.txt", "_ids.txt", "_ims.npy")


def _splits(root: Path) -> list[str]:
    splits = set()
    for entry in root.iterdir():
        for suffix in ("_caps.txt", "_ims.npy"):
            if entry.is_file() and entry.name.endswith(suffix):
                splits.add(entry.name[: -len(suffix)])
    return sorted(splits)


def _hash_file(h: hashlib._Hash, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def _hash_features(h: hashlib._Hash, path: Path) -> None:
    size = path.stat().st_size
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        h.update(f"shape={tuple(array.shape)} dtype={array.dtype.str} ".encode())
        del array
    except (ValueError, OSError, EOFError):
        h.update(b"unreadable ")
    h.update(f"size={size}\n".encode())
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            h.update(f.read(SAMPLE_BYTES))


def data_fingerprint(root: str | os.PathLike) -> str:
    """A 16-hex-digit digest of the data of a precomputed-feature folder.

    Covers, per split (sorted by name), the bytes of ``{split}_caps.txt`` and
    ``{split}_ids.txt`` and, of ``{split}_ims.npy``, its shape, dtype, size and its first
    and last MiB. Other files (word vectors, knowledge, meta data) are not covered.

    Raises:
        FileNotFoundError: ``root`` is not a folder or holds no split.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    splits = _splits(root)
    if not splits:
        raise FileNotFoundError(f"{root} holds no {{split}}_caps.txt or {{split}}_ims.npy file")
    h = hashlib.sha256(b"fastalign.data_fingerprint/1\n")
    for split in splits:
        for suffix in _SUFFIXES:
            path = root / f"{split}{suffix}"
            if not path.is_file():
                continue
            h.update(f"{path.name}\n".encode())
            if suffix == "_ims.npy":
                _hash_features(h, path)
            else:
                _hash_file(h, path)
    return h.hexdigest()[:DIGEST_CHARS]
