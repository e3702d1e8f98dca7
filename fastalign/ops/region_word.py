"""Fused region-word similarity: reference, argument checks, dispatch, autograd.

S[i, t] = AGGREGATE over query tokens of (ALIGN over key tokens of s(r, w)), where for
``direction="t2i"`` the queries are caption t's words and the keys image i's regions,
for ``"i2t"`` the reverse, and ``"both"`` sums the two.  The fast backends never form the
(Ni, Nt, R, L) tensor: they stream tiles of region x word products and keep, when a
gradient is needed, only the aligned value and arg-max key of every query token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastalign._backends import resolve_backend
from fastalign.ops._checks import check_backend_dtype, check_finite, check_floating_tensor
from fastalign.ops._library import Gradient, define_ops
from fastalign.ops._options import (
    AGGREGATE_MAX,
    AGGREGATE_MEAN,
    AGGREGATE_SUM,
    AGGREGATES,
    ALIGN_MAX,
    ALIGNS,
    DIRECTION_I2T,
    DIRECTION_T2I,
    DIRECTIONS,
)

SCORE_ACTIVATIONS = (None, "leaky_relu")
LEAKY_SLOPE = 0.1


# --------------------------------------------------------------------------- reference
def _align_aggregate_reference(
    scores: Tensor,
    key_mask: Tensor,
    query_mask: Tensor,
    key_dim: int,
    align: str,
    aggregate: str,
    align_tau: float,
    aggregate_tau: float,
) -> Tensor:
    """One direction on the 4-D tensor: ALIGN over ``key_dim``, AGGREGATE over the last."""
    masked = scores.masked_fill(~key_mask, float("-inf"))
    if align == "max":  # .max(dim) sends the gradient to the first arg-max, like the kernels
        aligned = masked.max(dim=key_dim).values
    else:
        aligned = align_tau * torch.logsumexp(masked / align_tau, dim=key_dim)
    if aggregate in ("mean", "sum"):
        total = aligned.masked_fill(~query_mask, 0).sum(-1)
        return total / query_mask.sum(-1) if aggregate == "mean" else total
    aligned = aligned.masked_fill(~query_mask, float("-inf"))
    if aggregate == "max":
        return aligned.max(dim=-1).values
    return aggregate_tau * torch.logsumexp(aligned / aggregate_tau, dim=-1)


def region_word_similarity_reference(
    regions: Tensor,
    words: Tensor,
    region_lengths: Tensor | None = None,
    word_lengths: Tensor | None = None,
    direction: str = "t2i",
    align: str = "max",
    aggregate: str = "mean",
    align_tau: float = 0.1,
    aggregate_tau: float = 0.1,
    score_activation: str | None = None,
) -> Tensor:
    """Plain-PyTorch specification of :func:`region_word_similarity` (forms the 4-D tensor)."""
    n_images, n_regions, _ = regions.shape
    n_captions, n_words, _ = words.shape
    if region_lengths is None:
        region_lengths = torch.full((n_images,), n_regions, device=regions.device)
    if word_lengths is None:
        word_lengths = torch.full((n_captions,), n_words, device=words.device)
    region_mask = torch.arange(n_regions, device=regions.device) < region_lengths[:, None]
    word_mask = torch.arange(n_words, device=words.device) < word_lengths[:, None]
    # Padded tokens are zeroed first (not multiplied by 0): whatever they hold, NaN included,
    # reaches neither the scores nor the gradients, as in the kernels that never read them.
    regions = regions.masked_fill(~region_mask[:, :, None], 0)
    words = words.masked_fill(~word_mask[:, :, None], 0)
    scores = torch.einsum("ird,twd->itrw", regions, words)  # (Ni, Nt, R, L)
    if score_activation == "leaky_relu":
        scores = F.leaky_relu(scores, LEAKY_SLOPE)
    options = (align, aggregate, align_tau, aggregate_tau)
    total = 0
    if direction in ("t2i", "both"):
        total = total + _align_aggregate_reference(
            scores, region_mask[:, None, :, None], word_mask[None, :, :], 2, *options
        )
    if direction in ("i2t", "both"):
        total = total + _align_aggregate_reference(
            scores.transpose(2, 3),
            word_mask[None, :, :, None],
            region_mask[:, None, :],
            2,
            *options,
        )
    return total


# --------------------------------------------------------------------------- checks


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_tau(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{name} must be a positive finite number, got {value}")


def check_lengths(name: str, lengths, count: int, padded: int, device) -> Tensor:
    """``lengths`` (None, a sequence, a numpy array or an integer tensor on ``device``) as an
    int64 (count,) tensor with every value in 1..padded; clear errors otherwise."""
    if lengths is None:
        return torch.full((count,), padded, dtype=torch.int64, device=device)
    if not isinstance(lengths, Tensor):
        try:
            lengths = torch.as_tensor(lengths, device=device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(
                f"{name} must be a tensor, numpy array, sequence or None, got "
                f"{type(lengths).__name__}"
            ) from exc
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {lengths.dtype}")
    if lengths.shape != (count,):
        raise ValueError(f"{name} must have shape ({count},), got {tuple(lengths.shape)}")
    if lengths.device != device:
        raise ValueError(f"{name} must be on {device}, got {lengths.device}")
    if not torch.compiler.is_compiling():
        bad = ((lengths < 1) | (lengths > padded)).nonzero()
        if len(bad):
            k = int(bad[0, 0])
            raise ValueError(
                f"{name}[{k}] = {int(lengths[k])}, expected 1 <= length <= {padded} "
                f"(the padded size)"
            )
    return lengths.to(torch.int64)


def _check_inputs(regions, words, backend: str) -> None:
    for name, x in (("regions", regions), ("words", words)):
        check_floating_tensor(name, x, 3, "(N, tokens, D)")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(
                f"{name} must have at least one item and one token, got {tuple(x.shape)}"
            )
    if regions.shape[2] != words.shape[2]:
        raise ValueError(
            f"regions and words must share the feature size D, got {regions.shape[2]} and "
            f"{words.shape[2]}"
        )
    if regions.dtype != words.dtype:
        raise TypeError(
            f"regions and words must share a dtype, got {regions.dtype} and {words.dtype}"
        )
    if regions.device != words.device:
        raise ValueError(
            f"regions and words must be on one device, got {regions.device} and {words.device}"
        )
    check_backend_dtype(regions.dtype, backend)


# --------------------------------------------------------------------------- custom ops
def _forward_fake(
    regions: Tensor,
    words: Tensor,
    region_lengths: Tensor,
    word_lengths: Tensor,
    direction: int,
    align: int,
    aggregate: int,
    align_tau: float,
    aggregate_tau: float,
    leaky: bool,
    need_indices: bool,
    need_values: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(scores (Ni, Nt), a_t2i, idx_t2i, a_i2t, idx_i2t): aligned values and arg-max key tokens
    of each direction, (Ni, Nt, tokens) where kept, else empty."""
    n_images, n_regions, _ = regions.shape
    n_captions, n_words, _ = words.shape
    acc = torch.float64 if regions.dtype == torch.float64 else torch.float32
    aux = []  # fresh tensors each: outputs must not alias one another
    for used, tokens in (
        (direction != DIRECTION_I2T, n_words),
        (direction != DIRECTION_T2I, n_regions),
    ):
        shape = (n_images, n_captions, tokens)
        aux.append(regions.new_empty(shape if need_values and used else (0,), dtype=acc))
        keep_idx = need_indices and used and align == ALIGN_MAX
        aux.append(regions.new_empty(shape if keep_idx else (0,), dtype=torch.int32))
    return (regions.new_empty((n_images, n_captions)), *aux)


