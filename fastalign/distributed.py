"""Matching losses on the global batch under ``torch.distributed`` (torchrun + DDP).

Every rank holds ``B`` image-caption pairs (the same ``B`` on every rank); the global batch
is the concatenation of the ranks' pairs in rank order, ``B_global = W * B``. The scores
follow open_clip's *local loss* layout: a rank never forms the (B_global, B_global) matrix,
only

* ``rows`` (B, B_global): its own images against every caption, and
* ``cols`` (B_global, B): every image against its own captions,

with the embeddings of the other ranks gathered *with* gradient (:func:`all_gather_with_grad`).
Each rank then computes the loss terms that belong to its own images (rows) and its own
captions (columns). Summed over the ranks these terms are exactly the loss of one process
on the global batch.

Gradient scaling. Let ``L = sum_r L_r`` be the single-process loss on the global batch and
``L_r`` the terms of rank ``r``. The backward of :func:`all_gather_with_grad` sums the
incoming gradient over the ranks before keeping its own slice, so on rank ``r`` the
gradient reaching its local embeddings is ``dL/d(emb_r)`` (all ranks' terms, not only
``L_r``), and the parameter gradient computed on rank ``r`` is the part of ``dL/dθ`` that
flows through its own embeddings. DDP then *averages* over the ``W`` ranks, which would
give ``dL/dθ / W``. :func:`global_batch_loss` therefore returns ``W * L_r``: after DDP's
averaging the gradient is exactly ``dL/dθ``. The loss value itself is recovered as the
*mean* over ranks of the returned values (``all_reduce(loss) / W``); each rank's value is
also an estimate of ``L`` (for InfoNCE it is open_clip's local loss, the mean of the
rank's own row and column cross-entropies).
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from fastalign.losses import hinge_terms, info_nce_terms
from fastalign.tokens import SimilarityFn, Tokens

__all__ = [
    "CollectiveTimeoutError",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "cleanup",
    "collective",
    "gather_tokens",
    "global_batch_loss",
    "global_batch_losses",
    "global_batch_scores",
    "is_distributed",
    "rank",
    "setup_from_env",
    "timeout_from_minutes",
    "world_size",
]

LOSSES = ("hinge", "infonce")

# The timeout the default group was initialised with here (for error messages).
_group_timeout: datetime.timedelta | None = None


# --------------------------------------------------------------------------- timeouts
class CollectiveTimeoutError(RuntimeError):
    """A collective (all_gather, all_reduce, barrier, ...) did not complete within the
    process group's timeout: another rank never joined it."""


def _is_timeout(exc: BaseException) -> bool:
    # gloo: "Timed out waiting 600000ms for recv operation to complete"; the TCP store of
    # the rendezvous: "... timed out after ..." / "Socket Timeout"; c10d: "timeout".
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


def _timeout_text() -> str:
    if _group_timeout is None:
        return "the process group's timeout"
    minutes = _group_timeout.total_seconds() / 60
    return f"{minutes:g} min" if minutes >= 1 else f"{_group_timeout.total_seconds():g} s"


@contextmanager
def collective(name: str) -> Iterator[None]:
    """Runs the collective(s) of the ``with`` block; a timeout surfaces as a
    :class:`CollectiveTimeoutError` that names ``name`` (say, ``"all_gather of the image
    embeddings"``) and points at the other ranks. Other errors pass unchanged.

    Without it a hung rank shows on the others as a bare transport error, or (NCCL) as the
    watchdog's abort of the process.
    """
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, CollectiveTimeoutError) or not _is_timeout(exc):
            raise
        # Before the group exists (its rendezvous) only torchrun's variables say who we are.
        who = (
            f"rank {rank()} of {world_size()}"
            if is_distributed()
            else f"rank {os.environ.get('RANK', '0')} of {os.environ.get('WORLD_SIZE', '1')}"
        )
        raise CollectiveTimeoutError(
            f"{who}: the {name} timed out after {_timeout_text()}: "
            "another rank did not join it (hung, crashed, or busy with something slower); "
            "check the other ranks' output. The limit is the dist_timeout_minutes setting."
        ) from exc


def timeout_from_minutes(minutes: float) -> datetime.timedelta:
    """The process-group timeout of a ``dist_timeout_minutes`` setting.

    Raises:
        ValueError: not a positive, finite number.
    """
    if (
        isinstance(minutes, bool)
        or not isinstance(minutes, (int, float))
        or not 0 < minutes < math.inf
    ):
        raise ValueError(
            f"dist_timeout_minutes must be a positive number of minutes, got {minutes!r}"
        )
    return datetime.timedelta(minutes=minutes)


