"""On-disk search index: one gallery (images or captions) encoded by a trained model.

A folder of five files, written whole or not at all (in a folder beside it, renamed into
place once complete):

- ``tokens.f16``: every item's valid token embeddings, float16, end to end: (tokens, D),
  read memory-mapped;
- ``offsets.npy``: (N + 1,) int64, item n's tokens being rows ``offsets[n]:offsets[n + 1]``;
- ``global.npy``: (N, D) float32 global embeddings (the mean of each item's valid tokens,
  L2-normalised, from the float32 encoder output), the first stage of
  :func:`fastalign.search.two_stage_search`;
- ``ids.json``: the N items' ids (an image's id from ``{split}_ids.txt``, else its index; a
  caption's ``IMAGE_ID#k``, its k-th caption);
- ``manifest.json``: the format, the gallery side, the counts and D, the model (checkpoint
  path and sha256, method and training configuration), the data (root, split, fingerprint)
  and every other file's size and sha256.

:func:`open_index` checks the sizes and shapes always and the checksums by default, and
names the file of any mismatch; :func:`check_checkpoint` checks that a query model is the
index's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastalign._files import atomic_directory
from fastalign.data import CaptionSet, PrecompDataset, data_fingerprint
from fastalign.methods import Method
from fastalign.model_evaluation import SIDES, encoded_batches
from fastalign.progress import progress_bar
from fastalign.search import PackedTokens, global_embeddings, two_stage_search
from fastalign.tokens import Tokens

INDEX_FORMAT = "fastalign-index-1"
TOKENS, OFFSETS, GLOBAL, IDS, MANIFEST = (
    "tokens.f16",
    "offsets.npy",
    "global.npy",
    "ids.json",
    "manifest.json",
)
DATA_FILES = (TOKENS, OFFSETS, GLOBAL, IDS)
_HASH_BLOCK = 1 << 24  # bytes read at a time when hashing


def file_sha256(path: str | os.PathLike, progress: bool = False) -> str:
    """The hex sha256 of a file, read in blocks (``progress``: a bar of the bytes)."""
    path = Path(path)
    digest = hashlib.sha256()
    bar = progress_bar(path.stat().st_size, f"sha256 {path.name}", progress, unit="B")
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_HASH_BLOCK), b""):
                digest.update(block)
                if bar is not None:
                    bar.update(len(block))
    finally:
        if bar is not None:
            bar.close()
    return digest.hexdigest()


# --------------------------------------------------------------------------- writing
def _check_replaceable(path: Path, overwrite: bool) -> None:
    """Raises unless ``path`` is absent, an empty folder, or an index to be overwritten."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    if not (path / MANIFEST).is_file():
        raise FileExistsError(
            f"{path} is a folder that holds no fastalign index: choose another --out (an "
            f"index replaces only an index)"
        )
    if not overwrite:
        raise FileExistsError(f"index {path} exists: pass --overwrite to replace it")