def _backward_fake(
    coef_t2i: Tensor,
    aux_t2i: Tensor,
    coef_i2t: Tensor,
    aux_i2t: Tensor,
    regions: Tensor,
    words: Tensor,
    region_lengths: Tensor,
    word_lengths: Tensor,
    align: int,
    align_tau: float,
    leaky: bool,
) -> tuple[Tensor, Tensor]:
    """(grad_regions, grad_words) from dL/da of each direction and its arg-max or aligned values."""
    return torch.empty_like(regions), torch.empty_like(words)


def _query_coefficients(
    grad: Tensor, aligned: Tensor, query_mask: Tensor, aggregate: int, aggregate_tau: float
) -> Tensor:
    """dL/da (Ni, Nt, Q) for every query token from dL/dS (Ni, Nt).

    ``query_mask`` broadcasts to (Ni, Nt, Q); ``aligned`` is only read for aggregate max /
    lse. Values at padded tokens are never read by the kernels, so mean and sum return a
    broadcast view that costs no memory.
    """
    shape = torch.broadcast_shapes(grad.shape + (1,), query_mask.shape)
    if aggregate == AGGREGATE_MEAN:
        return (grad / query_mask.sum(-1))[..., None].expand(shape)
    if aggregate == AGGREGATE_SUM:
        return grad[..., None].expand(shape)
    # One (Ni, Nt, Q) tensor, worked in place: the backward's working memory is a few of them.
    weights = aligned.masked_fill(~query_mask, float("-inf"))
    if aggregate == AGGREGATE_MAX:  # the first arg-max query token takes it all, like .max(dim)
        first = weights.argmax(-1, keepdim=True)
        weights.zero_().scatter_(-1, first, 1.0)
    else:  # softmax over the valid tokens (every item has one: the row max is finite)
        weights.div_(aggregate_tau)
        weights.sub_(weights.amax(-1, keepdim=True)).exp_()
        weights.div_(weights.sum(-1, keepdim=True))
    return weights.mul_(grad[..., None])