# --------------------------------------------------------------------------- process group
def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (the default group if None); 0 without one."""
    return dist.get_rank(group) if is_distributed() else 0


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of processes in ``group`` (the default group if None); 1 without one."""
    return dist.get_world_size(group) if is_distributed() else 1


def setup_from_env(
    backend: str | None = None, timeout: datetime.timedelta | None = None
) -> torch.device:
    """Initialise the default process group from the variables torchrun sets.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
    (``init_method="env://"``). Without ``WORLD_SIZE`` in the environment (a plain
    ``python train.py``) nothing is initialised. A group that is already initialised is
    kept.

    Args:
        backend: ``"gloo"``, ``"nccl"`` or None: nccl when CUDA and nccl are available,
            else gloo.
        timeout: how long any collective (and the rendezvous) waits for the other ranks
            before failing with :class:`CollectiveTimeoutError`; passed to
            ``init_process_group`` (its default when None: 30 min for gloo).

    Returns:
        The device this process should use: ``cuda:LOCAL_RANK`` (made current) with the
        nccl backend, else the CPU.
    """
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of PyTorch")
    if backend is None:
        use_nccl = torch.cuda.is_available() and dist.is_nccl_available()
        backend = "nccl" if use_nccl else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if "WORLD_SIZE" not in os.environ or is_distributed():
        return device
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun or "
            f"set all of RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        )
    if timeout is not None and not timeout > datetime.timedelta(0):
        raise ValueError(f"timeout must be positive, got {timeout}")
    global _group_timeout
    kwargs = {} if timeout is None else {"timeout": timeout}
    _group_timeout = timeout  # the rendezvous waits as long
    with collective(f"rendezvous of the {os.environ['WORLD_SIZE']} ranks (init_process_group)"):
        dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    return device


def cleanup() -> None:
    """Destroy the default process group, if there is one, once every rank has got here: a
    rank that tore its connections down while another still finished a collective on them
    would make gloo abort that process."""
    if is_distributed():
        with collective("barrier before leaving the process group (cleanup)"):
            dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------- gathers
def _gather_shapes(x: Tensor, group: dist.ProcessGroup | None, name: str) -> Tensor:
    """(W, x.dim()) int64: the shape of ``x`` (the ``name``) on every rank (one small
    all_gather)."""
    shape = torch.tensor(x.shape, dtype=torch.int64, device=x.device)
    parts = [torch.empty_like(shape) for _ in range(world_size(group))]
    with collective(f"all_gather of the shapes of the {name}"):
        dist.all_gather(parts, shape, group=group)
    return torch.stack(parts).cpu()


def all_gather_no_grad(x: Tensor, group: dist.ProcessGroup | None, name: str) -> Tensor:
    """Concatenation along dim 0 of ``x`` (the ``name``; the same shape on every rank) from
    every rank in rank order, without gradient: (W * B, ...)."""
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size(group))]
    with collective(f"all_gather of the {name}"):
        dist.all_gather(parts, x, group=group)
    return torch.cat(parts)


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all_gather + cat. Backward: all_reduce (sum) of the gradient, own slice."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None, name: str) -> Tensor:
        ctx.group, ctx.name = group, name
        ctx.start = dist.get_rank(group) * x.shape[0]
        ctx.stop = ctx.start + x.shape[0]
        return all_gather_no_grad(x, group, name)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        # Every rank's loss terms may depend on every slice: sum the gradients of all
        # ranks (a copy: the incoming buffer may be shared), then keep this rank's slice.
        grad = grad.contiguous().clone()
        with collective(f"all_reduce of the gradient of the gathered {ctx.name} (backward)"):
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start : ctx.stop], None, None


def _check_tensor(name: str, x: object) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension (the batch), got a scalar")


def global_batch_normal(
    generator: torch.Generator, rows: int, shape: tuple[int, ...], device: torch.device | str
) -> Tensor:
    """This process's (rows, *shape) block of standard normal draws made for the whole
    global batch of ``world_size() * rows`` rows from ``generator`` (seeded alike on every
    process): the draws of a sample do not depend on the number of processes."""
    start = rank() * rows if world_size() > 1 else 0
    drawn = torch.randn((world_size() * rows, *shape), generator=generator, device=device)
    return drawn[start : start + rows]