def write_index(
    path: str | os.PathLike,
    batches: Iterable[Tokens],
    ids: Sequence[str],
    *,
    gallery: str,
    source: dict[str, Any],
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Writes an index of a gallery from its encoded batches.

    Args:
        path: the index folder (written beside it, renamed into place when complete).
        batches: the gallery's tokens in order, batch by batch (float32 encoder output:
            (B, T, D) embeddings and (B,) lengths), len(ids) items in all.
        ids: one id per item.
        gallery: ``"images"`` or ``"captions"``.
        source: what encoded them (the manifest's ``model`` and ``data`` entries), JSON.
        overwrite: replace an index at ``path`` (never another folder).
        progress: a progress bar of the checksums (the batches bring their own).

    Returns:
        ``path``.

    Raises:
        FileExistsError: ``path`` exists and may not be replaced.
        ValueError: batches that do not hold len(ids) items of one D.
        OSError: the write failed (naming ``path``).
    """
    path = Path(path)
    if gallery not in SIDES:
        raise ValueError(f"gallery must be one of {SIDES}, got {gallery!r}")
    ids = [str(i) for i in ids]
    _check_replaceable(path, overwrite)
    with atomic_directory(path) as folder:
        count, offsets, dim, global_file = 0, [0], None, None
        with open(folder / TOKENS, "wb") as tokens_file:
            for part in batches:
                embs, lengths = part.embs.detach().float().cpu(), part.lengths.cpu()
                if dim is None:
                    dim = embs.shape[2]
                    global_file = np.lib.format.open_memmap(
                        folder / GLOBAL, mode="w+", dtype=np.float32, shape=(len(ids), dim)
                    )
                if embs.shape[2] != dim or count + len(embs) > len(ids):
                    raise ValueError(
                        f"the batches hold more than {len(ids)} items (one per id) or "
                        f"embeddings of another D than {dim}"
                    )
                valid = Tokens(embs, lengths).valid_mask()
                tokens_file.write(embs[valid].to(torch.float16).numpy().tobytes())
                offsets.extend((offsets[-1] + np.cumsum(lengths.numpy())).tolist())
                global_file[count : count + len(embs)] = global_embeddings(part).cpu().numpy()
                count += len(embs)
        if count != len(ids) or count == 0:
            raise ValueError(f"the batches hold {count} items, expected {len(ids)} (one per id)")
        global_file.flush()
        del global_file
        np.save(folder / OFFSETS, np.asarray(offsets, dtype=np.int64))
        (folder / IDS).write_text(json.dumps(ids))
        manifest = {
            "format": INDEX_FORMAT,
            "gallery": gallery,
            "count": count,
            "tokens": offsets[-1],
            "dim": dim,
            "longest": int(np.diff(offsets).max()),
            "dtype": "float16",
            **source,
            "files": {
                name: {
                    "bytes": (folder / name).stat().st_size,
                    "sha256": file_sha256(folder / name, progress),
                }
                for name in DATA_FILES
            },
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return path


def _ids(dataset: PrecompDataset, gallery: str) -> list[str]:
    image_ids = dataset.image_ids or [str(i) for i in range(dataset.n_images)]
    if gallery == "images":
        return list(image_ids)
    per_image = dataset.captions_per_image
    return [f"{image_ids[j // per_image]}#{j % per_image}" for j in range(len(dataset.captions))]


def build_index(
    path: str | os.PathLike,
    checkpoint: str | os.PathLike,
    method: Method,
    model: nn.Module,
    dataset: PrecompDataset,
    gallery: str = "images",
    *,
    batch_size: int = 256,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """The index of ``dataset``'s images (or captions), encoded by ``model``, the trained
    method restored from ``checkpoint`` (recorded with its sha256): see :func:`write_index`."""
    if gallery not in SIDES:
        raise ValueError(f"gallery must be one of {SIDES}, got {gallery!r}")
    dataset.check_feature_dim(method.config.model.feature_dim, "the checkpoint's model")
    _check_replaceable(Path(path), overwrite)  # before the encoding, not after it
    checkpoint = Path(checkpoint).resolve()
    source = {
        "model": {
            "checkpoint": str(checkpoint),
            "sha256": file_sha256(checkpoint),
            "method": method.name,
            "config": method.config.to_dict(),
        },
        "data": {
            "root": str(Path(dataset.root).resolve()),
            "split": dataset.split,
            "fingerprint": data_fingerprint(dataset.root),
        },
    }
    batches = (part for part, _ in encoded_batches(model, dataset, gallery, batch_size, progress))
    return write_index(
        path,
        batches,
        _ids(dataset, gallery),
        gallery=gallery,
        source=source,
        overwrite=overwrite,
        progress=progress,
    )


# --------------------------------------------------------------------------- reading
@dataclasses.dataclass
class SearchIndex:
    """An opened index: its folder, manifest, gallery side (``"images"`` or ``"captions"``),
    packed tokens (a float16 memory map), (N, D) float32 global embeddings (a memory map)
    and N ids."""

    path: Path
    manifest: dict[str, Any]
    gallery: str
    tokens: PackedTokens
    global_embeddings: np.ndarray
    ids: list[str]

    @property
    def count(self) -> int:
        """N, the gallery's items."""
        return self.tokens.count

    @property
    def checkpoint(self) -> Path:
        """The checkpoint that encoded the gallery, as recorded."""
        return Path(self.manifest["model"]["checkpoint"])


def _corrupt(path: Path, name: str, what: str) -> ValueError:
    return ValueError(
        f"index {path}: {name} {what}: the index is damaged; rebuild it with fastalign index"
    )


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a folder"
        raise FileNotFoundError(f"index {path} {what}")
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(
            f"index {path} has no {MANIFEST}: it is not a fastalign index (or its writing "
            f"never finished)"
        )
    try:
        manifest = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _corrupt(path, MANIFEST, f"is not valid JSON ({exc})") from None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != INDEX_FORMAT:
        raise ValueError(f"index {path} is not a {INDEX_FORMAT} index (format {found!r})")
    expected = {"gallery": str, "count": int, "tokens": int, "dim": int, "files": dict}
    expected |= {"model": dict, "data": dict}
    for key, kind in expected.items():
        if not isinstance(manifest.get(key), kind):
            raise _corrupt(path, MANIFEST, f"lacks {key!r} (a {kind.__name__})")
    if manifest["gallery"] not in SIDES:
        raise _corrupt(path, MANIFEST, f"names gallery {manifest['gallery']!r}")
    return manifest


def open_index(
    path: str | os.PathLike, *, verify: bool = True, progress: bool = False
) -> SearchIndex:
    """Opens an index written by :func:`write_index`.

    Args:
        path: the index folder.
        verify: check every file's sha256 against the manifest (a full read); the sizes,
            shapes and offsets are checked always.
        progress: progress bars of the checksums.

    Raises:
        FileNotFoundError: no index there, or a file of it missing.
        ValueError: a damaged index: the manifest unreadable, a file of another size,
            checksum, shape or content than the manifest says (naming the file).
    """
    path = Path(path)
    manifest = _read_manifest(path)
    count, n_tokens, dim = manifest["count"], manifest["tokens"], manifest["dim"]
    for name in DATA_FILES:
        file, recorded = path / name, manifest["files"].get(name)
        if not isinstance(recorded, dict):
            raise _corrupt(path, MANIFEST, f"lacks the size and checksum of {name}")
        if not file.is_file():
            raise FileNotFoundError(f"index {path} lacks {name}: rebuild it with fastalign index")
        size = file.stat().st_size
        if size != recorded.get("bytes"):
            raise _corrupt(path, name, f"holds {size} bytes, the manifest says {recorded['bytes']}")
        if verify and file_sha256(file, progress) != recorded.get("sha256"):
            raise _corrupt(path, name, "does not match its sha256 in the manifest")
    if n_tokens * dim * 2 != manifest["files"][TOKENS]["bytes"]:
        raise _corrupt(path, MANIFEST, f"counts {n_tokens} tokens of D {dim} in another size")
    arrays = {}
    for name, dtype, shape in (
        (OFFSETS, np.int64, (count + 1,)),
        (GLOBAL, np.float32, (count, dim)),
    ):
        try:
            arrays[name] = np.load(path / name, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise _corrupt(path, name, f"is not a .npy array ({exc})") from None
        if arrays[name].dtype != dtype or arrays[name].shape != shape:
            raise _corrupt(
                path,
                name,
                f"holds {arrays[name].dtype} {arrays[name].shape}, expected "
                f"{np.dtype(dtype)} {shape}",
            )
    flat = np.memmap(path / TOKENS, dtype=np.float16, mode="r", shape=(n_tokens, dim))
    try:
        tokens = PackedTokens(flat, np.array(arrays[OFFSETS]))
    except ValueError as exc:
        raise _corrupt(path, OFFSETS, f"does not fit {TOKENS} ({exc})") from None
    try:
        ids = json.loads((path / IDS).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _corrupt(path, IDS, f"is not valid JSON ({exc})") from None
    if not isinstance(ids, list) or len(ids) != count:
        raise _corrupt(path, IDS, f"does not hold a list of {count} ids")
    return SearchIndex(path, manifest, manifest["gallery"], tokens, arrays[GLOBAL], ids)


def check_checkpoint(index: SearchIndex, checkpoint: str | os.PathLike) -> None:
    """Raises a ValueError unless ``checkpoint`` is the file whose model encoded the index
    (the same sha256): queries must be encoded by the gallery's model."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"checkpoint {checkpoint} of index {index.path} does not exist: pass the model that "
            f"built the index with --checkpoint"
        )
    recorded = index.manifest["model"]
    found = file_sha256(checkpoint)
    if found != recorded.get("sha256"):
        raise ValueError(
            f"checkpoint {checkpoint} (sha256 {found[:12]}) is not the model of index "
            f"{index.path} ({recorded.get('checkpoint')}, sha256 "
            f"{str(recorded.get('sha256'))[:12]}): the queries must be encoded by the "
            f"gallery's model; rebuild the index with fastalign index"
        )


# --------------------------------------------------------------------------- queries
def _model_device(model: nn.Module) -> torch.device:
    # A training-free model may hold buffers only.
    return next(itertools.chain(model.parameters(), model.buffers())).device


def _stacked(parts: list[Tokens]) -> Tokens:
    """Batches of float32 tokens as one, zero-padded to the widest."""
    width = max(part.embs.shape[1] for part in parts)
    embs = [F.pad(part.embs.float(), (0, 0, 0, width - part.embs.shape[1])) for part in parts]
    return Tokens(torch.cat(embs), torch.cat([part.lengths for part in parts]))


@torch.no_grad()
def encode_texts(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 256
) -> Tokens:
    """Query texts as the model's caption encoder embeds them: float32 (n, L, D) tokens
    (zero-padded) and (n,) lengths, on the model's device. ``tokenizer``: the checkpoint's
    (``encode(text) -> ids``).

    Raises:
        ValueError: a text without any word once tokenized (naming it).
    """
    ids = []
    for number, text in enumerate(texts, 1):
        encoded = tokenizer.encode(text)
        if not encoded:
            raise ValueError(f"query {number} has no word once tokenized: {text!r}")
        ids.append(encoded)
    offsets = np.concatenate([[0], np.cumsum([len(i) for i in ids])])
    captions = CaptionSet(np.concatenate(ids).astype(np.int32), offsets)
    device, parts = _model_device(model), []
    model.eval()
    for start in range(0, len(captions), batch_size):
        batch, lengths = captions.padded(range(start, min(start + batch_size, len(captions))))
        parts.append(model.encode_captions(batch.to(device), lengths.to(device)))
    return _stacked(parts)


@torch.no_grad()
def encode_images(model: nn.Module, features: np.ndarray, batch_size: int = 256) -> Tokens:
    """Query images' region features (n, R, F) as the model's image encoder embeds them:
    float32 (n, R', D) tokens and (n,) lengths, on the model's device."""
    device, parts = _model_device(model), []
    model.eval()
    for start in range(0, len(features), batch_size):
        block = torch.from_numpy(np.array(features[start : start + batch_size], np.float32))
        lengths = torch.full((len(block),), block.shape[1], dtype=torch.long, device=device)
        parts.append(model.encode_images(block.to(device), lengths))
    return _stacked(parts)


# --------------------------------------------------------------------------- searching
@torch.no_grad()
def search_index(
    index: SearchIndex,
    method: Method,
    model: nn.Module,
    queries: Tokens,
    *,
    k: int = 10,
    shortlist: int = 200,
    shortlist_index: str = "exact",
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Two-stage search (:func:`fastalign.search.two_stage_search`) of the index's gallery for
    ``queries``, the other side's tokens as the model encodes them, scored by the method's
    similarity. Returns ``(scores, indices)`` (n_queries, k), best first; the whole gallery as
    shortlist (or more) is the exact search."""

    def similarity(images: Tokens, captions: Tokens) -> Tensor:
        return method.similarity(model, images, captions)

    by_caption = index.gallery == "images"
    images, captions = (index.tokens, queries) if by_caption else (queries, index.tokens)
    return two_stage_search(
        images,
        captions,
        similarity,
        k=k,
        queries="captions" if by_caption else "images",
        shortlist=shortlist,
        shortlist_index=shortlist_index,
        gallery_global=index.global_embeddings,
        device=_model_device(model),
        progress=progress,
    )