def _setup_context(ctx, inputs, output):
    regions, words, region_lengths, word_lengths, direction, align, aggregate = inputs[:7]
    align_tau, aggregate_tau, leaky = inputs[7:10]
    _, a_t2i, idx_t2i, a_i2t, idx_i2t = output
    ctx.mark_non_differentiable(a_t2i, a_i2t)
    # The aligned values take no gradient: without this, autograd would hand the backward a
    # zero tensor of their (Ni, Nt, L) shape, working memory as large as what is saved.
    ctx.set_materialize_grads(False)
    ctx.options = (direction, align, aggregate, align_tau, aggregate_tau, leaky)
    ctx.save_for_backward(
        regions, words, region_lengths, word_lengths, a_t2i, idx_t2i, a_i2t, idx_i2t
    )


def _make_backward(backward_op):
    def backward(ctx, grad_scores, *_aux_grads):
        regions, words, region_lengths, word_lengths, a_t2i, idx_t2i, a_i2t, idx_i2t = (
            ctx.saved_tensors
        )
        direction, align, aggregate, align_tau, aggregate_tau, leaky = ctx.options
        if grad_scores is None:  # not materialised (see _setup_context): no gradient flows
            return None, None, *([None] * 10)
        grad = grad_scores.to(torch.float64 if regions.dtype == torch.float64 else torch.float32)
        region_mask = (
            torch.arange(regions.shape[1], device=regions.device) < region_lengths[:, None]
        )
        word_mask = torch.arange(words.shape[1], device=words.device) < word_lengths[:, None]
        coefs, auxes = [], []
        for used, aligned, idx, mask in (
            (direction != DIRECTION_I2T, a_t2i, idx_t2i, word_mask[None, :, :]),
            (direction != DIRECTION_T2I, a_i2t, idx_i2t, region_mask[:, None, :]),
        ):
            aux = idx if align == ALIGN_MAX else aligned
            if not used:
                coefs.append(grad.new_empty(0))
                auxes.append(aux)
                continue
            if aux.numel() == 0:
                raise RuntimeError(
                    "region_word_forward ran without keeping what its backward needs"
                )
            coef = _query_coefficients(grad, aligned, mask, aggregate, aggregate_tau)
            if align == ALIGN_MAX and leaky:  # sign of the aligned value = sign of the max score
                coef = torch.where(aligned > 0, coef, coef * LEAKY_SLOPE)
            coefs.append(coef)
            auxes.append(aux)
        grad_regions, grad_words = backward_op(
            coefs[0],
            auxes[0],
            coefs[1],
            auxes[1],
            regions,
            words,
            region_lengths,
            word_lengths,
            align,
            align_tau,
            leaky,
        )
        return grad_regions, grad_words, *([None] * 10)

    return backward


_OPS = define_ops(
    "region_word_similarity",
    "fastalign.kernels.triton.region_word",
    fakes={"region_word_forward": _forward_fake, "region_word_backward": _backward_fake},
    gradients={
        "region_word_forward": Gradient(_setup_context, _make_backward, "region_word_backward")
    },
)