def all_gather_with_grad(
    x: Tensor, group: dist.ProcessGroup | None = None, *, name: str = "tensor"
) -> Tensor:
    """Concatenate ``x`` (B, ...) of every rank along dim 0, differentiably.

    The backward all-reduces (sums) the incoming gradient over the ranks and returns this
    rank's slice, so a loss term on *any* rank that reads this rank's rows sends its
    gradient here. Every rank must pass the same shape (checked with one small extra
    collective; pad token dimensions with :func:`gather_tokens`).

    Args:
        x: (B, ...) tensor, the same shape on every rank.
        group: the process group (the default group if None).
        name: what ``x`` holds, for the error of a collective that times out.

    Returns:
        (W * B, ...) tensor, rank ``r``'s rows at ``[r * B, (r + 1) * B)``. Without a
        process group, or with a world size of 1, ``x`` itself.

    Raises:
        ValueError: the ranks passed different shapes (raised on every rank alike).
    """
    _check_tensor("x", x)
    if world_size(group) == 1:
        return x
    shapes = _gather_shapes(x, group, name)
    if (shapes != shapes[0]).any():
        raise ValueError(
            "all_gather_with_grad needs the same shape on every rank, got "
            + ", ".join(f"rank {r}: {tuple(s.tolist())}" for r, s in enumerate(shapes))
        )
    return _AllGatherWithGrad.apply(x, group, name)


def gather_tokens(
    tokens: Tokens, group: dist.ProcessGroup | None = None, *, name: str = "token embeddings"
) -> Tokens:
    """Gather token sequences whose padded length differs between ranks.

    The embeddings are padded with zeros along the token dimension to the largest ``T``
    over the ranks, then gathered with :func:`all_gather_with_grad`; the padding is a
    constant and never gets gradient. The lengths are gathered without gradient.

    Args:
        tokens: (B, T, D) embeddings and (B,) lengths; ``B`` and ``D`` equal on every rank,
            ``T`` free.
        group: the process group (the default group if None).
        name: what the tokens are, for the error of a collective that times out.

    Returns:
        (W * B, T_max, D) embeddings and (W * B,) int64 lengths, in rank order. Without a
        process group (or world size 1): ``tokens`` with int64 lengths.

    Raises:
        ValueError: the embeddings are not 3-D, the lengths have the wrong shape, or the
            ranks' ``B`` or ``D`` differ.
    """
    x, lengths = tokens
    _check_tensor("tokens.embs", x)
    if x.dim() != 3:
        raise ValueError(f"tokens.embs must be 3-D (B, T, D), got shape {tuple(x.shape)}")
    lengths = torch.as_tensor(lengths, device=x.device)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise TypeError(f"tokens.lengths must hold integers, got dtype {lengths.dtype}")
    if lengths.shape != (x.shape[0],):
        raise ValueError(
            f"tokens.lengths must have shape ({x.shape[0]},), got {tuple(lengths.shape)}"
        )
    lengths = lengths.to(torch.int64)
    if world_size(group) == 1:
        return Tokens(x, lengths)
    shapes = _gather_shapes(x, group, name)
    if (shapes[:, [0, 2]] != shapes[0, [0, 2]]).any():
        raise ValueError(
            "gather_tokens needs the same batch size B and feature size D on every rank, got "
            + ", ".join(f"rank {r}: {tuple(s.tolist())}" for r, s in enumerate(shapes))
        )
    t_max = int(shapes[:, 1].max())
    if x.shape[1] < t_max:
        x = F.pad(x, (0, 0, 0, t_max - x.shape[1]))
    gathered = _AllGatherWithGrad.apply(x, group, name)
    return Tokens(gathered, all_gather_no_grad(lengths, group, f"lengths of the {name}"))


# --------------------------------------------------------------------------- scores
def global_batch_scores(
    images: Tokens,
    captions: Tokens,
    similarity_fn: SimilarityFn,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor, int]:
    """Scores of the local pairs against the global batch (open_clip local-loss layout).

    Args:
        images: (B, R, D) region embeddings and (B,) lengths of this rank's images (pair
            k's image).
        captions: (B, L, D) word embeddings and (B,) lengths of this rank's captions.
        similarity_fn: ``fn(images, captions) -> (Ni, Nt)``, e.g. a model's ``similarity``.
        group: the process group (the default group if None).

    Returns:
        ``rows`` (B, B_global): this rank's images x all captions; ``cols`` (B_global, B):
        all images x this rank's captions; ``rank_offset``: index of this rank's first pair
        in the global batch, so local pair k's score is ``rows[k, rank_offset + k]`` and
        ``cols[rank_offset + k, k]``. Without a process group (or world size 1) ``rows``
        and ``cols`` are the same (B, B) tensor and ``rank_offset`` is 0.
    """
    _check_tensor("images.embs", images[0])
    _check_tensor("captions.embs", captions[0])
    if images[0].shape[0] != captions[0].shape[0]:
        raise ValueError(
            f"images and captions must hold the same number of pairs, got "
            f"{images[0].shape[0]} and {captions[0].shape[0]}"
        )
    images_all = gather_tokens(images, group, name="image embeddings")
    captions_all = gather_tokens(captions, group, name="caption embeddings")
    if world_size(group) == 1:
        scores = similarity_fn(images_all, captions_all)
        return scores, scores, 0
    n = images.embs.shape[0]
    offset = rank(group) * n
    # This rank's own embeddings (not their gathered copies) carry its gradient paths.
    rows = similarity_fn(Tokens(images.embs, images_all.lengths[offset : offset + n]), captions_all)
    cols = similarity_fn(
        images_all, Tokens(captions.embs, captions_all.lengths[offset : offset + n])
    )
    return rows, cols, offset


