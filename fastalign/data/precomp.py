"""Precomputed region features + captions: the SCAN / VSE++ / CHAN folder format.

A dataset folder holds, per split (``train``, ``dev``, ``test``, and for MSCOCO
``testall`` = the 5000-image 5K test set):

* ``{split}_ims.npy``: (n_images, R, F) floating array (36 x 2048 bottom-up-attention
  regions in the public releases), opened memory-mapped, never converted to float64;
* ``{split}_caps.txt``: one caption per line, ``captions_per_image`` consecutive lines per
  image, in image order (caption ``j`` belongs to image ``j // captions_per_image``);
* optionally ``{split}_ids.txt``: one id per image (or one per caption).

MSCOCO 1K results are the mean over 5 folds of 1000 images of ``testall``:
``dataset.fold_1k(k)`` for k = 0..4.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, overload

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from fastalign.data.vocab import PAD_ID, Vocabulary

COCO_5K_SPLIT = "testall"
COCO_1K_FOLD_SIZE = 1000
COCO_1K_FOLDS = 5


# ---------------------------------------------------------------------------------------
# captions
# ---------------------------------------------------------------------------------------


def iter_captions(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, caption)`` for each caption line of a ``*_caps.txt`` file.

    Line numbers are 1-based. Trailing blank lines at the end of the file are ignored; a
    blank line anywhere else raises ``ValueError`` naming the file and line (it would shift
    every later caption onto the wrong image). Whether a caption holds any *word* is
    checked by the callers that tokenize it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    first_blank = None
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for number, line in enumerate(f, start=1):
                text = line.rstrip("\r\n")
                if not text.strip():
                    if first_blank is None:
                        first_blank = number
                    continue
                if first_blank is not None:
                    raise ValueError(
                        f"{path}:{first_blank}: empty caption (blank line before line {number})"
                    )
                yield number, text
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not valid UTF-8 ({err})") from None


def read_captions(path: str | os.PathLike, split: str | None = None) -> list[str]:
    """All captions of a ``*_caps.txt`` file as strings (see :func:`iter_captions`).

    Args:
        path: the caption file, or, when ``split`` is given, the dataset folder.
        split: read ``{path}/{split}_caps.txt``.

    Typical use: ``Vocabulary.build(read_captions(root, "train"))``.
    """
    if split is not None:
        path = Path(path) / f"{split}_caps.txt"
    return [text for _, text in iter_captions(path)]


class CaptionSet(Sequence):
    """Token-id lists of many captions, stored flat (int32 ids + int64 offsets).

    Behaves like a read-only ``list[list[int]]``: ``captions[j]`` is the id list of
    caption ``j``; ``len(captions)`` the number of captions.

    Args:
        tokens: (total_tokens,) integer array, all captions concatenated.
        offsets: (n + 1,) int64 array, caption ``j`` = ``tokens[offsets[j]:offsets[j+1]]``.
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        offsets = np.asarray(offsets, dtype=np.int64)
        if tokens.ndim != 1 or offsets.ndim != 1 or offsets.size < 1:
            raise ValueError("CaptionSet needs 1-D tokens and 1-D offsets with n + 1 entries")
        self.tokens = tokens
        self.offsets = offsets

    def __len__(self) -> int:
        return self.offsets.size - 1

    @overload
    def __getitem__(self, index: int) -> list[int]: ...

    @overload
    def __getitem__(self, index: slice) -> CaptionSet: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            stop = max(stop, start)
            offsets = self.offsets[start : stop + 1]
            return CaptionSet(self.tokens[offsets[0] : offsets[-1]], offsets - offsets[0])
        index = int(index)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"caption index out of range [0, {n})")
        return self.tokens[self.offsets[index] : self.offsets[index + 1]].tolist()

    @property
    def lengths(self) -> np.ndarray:
        """(n,) int64 number of tokens of each caption."""
        return np.diff(self.offsets)

    def tensor(self, index: int) -> Tensor:
        """Token ids of caption ``index`` as an int64 tensor (L,)."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"caption index {index} out of range [0, {len(self)})")
        ids = self.tokens[self.offsets[index] : self.offsets[index + 1]]
        return torch.from_numpy(ids.astype(np.int64))

    def padded(
        self, indices: Sequence[int] | np.ndarray | Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Captions padded with 0 (``<pad>``) to the longest among them.

        Args:
            indices: which captions (default: all).

        Returns:
            ``(ids (n, L) int64, lengths (n,) int64)`` with L = the longest selected caption.
        """
        if indices is None:
            indices = np.arange(len(self))
        elif isinstance(indices, Tensor):
            indices = indices.cpu().numpy()
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        starts = self.offsets[indices]
        lengths = self.offsets[indices + 1] - starts
        width = int(lengths.max()) if lengths.size else 0
        out = np.full((indices.size, width), PAD_ID, dtype=np.int64)
        for row, (start, length) in enumerate(zip(starts, lengths)):
            out[row, :length] = self.tokens[start : start + length]
        return torch.from_numpy(out), torch.from_numpy(lengths.astype(np.int64))