# --------------------------------------------------------------------------- public API
def region_word_similarity(
    regions: Tensor,
    words: Tensor,
    region_lengths: Tensor | None = None,
    word_lengths: Tensor | None = None,
    direction: str = "t2i",
    align: str = "max",
    aggregate: str = "mean",
    align_tau: float = 0.1,
    aggregate_tau: float = 0.1,
    score_activation: str | None = None,
    backend: str = "auto",
) -> Tensor:
    """Fine-grained image-caption scores from region and word embeddings.

    Args:
        regions: (Ni, R, D) region embeddings; raw dot products are used, so L2-normalise
            first for cosine scores.
        words: (Nt, L, D) word embeddings, same dtype and device as ``regions``.
        region_lengths: (Ni,) integer counts of valid leading regions, 1 <= len <= R; None
            means all valid. Padded tokens never influence the result or get gradient.
        word_lengths: (Nt,) the same for words, 1 <= len <= L.
        direction: ``"t2i"`` (each word aligns over regions, aggregate over words),
            ``"i2t"`` (the reverse) or ``"both"`` (their sum, the LAPS score).
        align: ``"max"`` or ``"lse"`` (align_tau * log-sum-exp(x / align_tau)).
        aggregate: ``"mean"``, ``"sum"``, ``"max"`` or ``"lse"`` (with aggregate_tau).
        score_activation: None, or ``"leaky_relu"`` (slope 0.1) on every region-word score.
        backend: ``"auto"`` (C++ on CPU tensors, Triton on CUDA tensors), ``"reference"``,
            ``"cpu"``, ``"triton"`` or ``"cuda"`` (the hand-written CUDA kernels of csrc/cuda,
            when fastalign._C was built with them).

    Returns:
        (Ni, Nt) scores in the inputs' dtype. With ``align="max"`` gradients go to the first
        arg-max key token, like ``torch.max(dim)``.

    Raises:
        ValueError: when a valid token of ``regions`` or ``words`` holds a NaN or an infinity,
            naming the tensor and the index (padded tokens are not read). CPU inputs are always
            checked; CUDA inputs only after ``fastalign.set_finite_checks(True)`` (or with
            FASTALIGN_CHECK_FINITE=1), as the check costs a device synchronisation.
    """
    _check_choice("direction", direction, DIRECTIONS)
    _check_choice("align", align, ALIGNS)
    _check_choice("aggregate", aggregate, AGGREGATES)
    _check_choice("score_activation", score_activation, SCORE_ACTIVATIONS)
    _check_tau("align_tau", align_tau)
    _check_tau("aggregate_tau", aggregate_tau)
    if not isinstance(regions, Tensor):
        raise TypeError(f"regions must be a torch.Tensor, got {type(regions).__name__}")
    backend = resolve_backend(backend, regions.device, "region_word_similarity")
    _check_inputs(regions, words, backend)
    region_lengths = check_lengths(
        "region_lengths", region_lengths, regions.shape[0], regions.shape[1], regions.device
    )
    word_lengths = check_lengths(
        "word_lengths", word_lengths, words.shape[0], words.shape[1], words.device
    )
    check_finite("regions", regions, region_lengths, backend)
    check_finite("words", words, word_lengths, backend)
    if backend == "reference":
        return region_word_similarity_reference(
            regions,
            words,
            region_lengths,
            word_lengths,
            direction,
            align,
            aggregate,
            align_tau,
            aggregate_tau,
            score_activation,
        )
    leaky = score_activation == "leaky_relu"
    need_grad = torch.is_grad_enabled() and (regions.requires_grad or words.requires_grad)
    # What the backward reads: arg-max indices (align max), aligned values (align lse,
    # aggregate max / lse, or the sign for the leaky-ReLU slope).
    need_indices = need_grad and align == "max"
    need_values = need_grad and (align == "lse" or aggregate in ("max", "lse") or leaky)
    scores, *_ = _OPS[backend]["region_word_forward"](
        regions.contiguous(),
        words.contiguous(),
        region_lengths,
        word_lengths,
        DIRECTIONS.index(direction),
        ALIGNS.index(align),
        AGGREGATES.index(aggregate),
        float(align_tau),
        float(aggregate_tau),
        leaky,
        need_indices,
        need_values,
    )
    return scores
