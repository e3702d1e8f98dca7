"""Evaluation of a trained method on a dataset: encode every image and caption, then score
them with the method's similarity in blocks and rank them in the same pass, without the
score matrix (the one path of ``fastalign eval`` and of the trainer's validation). Under
torchrun each process may encode and score a shard of the images only (``sharded``)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from fastalign.data import PrecompDataset
from fastalign.evaluation import PlanSizes, plan_blocks, similarity_matrix
from fastalign.methods import Method
from fastalign.progress import progress_iter
from fastalign.retrieval import evaluate_streaming, evaluate_streaming_folds, shard_range
from fastalign.tokens import Tokens

PROTOCOLS = ("f30k", "coco1k", "coco5k")
# The protocols defined on one image count (COCO's 5000 test images).
PROTOCOL_IMAGES = {"coco1k": 5000, "coco5k": 5000}
# The memory budget (MiB) of the evaluation's blocks: the streaming functions' default.
MEMORY_BUDGET_MB = 256


SIDES = ("images", "captions")


@torch.no_grad()
def encoded_batches(
    model: nn.Module,
    dataset: PrecompDataset,
    side: str,
    batch_size: int = 256,
    progress: bool = False,
    item_range: tuple[int, int] | None = None,
) -> Iterator[tuple[Tokens, int]]:
    """The model's embeddings of one side of ``dataset`` (``"images"`` or ``"captions"``),
    batch by batch in order: ``(tokens, input width)``, the float32 tokens as the encoder
    returns them (on the model's device) and the width of the batch's padded input (the
    regions, or the batch's longest caption), for telling per-token outputs from
    fixed-size ones.

    ``progress``: a progress bar of the batches (see :mod:`fastalign.progress`).
    ``item_range``: ``(start, stop)``, the images or captions encoded; None: all of them."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    # A training-free model may hold buffers only.
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    model.eval()
    count = dataset.n_images if side == "images" else len(dataset.captions)
    first, end = (0, count) if item_range is None else item_range
    starts = range(first, end, batch_size)
    for start in progress_iter(starts, f"encoding {side}", progress, unit="batch"):
        stop = min(start + batch_size, end)
        if side == "images":
            block = np.array(dataset.images[start:stop], dtype=np.float32)
            width = block.shape[1]
            lengths = torch.full((len(block),), width, dtype=torch.long, device=device)
            tokens = model.encode_images(torch.from_numpy(block).to(device), lengths)
        else:
            ids, lengths = dataset.captions.padded(range(start, stop))
            ids, lengths = torch.as_tensor(ids).to(device), torch.as_tensor(lengths).to(device)
            width = ids.shape[1]
            tokens = model.encode_captions(ids, lengths)
        yield Tokens(tokens.embs.float(), tokens.lengths), width


@torch.no_grad()
def encode_dataset(
    model: nn.Module,
    dataset: PrecompDataset,
    batch_size: int = 256,
    progress: bool = False,
    image_range: tuple[int, int] | None = None,
) -> tuple[Tokens, Tokens]:
    """Float32 embeddings of every image (n_images, R', D) and caption (n_captions, L', D)
    of ``dataset`` with their lengths, on the model's device, as the model's encoders
    return them (:func:`encoded_batches`): one embedding per input token (R' = R, L' = the
    longest caption) or a fixed number per sequence (one for global-embedding models).

    ``progress``: a progress bar of the batches (see :mod:`fastalign.progress`).
    ``image_range``: ``(start, stop)``, the images encoded (all the captions are): a shard
    of a sharded evaluation, (stop - start, R', D); an empty one is (0, R', D)."""
    n_images = dataset.n_images
    first, stop = (0, n_images) if image_range is None else image_range
    if not 0 <= first <= stop <= n_images:
        raise ValueError(
            f"image_range must be (start, stop) with 0 <= start <= stop <= {n_images} "
            f"(the images), got {image_range}"
        )
    if first == stop:  # an empty shard: the embeddings' shape from one image's
        part, _ = next(encoded_batches(model, dataset, "images", 1, item_range=(0, 1)))
        image_tokens = Tokens(part.embs[:0], part.lengths[:0].to(torch.int64))
    else:
        image_tokens = _stacked(
            encoded_batches(model, dataset, "images", batch_size, progress, (first, stop)),
            stop - first,
            dataset.n_regions,
        )
    caption_tokens = _stacked(
        encoded_batches(model, dataset, "captions", batch_size, progress),
        len(dataset.captions),
        int(max(dataset.captions.lengths)),
    )
    return image_tokens, caption_tokens


def _stacked(batches: Iterator[tuple[Tokens, int]], count: int, widest: int) -> Tokens:
    """:func:`encoded_batches`'s batches (``count`` sequences, inputs at most ``widest``
    tokens wide) in one zero-padded Tokens."""
    stack, start = _TokenStack(count, widest), 0
    for part, width in batches:
        stack.put(start, part, width)
        start += part.count
    return stack.tokens()


class _TokenStack:
    """Encoder outputs of consecutive blocks written into one zero-padded float32 Tensor,
    allocated at the first block: as wide as the longest input when the encoder returns
    one embedding per input token, else as wide as its fixed output."""

    def __init__(self, count: int, longest_input: int) -> None:
        self.count, self.longest_input = count, longest_input
        self.embs: Tensor | None = None
        self.lengths: Tensor | None = None

    def put(self, start: int, part: Tokens, block_input_width: int) -> None:
        if self.embs is None:
            per_token = part.embs.shape[1] == block_input_width
            width = self.longest_input if per_token else part.embs.shape[1]
            self.embs = part.embs.new_zeros(
                self.count, width, part.embs.shape[2], dtype=torch.float32
            )
            self.lengths = torch.empty(self.count, dtype=torch.int64, device=part.lengths.device)
        stop = start + part.count
        self.embs[start:stop, : part.embs.shape[1]] = part.embs
        self.lengths[start:stop] = part.lengths

    def tokens(self) -> Tokens:
        return Tokens(self.embs, self.lengths)


@torch.no_grad()
def score_matrix(
    method: Method, model: nn.Module, dataset: PrecompDataset, progress: bool = False
) -> Tensor:
    """The (n_images, n_captions) float32 scores of a trained method on ``dataset``, on the
    model's device: every image and caption encoded (:func:`encode_dataset`), then scored
    by the method's similarity in blocks (:func:`fastalign.evaluation.similarity_matrix`).
    Caption j belongs to image ``j // dataset.captions_per_image``.

    ``progress``: progress bars of the encoding and of the scoring in blocks (see
    :mod:`fastalign.progress`).
    """
    images, captions, similarity = _encoded(method, model, dataset, progress)
    return similarity_matrix(images, captions, similarity=similarity, progress=progress)


def _encoded(
    method: Method,
    model: nn.Module,
    dataset: PrecompDataset,
    progress: bool,
    image_range: tuple[int, int] | None = None,
) -> tuple[Tokens, Tokens, Callable[[Tokens, Tokens], Tensor]]:
    """(image tokens, caption tokens, the method's similarity of token blocks); the images
    of ``image_range`` only, when given (see :func:`encode_dataset`)."""
    dataset.check_feature_dim(method.config.model.feature_dim, "the checkpoint's model")
    images, captions = encode_dataset(model, dataset, progress=progress, image_range=image_range)

    def similarity(images: Tokens, captions: Tokens) -> Tensor:
        return method.similarity(model, images, captions)

    return images, captions, similarity


@torch.no_grad()
def evaluate_trained(
    method: Method,
    model: nn.Module,
    dataset: PrecompDataset,
    protocol: str = "f30k",
    progress: bool = False,
    sharded: bool = False,
) -> dict[str, float]:
    """Recall table (see :func:`fastalign.evaluate`) of a trained method on ``dataset``: the
    numbers of :func:`score_matrix`'s matrix, which is never formed.

    ``protocol``: ``"f30k"`` and ``"coco5k"`` rank the whole gallery; ``"coco1k"`` is the
    mean over 5 folds of 1000 images (as :func:`fastalign.evaluation.evaluate_folds`). Every
    protocol streams (:mod:`fastalign.retrieval`): the numbers of :func:`fastalign.evaluate`
    on the score matrix, which is never formed. ``progress``: progress bars of the encoding
    and of the scoring pass (see :mod:`fastalign.progress`).

    ``sharded``: under torch.distributed's default process group (torchrun), every process
    calls this alike, encodes its shard of the images (whole blocks of the pass,
    :func:`fastalign.retrieval.shard_range`) and all the captions, scores its blocks, and
    returns the whole table: one process's, the same blocks scored (when the image encoder
    gives an image the same embeddings in any batch, as on the CPU).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    expected = PROTOCOL_IMAGES.get(protocol)
    if expected is not None and dataset.n_images != expected:
        raise ValueError(
            f"protocol {protocol} is defined on the {expected} COCO test images, but split "
            f"{dataset.split!r} of {dataset.root} has {dataset.n_images}: use protocol f30k (the "
            f"whole matrix) or the COCO testall split"
        )
    per_image = dataset.captions_per_image
    # Chosen before encoding, so that the shards are whole blocks: the plan of the encoded
    # tokens, float32 on the model's device (used in place: no converted copy counts).
    sizes = PlanSizes(dataset.n_images, dataset.n_images * per_image, 0, 0, 4)
    block_images = plan_blocks(sizes, None, None, MEMORY_BUDGET_MB * 2**20, per_image)[0]
    image_range = shard_range(dataset.n_images, block_images) if sharded else None
    images, captions, similarity = _encoded(method, model, dataset, progress, image_range)
    options = dict(
        block_images=block_images,
        memory_budget_mb=MEMORY_BUDGET_MB,
        progress=progress,
        sharded=sharded,
    )
    if protocol == "coco1k":
        return evaluate_streaming_folds(
            images, captions, similarity, per_image, n_folds=5, **options
        ).mean
    return evaluate_streaming(images, captions, similarity, per_image, **options)