def encode_captions(
    path: str | os.PathLike, vocab: Vocabulary, limit: int | None = None
) -> CaptionSet:
    """Read and encode a caption file into a :class:`CaptionSet`.

    Args:
        path: the ``*_caps.txt`` file.
        vocab: the vocabulary (unknown words -> ``<unk>``).
        limit: read at most this many captions.

    Raises:
        FileNotFoundError: missing file.
        ValueError: a caption without any word (file and 1-based line in the message).
    """
    tokens = array("i")
    offsets = array("q", [0])
    count = 0
    for number, text in iter_captions(path):
        if limit is not None and count >= limit:
            break
        ids = vocab.encode(text)
        if not ids:
            raise ValueError(
                f"{path}:{number}: empty caption (no words after tokenization): {text!r}"
            )
        tokens.extend(ids)
        offsets.append(len(tokens))
        count += 1
    return CaptionSet(
        np.frombuffer(tokens, dtype=np.int32).copy(), np.frombuffer(offsets, dtype=np.int64).copy()
    )


def _count_caption_lines(path: Path) -> int:
    return sum(1 for _ in iter_captions(path))


# ---------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------


def open_image_features(path: str | os.PathLike) -> np.memmap:
    """Open a ``*_ims.npy`` file memory-mapped (read-only) and check it.

    Returns:
        (n_images, R, F) ``np.memmap`` of the file's own floating dtype (no copy).

    Raises:
        FileNotFoundError: missing file.
        ValueError: not a .npy array, not 3-D, not floating point, or empty.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image feature file not found: {path}")
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot memory-map as a .npy array ({err})") from None
    if not isinstance(images, np.ndarray):
        raise ValueError(f"{path}: expected a single .npy array, got {type(images).__name__}")
    if images.ndim != 3:
        raise ValueError(
            f"{path}: expected image features of shape (n_images, n_regions, feature_dim), "
            f"got an array of shape {tuple(images.shape)} ({images.ndim}-D)"
        )
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(
            f"{path}: expected floating-point features (float16/float32), got dtype {images.dtype}"
        )
    if 0 in images.shape:
        raise ValueError(f"{path}: empty feature array of shape {tuple(images.shape)}")
    return images


def _read_ids(path: Path, n_images: int, captions_per_image: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        ids = [line.strip() for line in f]
    while ids and not ids[-1]:
        ids.pop()
    if len(ids) == n_images:
        return ids
    if len(ids) == n_images * captions_per_image:
        return ids[::captions_per_image]
    raise ValueError(
        f"{path}: {len(ids)} ids, expected one per image ({n_images}) or one per caption "
        f"({n_images} x {captions_per_image} = {n_images * captions_per_image})"
    )


# ---------------------------------------------------------------------------------------
# dataset
# ---------------------------------------------------------------------------------------


class PrecompDataset(Dataset):
    """Image-caption pairs from a precomputed-feature folder; one item per caption.

    Args:
        root: the dataset folder.
        split: file prefix: ``"train"``, ``"dev"``, ``"test"``, ``"testall"`` (COCO 5K), ...
        vocab: vocabulary used to encode the captions.
        captions_per_image: consecutive captions per image (5 for Flickr30K / MSCOCO).
        max_images: keep only the first ``max_images`` images (and their captions).

    Item ``j`` is ``(regions (R, F) float32, ids (L,) int64 with L >= 1, image_index,
    caption_index)`` with ``image_index = j // captions_per_image`` and
    ``caption_index = j``, both local to this dataset (or fold).

    For evaluation: ``images`` is the (n_images, R, F) memory map (file dtype, not copied),
    ``captions`` a :class:`CaptionSet` (sequence of id lists), ``image_of_caption(j)``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        vocab: Vocabulary,
        captions_per_image: int = 5,
        max_images: int | None = None,
    ) -> None:
        if not callable(getattr(vocab, "encode", None)):
            raise TypeError(
                "vocab must be a fastalign Vocabulary or a tokenizer with encode(text) -> ids, "
                f"got {type(vocab).__name__}"
            )
        if isinstance(captions_per_image, bool) or not isinstance(captions_per_image, int):
            raise TypeError(f"captions_per_image must be an int, got {captions_per_image!r}")
        if captions_per_image < 1:
            raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
        if max_images is not None and (
            isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1
        ):
            raise ValueError(f"max_images must be None or an int >= 1, got {max_images!r}")
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {root}")
        ims_path = root / f"{split}_ims.npy"
        caps_path = root / f"{split}_caps.txt"
        ids_path = root / f"{split}_ids.txt"
        if not caps_path.is_file():
            raise FileNotFoundError(f"caption file not found: {caps_path}")
        full = open_image_features(ims_path)
        n_full = full.shape[0]
        n_lines = _count_caption_lines(caps_path)
        expected = n_full * captions_per_image
        if n_lines != expected:
            hint = ""
            if n_lines % n_full == 0 and n_lines > 0:
                hint = f" (the file looks like {n_lines // n_full} captions per image)"
            raise ValueError(
                f"{caps_path}: {n_lines} captions, but {ims_path.name} has {n_full} images x "
                f"{captions_per_image} captions per image = {expected}{hint}"
            )
        n_images = n_full if max_images is None else min(max_images, n_full)

        self.root = root
        self.split = split
        self.vocab = vocab
        self.captions_per_image = captions_per_image
        self.features_file = ims_path  # the split's {split}_ims.npy
        self._start = 0
        self._stop = n_images
        self._images = full[:n_images]
        self.captions = encode_captions(caps_path, vocab, limit=n_images * captions_per_image)
        self.image_ids = (
            _read_ids(ids_path, n_full, captions_per_image)[:n_images]
            if ids_path.is_file()
            else None
        )

    # -- shapes and access ---------------------------------------------------------------

    def check_feature_dim(self, feature_dim: int, user: str) -> None:
        """ValueError naming the feature file and both sizes when its region features are not
        ``feature_dim`` wide (what ``user``, e.g. "the model", expects)."""
        found = self._images.shape[-1]
        if found != feature_dim:
            raise ValueError(
                f"{self.features_file}: region features of size {found}, but {user} expects "
                f"{feature_dim} (model.feature_dim)"
            )

    @property
    def images(self) -> np.memmap:
        """(n_images, R, F) memory-mapped features in the file's dtype (read-only, no copy)."""
        return self._images

    @property
    def n_images(self) -> int:
        return self._stop - self._start

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    @property
    def n_regions(self) -> int:
        return int(self._images.shape[1])

    @property
    def feature_dim(self) -> int:
        return int(self._images.shape[2])

    def __len__(self) -> int:
        return len(self.captions)

    def image_of_caption(self, j: int | np.ndarray | Tensor) -> int | np.ndarray | Tensor:
        """Image index of caption ``j`` (int, array or tensor): ``j // captions_per_image``."""
        return j // self.captions_per_image

    def captions_of_image(self, i: int) -> range:
        """Caption indices of image ``i``."""
        c = self.captions_per_image
        return range(i * c, (i + 1) * c)

    def image_tensor(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Images ``[start, stop)`` as a float32 tensor (B, R, F) (a copy of that block only)."""
        block = self._images[start:stop]
        return torch.from_numpy(np.array(block, dtype=np.float32))

    def __getitem__(self, j: int) -> tuple[Tensor, Tensor, int, int]:
        j = int(j)
        n = len(self.captions)
        if j < 0:
            j += n
        if not 0 <= j < n:
            raise IndexError(f"caption index out of range [0, {n})")
        i = j // self.captions_per_image
        regions = torch.from_numpy(np.array(self._images[i], dtype=np.float32))
        return regions, self.captions.tensor(j), i, j

    def __repr__(self) -> str:
        return (
            f"PrecompDataset(root={str(self.root)!r}, split={self.split!r}, images="
            f"{self.n_images} (offset {self._start}), captions={self.n_captions}, "
            f"regions={self.n_regions}, dim={self.feature_dim}, dtype={self._images.dtype})"
        )

    # -- subsets (COCO 1K folds) ---------------------------------------------------------

    def subset_images(self, start: int, stop: int) -> PrecompDataset:
        """Dataset of images ``[start, stop)`` (local indices) and their captions.

        Shares the memory map (no copy); indices in the result start again at 0.
        """
        if not 0 <= start < stop <= self.n_images:
            raise ValueError(
                f"image range [{start}, {stop}) is not inside [0, {self.n_images}) of {self!r}"
            )
        c = self.captions_per_image
        sub = object.__new__(PrecompDataset)
        sub.__dict__.update(self.__dict__)
        sub._start = self._start + start
        sub._stop = self._start + stop
        sub._images = self._images[start:stop]
        sub.captions = self.captions[start * c : stop * c]
        sub.image_ids = None if self.image_ids is None else self.image_ids[start:stop]
        return sub

    def num_folds(self, fold_size: int = COCO_1K_FOLD_SIZE) -> int:
        """Number of complete folds of ``fold_size`` images."""
        return self.n_images // fold_size

    def fold_1k(self, k: int, fold_size: int = COCO_1K_FOLD_SIZE) -> PrecompDataset:
        """Fold ``k`` of the COCO 1K protocol: images ``[1000k, 1000k + 1000)``.

        On ``testall`` (5000 images) k = 0..4 gives the five 1K test folds.
        """
        n = self.num_folds(fold_size)
        if not 0 <= k < n:
            raise ValueError(
                f"fold {k} does not exist: {self.n_images} images make {n} complete folds of "
                f"{fold_size} (valid k: 0..{n - 1})"
            )
        return self.subset_images(k * fold_size, (k + 1) * fold_size)

    # -- pickling (worker processes): reopen the memory map instead of copying the data --

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_images"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        full = np.load(self.features_file, mmap_mode="r", allow_pickle=False)
        self._images = full[self._start : self._stop]


# ---------------------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------------------


class PairBatch(NamedTuple):
    """A padded batch of B image-caption pairs (output of :func:`collate_pairs`).

    Attributes:
        regions: (B, R, F) float32, padded with 0 past ``region_lengths``.
        region_lengths: (B,) int64, valid regions per image (all R for precomputed features).
        captions: (B, L) int64 token ids padded with 0 (``<pad>``), L = longest caption.
        caption_lengths: (B,) int64 real caption lengths (>= 1).
        image_index: (B,) int64 image index of each pair in its dataset.
        caption_index: (B,) int64 caption index of each pair in its dataset.
    """

    regions: Tensor
    region_lengths: Tensor
    captions: Tensor
    caption_lengths: Tensor
    image_index: Tensor
    caption_index: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PairBatch:
        """The same batch with every tensor moved to ``device``."""
        return PairBatch(*(t.to(device, non_blocking=non_blocking) for t in self))

    def describe(self) -> str:
        """The batch's captions and images, for messages."""
        images = sorted(set(self.image_index.tolist()))
        return f"the batch of captions {self.caption_index.tolist()} (images {images})"

    def source_rows(self) -> Tensor:
        """(B,) the row of each pair's image in its split's features file."""
        return self.image_index


def collate_pairs(batch: Sequence[tuple[Tensor, Tensor, int, int]]) -> PairBatch:
    """Stack dataset items ``(regions (R_b, F), ids (L_b,), image_index, caption_index)``.

    Regions are padded to the largest R_b and captions to the longest L_b with zeros.

    Returns:
        :class:`PairBatch`.
    """
    if len(batch) == 0:
        raise ValueError("collate_pairs: empty batch")
    regions_list, ids_list, image_index, caption_index = [], [], [], []
    for b, item in enumerate(batch):
        if not isinstance(item, (tuple, list)) or len(item) != 4:
            raise TypeError(
                f"collate_pairs: item {b} must be (regions, ids, image_index, caption_index), "
                f"got {type(item).__name__}"
            )
        regions, ids, i, j = item
        regions = torch.as_tensor(regions)
        ids = torch.as_tensor(ids)
        if regions.ndim != 2 or regions.shape[0] < 1:
            raise ValueError(
                f"collate_pairs: item {b} regions must be (R, F) with R >= 1, "
                f"got shape {tuple(regions.shape)}"
            )
        if ids.ndim != 1 or ids.numel() < 1:
            raise ValueError(
                f"collate_pairs: item {b} token ids must be 1-D with at least one token, "
                f"got shape {tuple(ids.shape)}"
            )
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"collate_pairs: item {b} token ids must be integers, got {ids.dtype}")
        regions_list.append(regions)
        ids_list.append(ids)
        image_index.append(int(i))
        caption_index.append(int(j))
    feature_dim = regions_list[0].shape[1]
    for b, regions in enumerate(regions_list):
        if regions.shape[1] != feature_dim:
            raise ValueError(
                f"collate_pairs: item {b} has feature dim {regions.shape[1]}, item 0 has "
                f"{feature_dim}"
            )
    size = len(batch)
    region_lengths = torch.tensor([r.shape[0] for r in regions_list], dtype=torch.int64)
    caption_lengths = torch.tensor([c.numel() for c in ids_list], dtype=torch.int64)
    max_regions = int(region_lengths.max())
    # Copy through numpy: one memcpy per item, no intra-op thread pool (torch.stack of large
    # CPU tensors can be much slower when a data loader and a model share few cores).
    regions_np = np.empty((size, max_regions, feature_dim), dtype=np.float32)
    for b, r in enumerate(regions_list):
        n = r.shape[0]
        regions_np[b, :n] = r.detach().to("cpu", torch.float32).numpy()
        if n < max_regions:
            regions_np[b, n:] = 0.0
    regions_out = torch.from_numpy(regions_np)
    captions_np = np.full((size, int(caption_lengths.max())), PAD_ID, dtype=np.int64)
    for b, ids in enumerate(ids_list):
        captions_np[b, : ids.numel()] = ids.detach().cpu().numpy()
    captions_out = torch.from_numpy(captions_np)
    return PairBatch(
        regions=regions_out,
        region_lengths=region_lengths,
        captions=captions_out,
        caption_lengths=caption_lengths,
        image_index=torch.tensor(image_index, dtype=torch.int64),
        caption_index=torch.tensor(caption_index, dtype=torch.int64),
    )


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + epoch) % (1 << 63)


