"""Prototype operators (PICO prototypes, MASK knowledge): reference, checks, dispatch,
autograd.

- ``prototype_assign``: rows of x (N, D) to K prototypes by their (cosine) scores: softmax,
  one-hot of the arg-max, or a balanced Sinkhorn-Knopp assignment computed in the log domain.
- ``prototype_update``: exponential moving average of the assignment-weighted means.
- ``prototype_topk_mix``: MASK's out-of-vocabulary prototypes, a softmax-weighted sum of the
  values of each query's m most similar keys. The fast backends stream over the keys keeping a
  running top-m per query, so the N x K similarity matrix never exists.

The softmax assignment saves only its output for the backward (dL/dlogits = P (G - <G, P>) /
tau is rebuilt tile by tile); the top-m mixture saves the (N, m) indices and weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastalign._backends import resolve_backend
from fastalign.ops._checks import (
    check_backend_dtype,
    check_finite,
    check_floating_tensor,
    check_number,
)
from fastalign.ops._library import Gradient, define_ops
from fastalign.ops._options import ASSIGN_MODE_SOFTMAX as MODE_SOFTMAX
from fastalign.ops._options import ASSIGN_MODES as MODES


# --------------------------------------------------------------------------- reference
def _scores(x: Tensor, prototypes: Tensor, normalize: bool) -> Tensor:
    if normalize:
        x, prototypes = F.normalize(x, dim=1), F.normalize(prototypes, dim=1)
    return x @ prototypes.T


def sinkhorn_reference(logits: Tensor, iters: int) -> Tensor:
    """Sinkhorn-Knopp in the log domain on (N, K) logits: each iteration shifts every column
    so that it sums to N / K, then every row so that it sums to 1 (SwAV's Q, transposed).
    logsumexp subtracts each maximum first, so no exponential overflows at any temperature."""
    n, k = logits.shape
    log_q = logits
    for _ in range(iters):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) + math.log(n / k)
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
    return log_q.exp()


def prototype_assign_reference(
    x: Tensor,
    prototypes: Tensor,
    mode: str = "softmax",
    tau: float = 0.1,
    iters: int = 3,
    normalize: bool = True,
) -> Tensor:
    """Plain-PyTorch specification of :func:`prototype_assign`: (N, K)."""
    scores = _scores(x, prototypes, normalize)
    if mode == "softmax":
        return torch.softmax(scores / tau, dim=1)
    scores = scores.detach()
    if mode == "hard":  # torch.argmax returns the first maximal index
        return F.one_hot(scores.argmax(dim=1), prototypes.shape[0]).to(scores.dtype)
    return sinkhorn_reference(scores / tau, iters)


def prototype_update_reference(
    prototypes: Tensor,
    x: Tensor,
    assignments: Tensor,
    momentum: float = 0.9,
    normalize: bool = False,
) -> Tensor:
    """Plain-PyTorch specification of :func:`prototype_update`: (K, D), no gradient."""
    prototypes, x, assignments = prototypes.detach(), x.detach(), assignments.detach()
    mass = assignments.sum(dim=0)[:, None]
    moved = momentum * prototypes + (1 - momentum) * (assignments.T @ x) / mass
    if normalize:
        moved = F.normalize(moved, dim=1)
    return torch.where(mass > 0, moved, prototypes)


def prototype_topk_mix_reference(
    queries: Tensor, keys: Tensor, values: Tensor, m: int = 10, tau: float = 1.0
) -> Tensor:
    """Plain-PyTorch specification of :func:`prototype_topk_mix`: (N, Dv); forms N x K."""
    cosine = F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).T
    # A stable descending sort keeps equal cosines in index order: the lowest index wins ties.
    indices = torch.sort(cosine.detach(), dim=1, descending=True, stable=True).indices[:, :m]
    logits = (queries[:, None, :] * keys[indices]).sum(dim=-1) / tau
    weights = torch.softmax(logits, dim=1)
    return (weights[..., None] * values[indices]).sum(dim=1)


# --------------------------------------------------------------------------- checks
def _check_inputs(named: dict[str, Tensor], backend: str) -> None:
    """2-D floating tensors of one dtype and device, allowed by ``backend``, all finite."""
    for name, x in named.items():
        check_floating_tensor(name, x, 2, "(rows, D)")
    (first, x0), *rest = named.items()
    for name, x in rest:
        if x.dtype != x0.dtype:
            raise TypeError(f"{first} and {name} must share a dtype, got {x0.dtype} and {x.dtype}")
        if x.device != x0.device:
            raise ValueError(
                f"{first} and {name} must be on one device, got {x0.device} and {x.device}"
            )
    check_backend_dtype(x0.dtype, backend)
    for name, x in named.items():
        check_finite(name, x, backend=backend)


def _check_rows(name: str, x: Tensor, what: str) -> None:
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one {what} of D >= 1, got {tuple(x.shape)}")


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        expected = f"{low} <= {name} <= {high}" if high is not None else f"{name} >= {low}"
        raise ValueError(f"{name} = {value}, expected {expected}")


def _check_same_dim(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must share the feature "
            "dimension D"
        )


# --------------------------------------------------------------------------- custom ops
def _assign_forward_fake(
    x: Tensor, prototypes: Tensor, mode: int, tau: float, iters: int, normalize: bool
) -> Tensor:
    """(N, K) assignments."""
    return x.new_empty((x.shape[0], prototypes.shape[0]))


def _assign_backward_fake(
    grad: Tensor, assignments: Tensor, x: Tensor, prototypes: Tensor, tau: float, normalize: bool
) -> tuple[Tensor, Tensor]:
    """(grad_x (N, D), grad_prototypes (K, D)) of the softmax assignment."""
    return torch.empty_like(x), torch.empty_like(prototypes)


def _update_fake(
    prototypes: Tensor, x: Tensor, assignments: Tensor, momentum: float, normalize: bool
) -> Tensor:
    """(K, D) updated prototypes."""
    return torch.empty_like(prototypes)


def _topk_mix_forward_fake(
    queries: Tensor, keys: Tensor, values: Tensor, m: int, tau: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(out (N, Dv), indices (N, m) int64, weights (N, m)) of the m selected keys."""
    n = queries.shape[0]
    return (
        values.new_empty((n, values.shape[1])),
        queries.new_empty((n, m), dtype=torch.int64),
        queries.new_empty((n, m)),
    )


def _topk_mix_backward_fake(
    grad: Tensor,
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    indices: Tensor,
    weights: Tensor,
    tau: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_queries, grad_keys, grad_values) through the m selected keys."""
    return torch.empty_like(queries), torch.empty_like(keys), torch.empty_like(values)


def _assign_setup_context(ctx, inputs, output):
    x, prototypes, mode, tau, _, normalize = inputs
    if mode != MODE_SOFTMAX:  # hard and sinkhorn carry no gradient
        ctx.mark_non_differentiable(output)
    ctx.options = (tau, normalize)
    ctx.save_for_backward(x, prototypes, output)


def _make_assign_backward(backward_op):
    def backward(ctx, grad):
        x, prototypes, assignments = ctx.saved_tensors
        tau, normalize = ctx.options
        grad_x, grad_prototypes = backward_op(grad, assignments, x, prototypes, tau, normalize)
        return grad_x, grad_prototypes, None, None, None, None

    return backward


def _topk_mix_setup_context(ctx, inputs, output):
    queries, keys, values, _, tau = inputs
    _, indices, weights = output
    ctx.mark_non_differentiable(indices, weights)
    ctx.tau = tau
    ctx.save_for_backward(queries, keys, values, indices, weights)


def _make_topk_mix_backward(backward_op):
    def backward(ctx, grad, _grad_indices, _grad_weights):
        queries, keys, values, indices, weights = ctx.saved_tensors
        grads = backward_op(grad, queries, keys, values, indices, weights, ctx.tau)
        return *grads, None, None

    return backward


_TRITON_MODULE = "fastalign.kernels.triton.prototypes"
_ASSIGN_OPS = define_ops(
    "prototype_assign",
    _TRITON_MODULE,
    fakes={
        "prototype_assign_forward": _assign_forward_fake,
        "prototype_assign_backward": _assign_backward_fake,
    },
    gradients={
        "prototype_assign_forward": Gradient(
            _assign_setup_context, _make_assign_backward, "prototype_assign_backward"
        )
    },
)
_UPDATE_OPS = define_ops(
    "prototype_update", _TRITON_MODULE, fakes={"prototype_update": _update_fake}
)
_TOPK_MIX_OPS = define_ops(
    "prototype_topk_mix",
    _TRITON_MODULE,
    fakes={
        "prototype_topk_mix_forward": _topk_mix_forward_fake,
        "prototype_topk_mix_backward": _topk_mix_backward_fake,
    },
    gradients={
        "prototype_topk_mix_forward": Gradient(
            _topk_mix_setup_context, _make_topk_mix_backward, "prototype_topk_mix_backward"
        )
    },
)


# --------------------------------------------------------------------------- public API
def prototype_assign(
    x: Tensor,
    prototypes: Tensor,
    mode: str = "softmax",
    tau: float = 0.1,
    iters: int = 3,
    normalize: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Assignment of rows to prototypes (PICO prototypes; SwAV's codes with ``"sinkhorn"``).

    Args:
        x: (N, D) features, N >= 1.
        prototypes: (K, D) prototypes, K >= 1, same dtype and device.
        mode: scores s_nk = x_n . p_k (cosine when ``normalize``), then
            ``"softmax"``: softmax over k of s / tau, differentiable in x and prototypes;
            ``"hard"``: one-hot of the arg-max over k (the lowest index on ties);
            ``"sinkhorn"``: balanced assignment by Sinkhorn-Knopp on s / tau in the log domain:
            each of ``iters`` iterations shifts every column to sum to N / K, then every row to
            sum to 1. Rows sum to 1 exactly; columns to N / K up to the convergence left after
            ``iters`` iterations (the gap shrinks as iters grows; slowest at small tau).
            No exponential of an unshifted score is taken, so tau = 0.01 is safe in float32.
            ``"hard"`` and ``"sinkhorn"`` carry no gradient: the result never requires grad.
        tau: temperature (> 0) of softmax and sinkhorn.
        iters: Sinkhorn iterations (>= 1; SwAV uses 3).
        normalize: L2-normalise x and the prototypes first (cosine scores), as F.normalize.
        backend: ``"auto"`` (C++ on CPU tensors, Triton on CUDA tensors), ``"reference"``,
            ``"cpu"``, ``"triton"`` or ``"cuda"`` (the hand-written CUDA kernels of csrc/cuda,
            when fastalign._C was built with them).

    Returns:
        (N, K) assignments in the inputs' dtype, every row summing to 1.

    Raises:
        ValueError: K = 0, mismatched D, tau <= 0, iters < 1, an unknown mode; a NaN or an
            infinity in an input, naming the tensor and the index (CPU inputs are always
            checked, CUDA inputs only after ``fastalign.set_finite_checks(True)`` or with
            FASTALIGN_CHECK_FINITE=1: the check costs a device synchronisation). Unchecked,
            the ``"cuda"`` kernels give the reference's answer for a NaN wherever it sits (NaN
            rows; the first NaN as the hard arg-max, as torch.argmax). An infinity with
            ``normalize=False`` is the exception: their tensor-core products turn it into NaN
            where the reference keeps +-inf, so the hard arg-max may differ.
        TypeError: a wrong type or dtype.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_number("tau", tau, 0.0, low_ok=False)
    _check_int("iters", iters, 1)
    check_floating_tensor("x", x, 2, "(N, D)")
    backend = resolve_backend(backend, x.device, "prototype_assign")
    _check_inputs({"x": x, "prototypes": prototypes}, backend)
    _check_rows("x", x, "row")
    _check_rows("prototypes", prototypes, "prototype")
    _check_same_dim("x", x, "prototypes", prototypes)
    if mode != "softmax":
        x, prototypes = x.detach(), prototypes.detach()
    if backend == "reference":
        return prototype_assign_reference(x, prototypes, mode, tau, iters, normalize)
    forward = _ASSIGN_OPS[backend]["prototype_assign_forward"]
    return forward(
        x.contiguous(), prototypes.contiguous(), MODES.index(mode), float(tau), iters, normalize
    )


def prototype_update(
    prototypes: Tensor,
    x: Tensor,
    assignments: Tensor,
    momentum: float = 0.9,
    normalize: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Exponential moving average of the assignment-weighted means of x.

    new_k = momentum * p_k + (1 - momentum) * (sum_n a_nk x_n) / (sum_n a_nk).

    Args:
        prototypes: (K, D) current prototypes; left untouched.
        x: (N, D) features, same dtype and device.
        assignments: (N, K) non-negative weights (e.g. from :func:`prototype_assign`).
        momentum: in [0, 1]; 1 keeps the prototypes, 0 replaces them by the means.
        normalize: L2-normalise every updated prototype (for cosine assignment); off by
            default: the plain EMA.
        backend: as for :func:`prototype_assign`.

    Returns:
        A new (K, D) tensor, never requiring grad. A prototype whose assignments sum to 0
        keeps its value (and is not re-normalised).

    Raises:
        ValueError: as for :func:`prototype_assign` (non-finite inputs included); negative
            assignments (here on every device; the compiled op itself checks CPU tensors
            only, as on CUDA that costs a device synchronisation). Unchecked, the ``"cuda"``
            kernels give the reference's NaN for a NaN input, but an infinity in x becomes NaN
            in their tensor-core products where the reference keeps +-inf.
    """
    check_number("momentum", momentum, 0.0, low_ok=True)
    if momentum > 1:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    check_floating_tensor("prototypes", prototypes, 2, "(K, D)")
    backend = resolve_backend(backend, prototypes.device, "prototype_update")
    named = {"prototypes": prototypes, "x": x, "assignments": assignments}
    _check_inputs(named, backend)
    _check_rows("prototypes", prototypes, "prototype")
    _check_rows("x", x, "row")
    _check_same_dim("prototypes", prototypes, "x", x)
    if assignments.shape != (x.shape[0], prototypes.shape[0]):
        raise ValueError(
            f"assignments must be (N, K) = {(x.shape[0], prototypes.shape[0])}, got "
            f"{tuple(assignments.shape)}"
        )
    # the compiled CPU op checks the weights itself (naming the first negative one)
    if backend != "cpu" and not torch.compiler.is_compiling() and bool((assignments < 0).any()):
        raise ValueError("assignments must be non-negative")
    prototypes, x, assignments = prototypes.detach(), x.detach(), assignments.detach()
    if backend == "reference":
        return prototype_update_reference(prototypes, x, assignments, momentum, normalize)
    update = _UPDATE_OPS[backend]["prototype_update"]
    inputs = (t.contiguous() for t in (prototypes, x, assignments))
    return update(*inputs, float(momentum), normalize)


def prototype_topk_mix(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    m: int = 10,
    tau: float = 1.0,
    backend: str = "auto",
) -> Tensor:
    """MASK's prototype mixture for out-of-vocabulary words (eqs. 11-13).

    For every query: the m keys of highest cosine similarity (the lowest index first among
    equal similarities), a softmax over the raw dot products query . key of those m divided by
    tau, and the weighted sum of their values. Equal means equal as computed: the reference
    normalises, then multiplies; the fast backends multiply, then scale by the inverse norms.
    Keys that tie exactly in one (every key when D = 1, where all cosines are +-1) may differ
    by a rounding step in the other, so such ties can go to different keys across backends.

    Args:
        queries: (N, D), e.g. the word vectors of out-of-vocabulary words.
        keys: (K, D), e.g. the concept word vectors, same dtype and device.
        values: (K, Dv), e.g. the concept prototypes.
        m: how many keys each query mixes, 1 <= m <= K.
        tau: softmax temperature (> 0).
        backend: as for :func:`prototype_assign`. The fast backends stream over the keys
            with a running top-m per query: memory beyond the output is O(tile) plus the
            (N, m) indices and weights that the backward reads.

    Returns:
        (N, Dv) in the inputs' dtype, differentiable in queries, keys and values through the
        m selected keys (the selection itself carries no gradient).

    Raises:
        ValueError: as for :func:`prototype_assign` (non-finite inputs included). Unchecked,
            the ``"cuda"`` kernels rank a NaN cosine above every number, as the reference's
            sort: the same keys, and NaN outputs where the reference has them.
    """
    _check_int("m", m, 1)
    check_number("tau", tau, 0.0, low_ok=False)
    check_floating_tensor("queries", queries, 2, "(N, D)")
    backend = resolve_backend(backend, queries.device, "prototype_topk_mix")
    _check_inputs({"queries": queries, "keys": keys, "values": values}, backend)
    _check_rows("queries", queries, "query")
    _check_rows("keys", keys, "key")
    _check_same_dim("queries", queries, "keys", keys)
    if values.shape[0] != keys.shape[0]:
        raise ValueError(
            f"values must hold one row per key: keys {tuple(keys.shape)}, values "
            f"{tuple(values.shape)}"
        )
    _check_int("m", m, 1, keys.shape[0])
    if backend == "reference":
        return prototype_topk_mix_reference(queries, keys, values, m, tau)
    forward = _TOPK_MIX_OPS[backend]["prototype_topk_mix_forward"]
    out, _, _ = forward(queries.contiguous(), keys.contiguous(), values.contiguous(), m, float(tau))
    return out