# --------------------------------------------------------------------------- loss
def global_batch_loss(*args: Any, **kwargs: Any) -> Tensor:
    """This rank's share ``W * L_r`` of a matching loss on the global batch, scaled for DDP:
    the first result of :func:`global_batch_losses`, which takes the same arguments."""
    return global_batch_losses(*args, **kwargs)[0]


def global_batch_losses(
    images: Tokens,
    captions: Tokens,
    image_index: Tensor | None,
    similarity_fn: SimilarityFn,
    loss: str = "hinge",
    margin: float = 0.2,
    max_violation: bool = True,
    temperature: float = 0.05,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """This rank's share of a matching loss on the global batch, scaled for DDP, and the
    loss of each of its pairs.

    With ``L`` the single-process loss on the concatenated global batch
    (:func:`fastalign.losses.hinge_triplet_loss` for ``"hinge"``, summed over the batch;
    :func:`fastalign.losses.info_nce_loss` for ``"infonce"``, a mean) and ``L_r`` the terms
    of this rank's images (rows) and captions (columns), the result is ``W * L_r``: DDP's
    averaging of the parameter gradients over ``W`` ranks then yields exactly ``dL/dθ``,
    and ``all_reduce(result) / W == L``. Without a process group it is ``L`` itself.

    Args:
        images: (B, R, D) region embeddings and (B,) lengths of this rank's images (one
            entry per pair).
        captions: (B, L, D) word embeddings and (B,) lengths of this rank's captions.
        image_index: (B,) integer id of each pair's image, or None (all distinct); pairs
            with the same id, on any rank, are positives and never negatives.
        similarity_fn: see :func:`global_batch_scores`.
        loss: ``"hinge"`` or ``"infonce"``.
        margin, max_violation: hinge options.
        temperature: InfoNCE temperature.
        group: the process group (the default group if None).

    Returns:
        ``W * L_r`` (scalar) and the (B,) detached losses of this rank's pairs: pair k's
        hinge terms of its image (row) and of its caption (column) summed, or for InfoNCE
        the mean of its two cross-entropies (per-sample losses, for methods that track
        them).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if loss == "infonce" and not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    rows, cols, offset = global_batch_scores(images, captions, similarity_fn, group)
    n, n_global = rows.shape
    device = rows.device
    local = torch.arange(n, device=device) + offset  # global index of each local pair
    if image_index is None:
        positives = local[:, None] == torch.arange(n_global, device=device)[None, :]
    else:
        image_index = torch.as_tensor(image_index, device=device)
        if image_index.shape != (n,):
            raise ValueError(f"image_index must have shape ({n},), got {tuple(image_index.shape)}")
        index_all = (
            image_index
            if n == n_global
            else all_gather_no_grad(image_index, group, "image indices")
        )
        # (B, B_global): same image, on any rank; plus the matched pair itself.
        positives = image_index[:, None] == index_all[None, :]
        positives[torch.arange(n, device=device), local] = True
    # Caption j (global offset + j) against image k: positive iff image k is caption j's
    # image, so cols.T (B, B_global) shares the mask of rows.
    cols_t = cols.T
    ar = torch.arange(n, device=device)
    if loss == "hinge":
        row_terms = hinge_terms(rows, rows[ar, local], positives, margin, max_violation)
        col_terms = hinge_terms(cols_t, cols_t[ar, local], positives, margin, max_violation)
        share = row_terms.sum() + col_terms.sum()
        pair_losses = row_terms.detach() + col_terms.detach()
    else:
        row_terms = info_nce_terms(rows, local, positives, temperature)
        col_terms = info_nce_terms(cols_t, local, positives, temperature)
        share = (row_terms.sum() + col_terms.sum()) / (2 * n_global)
        pair_losses = (row_terms.detach() + col_terms.detach()) / 2
    return share * world_size(group), pair_losses  # W: undoes DDP's 1 / W (module docstring)