class EpochSampler(Sampler[int]):
    """Indices ``0..n-1``, shuffled reproducibly per epoch.

    The order of epoch ``e`` is
    ``torch.randperm(n, generator=torch.Generator().manual_seed(mix(seed, e)))``: it depends
    only on ``(seed, e)``, not on what ran before. Each ``iter()`` uses the current epoch and
    then advances it by one, so a plain ``for epoch ...: for batch in loader`` loop gets
    epochs 0, 1, 2, ...; call :meth:`set_epoch` before iterating to pick the epoch (for
    example when resuming training).

    Args:
        n: dataset size.
        shuffle: shuffle (else the order is 0..n-1 every epoch).
        seed: base seed.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0) -> None:
        if n < 0:
            raise ValueError(f"EpochSampler: n must be >= 0, got {n}")
        self.n = int(n)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration produce the order of ``epoch``."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def order(self, epoch: int) -> list[int]:
        """The index order of ``epoch`` (does not change the current epoch)."""
        if not self.shuffle:
            return list(range(self.n))
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        return torch.randperm(self.n, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        self.epoch += 1
        return iter(order)

    def __len__(self) -> int:
        return self.n


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` of :class:`PairBatch` with a reproducible order.

    The sampler is an :class:`EpochSampler` (``loader.sampler``): for a given ``seed`` the
    order of epoch ``e`` is always the same. Epochs advance by one at each pass over the
    loader; to choose one explicitly (e.g. when resuming) call
    ``loader.sampler.set_epoch(epoch)`` before iterating.

    Args:
        dataset: a map-style dataset of ``(regions, ids, image_index, caption_index)`` items.
        batch_size: pairs per batch.
        shuffle: shuffle the pairs each epoch.
        seed: base seed of the order (and of worker seeds).
        num_workers: loader worker processes (0: load in the main process).
        drop_last: drop a last incomplete batch.
        pin_memory: pin batches (for faster host-to-GPU copies).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_pairs,
        drop_last=drop_last,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(_epoch_seed(seed, 1 << 20)),
        persistent_workers=False,
    )
