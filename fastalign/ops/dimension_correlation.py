"""Dimension-correlation regularizer (DIAS L_dim): reference, checks, dispatch, autograd.

Each column ("dimension vector") of the paired (N, D) features a and b is standardised over the
N rows, and C = A^T B / N is the cross-modal dimension-correlation matrix. The barlow loss pulls
C towards the identity, the softmax loss asks every diagonal entry to dominate its row and its
column. The fast backends compute the loss and its gradients in one call (the gradient is saved
and only scaled by the upstream gradient in the backward) and, in barlow mode with N below
D, use the two N x N Gram matrices instead of C: ||C||_F^2 = <A A^T, B B^T>_F / N^2.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastalign._backends import resolve_backend
from fastalign.ops._checks import check_finite, check_number, check_paired_rows
from fastalign.ops._library import define_loss_ops
from fastalign.ops._options import CORRELATION_MODES as MODES
from fastalign.ops._options import CORRELATION_PATH_AUTO as PATH_AUTO

# Barlow Twins' lambda (Zbontar et al., 2021): the off-diagonal sum has D (D - 1) terms against
# D on the diagonal, so a small weight keeps the two parts in balance for D in the hundreds
# to thousands.
DEFAULT_OFF_DIAGONAL_WEIGHT = 0.005


# --------------------------------------------------------------------------- reference
def _standardize(x: Tensor, eps: float) -> Tensor:
    """Every column to mean 0 and (biased variance + eps) 1 over the rows."""
    centered = x - x.mean(dim=0)
    return centered * torch.rsqrt(centered.pow(2).mean(dim=0) + eps)


def dimension_correlation_reference(a: Tensor, b: Tensor, eps: float = 1e-5) -> Tensor:
    """C = A^T B / N of the column-standardised a and b: (D, D), plain PyTorch."""
    return _standardize(a, eps).T @ _standardize(b, eps) / a.shape[0]


def dimension_correlation_loss_reference(
    a: Tensor,
    b: Tensor,
    mode: str = "barlow",
    off_diagonal_weight: float = DEFAULT_OFF_DIAGONAL_WEIGHT,
    tau: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Plain-PyTorch specification of :func:`dimension_correlation_loss` (forms C)."""
    c = dimension_correlation_reference(a, b, eps)
    if mode == "barlow":
        identity = torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
        on_diagonal = (1 - c.diagonal()).pow(2).sum()
        return on_diagonal + off_diagonal_weight * c.pow(2).masked_fill(identity, 0).sum()
    rows = torch.log_softmax(c / tau, dim=1).diagonal()
    cols = torch.log_softmax(c / tau, dim=0).diagonal()
    return -0.5 * (rows + cols).mean()


# --------------------------------------------------------------------------- checks
def _check_inputs(a, b, backend: str) -> None:
    check_paired_rows(a, b, ("a", "b"), backend, "to standardise their columns")
    check_finite("a", a, backend=backend)
    check_finite("b", b, backend=backend)


# --------------------------------------------------------------------------- custom ops
def _forward_fake(
    a: Tensor,
    b: Tensor,
    mode: int,
    off_diagonal_weight: float,
    tau: float,
    eps: float,
    need_grad: bool,
    path: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss (), dloss/da (N, D), dloss/db (N, D)); the gradients empty without need_grad."""
    grad_shape = a.shape if need_grad else (0,)
    return a.new_empty(()), a.new_empty(grad_shape), b.new_empty(grad_shape)


_OPS = define_loss_ops(
    "dimension_correlation_loss", "fastalign.kernels.triton.dimension_correlation", _forward_fake
)


# --------------------------------------------------------------------------- public API
def dimension_correlation(a: Tensor, b: Tensor, eps: float = 1e-5) -> Tensor:
    """The cross-modal dimension-correlation matrix C = A^T B / N.

    Args:
        a: (N, D) features of one modality, N >= 2; row n pairs with row n of ``b``.
        b: (N, D) features of the other modality, same dtype and device.
        eps: added to every column's biased variance before standardising (a constant
            column standardises to zeros instead of NaN).

    Returns:
        (D, D) C[k, l] = correlation of column k of a with column l of b over the N rows, in
        the inputs' dtype; differentiable (plain PyTorch: the loss below is the fused path).
    """
    check_number("eps", eps, 0.0, low_ok=False)
    _check_inputs(a, b, "reference")
    return dimension_correlation_reference(a, b, eps)


def dimension_correlation_loss(
    a: Tensor,
    b: Tensor,
    mode: str = "barlow",
    off_diagonal_weight: float = DEFAULT_OFF_DIAGONAL_WEIGHT,
    tau: float = 0.1,
    eps: float = 1e-5,
    backend: str = "auto",
) -> Tensor:
    """Dimension-correlation regularizer on paired features (DIAS L_dim).

    Columns of ``a`` and ``b`` are standardised over the N rows (mean 0, biased variance +
    ``eps``), and C = A^T B / N (see :func:`dimension_correlation`).

    Args:
        a: (N, D) features of one modality, N >= 2; row n pairs with row n of ``b``.
        b: (N, D) features of the other modality, same shape, dtype and device.
        mode: ``"barlow"``: sum_k (1 - C_kk)^2 + off_diagonal_weight * sum_{k != l} C_kl^2
            (each dimension aligned with its counterpart, the rest decorrelated);
            ``"softmax"``: -1/2 mean_k [log softmax_l(C_k. / tau)_k + log softmax_l(C_.k /
            tau)_k] (diagonal dominance along rows and columns, bounded for any C).
        off_diagonal_weight: lambda of the barlow mode (>= 0); the default 0.005 is Barlow
            Twins'.
        tau: temperature of the softmax mode (> 0).
        eps: added to every column's biased variance (> 0): a constant column gives zeros,
            never NaN.
        backend: ``"auto"`` (C++ on CPU tensors, Triton on CUDA tensors), ``"reference"``,
            ``"cpu"``, ``"triton"`` or ``"cuda"`` (the hand-written CUDA kernels of
            csrc/cuda, when fastalign._C was built with them; they always form C).

    Returns:
        A scalar in the inputs' dtype. The fast backends compute the gradients w.r.t. ``a``
        and ``b`` in the same call when either needs one, and the backward only scales them
        (no double backward).

    Raises:
        ValueError: when ``a`` or ``b`` holds a NaN or an infinity, naming the tensor and the
            index. CPU inputs are always checked; CUDA inputs only after
            ``fastalign.set_finite_checks(True)`` (or with FASTALIGN_CHECK_FINITE=1), as the
            check costs a device synchronisation. Unchecked, the ``"cuda"`` kernels give the
            reference's NaN loss and gradients.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_number("off_diagonal_weight", off_diagonal_weight, 0.0, low_ok=True)
    check_number("tau", tau, 0.0, low_ok=False)
    check_number("eps", eps, 0.0, low_ok=False)
    if not isinstance(a, Tensor):
        raise TypeError(f"a must be a torch.Tensor, got {type(a).__name__}")
    backend = resolve_backend(backend, a.device, "dimension_correlation_loss")
    _check_inputs(a, b, backend)
    if backend == "reference":
        return dimension_correlation_loss_reference(a, b, mode, off_diagonal_weight, tau, eps)
    need_grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    loss, _, _ = _OPS[backend]["dimension_correlation_loss_forward"](
        a.contiguous(),
        b.contiguous(),
        MODES.index(mode),
        float(off_diagonal_weight),
        float(tau),
        float(eps),
        need_grad,
        PATH_AUTO,
    )
    return loss
