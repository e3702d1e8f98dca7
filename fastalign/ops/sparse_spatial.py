"""Sparse spatial loss (DIAS L_inter / L_intra): reference, checks, dispatch, autograd.

For paired global embeddings img, txt (N, D), with cosine distances X_ij = 1 - cos(img_i, txt_j),
Y_ij = 1 - cos(img_i, img_j), Z_ij = 1 - cos(txt_i, txt_j), the discrepancy is E = |X - X^T|
(inter: d(v_i, t_j) should equal d(v_j, t_i)) or E = |Y - Z| (intra: image-image and text-text
structure should agree). Each row selects some of its off-diagonal entries (above mean + alpha *
std, softly so, or its k largest) and the loss is (1/N) sum_ij w_ij E_ij^2.

Both kinds are one signed matrix D with E = |D|: inter D = V U^T - U V^T, intra D = V V^T - U U^T
for the row-normalised U, V, so dL/dD = sign(D) * dL/dE and the gradients of U and V are two
GEMMs of an N x N coefficient matrix with V and U. The fast backends compute the loss and all
gradients in one call; the backward only scales them by the upstream gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastalign._backends import resolve_backend
from fastalign.ops._checks import check_finite, check_number, check_paired_rows
from fastalign.ops._library import define_loss_ops
from fastalign.ops._options import SPATIAL_KINDS as KINDS
from fastalign.ops._options import SPATIAL_SELECTS as SELECTS

# F.normalize's default: a row of norm below it is divided by it instead (zeros stay zeros).
NORM_EPS = 1e-12


# --------------------------------------------------------------------------- reference
def _row_statistics(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased std of every row of ``values`` (N, M).

    A row of equal values gets exactly that value and std 0: in floating point the mean of
    equal numbers can round away from them, and then a strict threshold would select some of
    them on one backend and none on another. The std's gradient is 0 there (torch.std's).
    """
    sigma, mu = torch.std_mean(values, dim=1, correction=0)
    low, high = values.amin(dim=1), values.amax(dim=1)
    constant = low == high
    return torch.where(constant, low, mu), sigma.masked_fill(constant, 0.0)


def _select_weights(
    e: Tensor,
    select: str,
    alpha: float | Tensor,
    k: int | None,
    temperature: float,
    largest: bool,
    exclude_diagonal: bool,
) -> Tensor:
    """The weights of :func:`sparse_select` (N, M), without its argument checks."""
    n, m = e.shape
    keep = ~torch.eye(n, m, dtype=torch.bool, device=e.device) if exclude_diagonal else None
    sign = 1.0 if largest else -1.0
    if select == "topk":
        # stable sort: ties go to the lower column; the diagonal (-inf) comes last, k <= M - 1
        key = sign * e if keep is None else (sign * e).masked_fill(~keep, -math.inf)
        chosen = key.sort(dim=1, descending=True, stable=True).indices[:, :k]
        return torch.zeros_like(e).scatter_(1, chosen, 1.0)
    values = e if keep is None else e.masked_select(keep).view(n, m - 1)
    mu, sigma = _row_statistics(values)
    margin = sign * (e - (mu + sign * alpha * sigma)[:, None])
    if select == "threshold":
        weights = (margin > 0).to(e.dtype)
    else:
        weights = torch.sigmoid(margin / temperature)
    return weights if keep is None else weights.masked_fill(~keep, 0.0)


def sparse_spatial_loss_reference(
    img: Tensor,
    txt: Tensor,
    kind: str = "inter",
    select: str = "threshold",
    alpha: float | Tensor = 1.0,
    k: int | None = None,
    temperature: float = 0.05,
    largest: bool = True,
) -> Tensor:
    """Plain-PyTorch specification of :func:`sparse_spatial_loss` (forms every N x N matrix)."""
    u = F.normalize(img, dim=1, eps=NORM_EPS)
    v = F.normalize(txt, dim=1, eps=NORM_EPS)
    if kind == "inter":
        x = 1 - u @ v.T
        e = (x - x.T).abs()
    else:
        e = ((1 - u @ u.T) - (1 - v @ v.T)).abs()
    w = _select_weights(e, select, alpha, k, temperature, largest, exclude_diagonal=True)
    return (w * e.square()).sum() / img.shape[0]


# --------------------------------------------------------------------------- checks


def _check_selection(
    select: str, alpha, k, temperature: float, largest: bool, entries: int, rows: int
) -> None:
    """``entries``: candidates per row (M, or M - 1 without the diagonal)."""
    if select not in SELECTS:
        raise ValueError(f"select must be one of {SELECTS}, got {select!r}")
    if not isinstance(largest, bool):
        raise TypeError(f"largest must be a bool, got {type(largest).__name__}")
    check_number("temperature", temperature, 0.0, low_ok=False)
    if select == "topk":
        if k is None:
            raise ValueError("select='topk' needs k (the number of entries kept per row)")
        if not isinstance(k, int) or isinstance(k, bool):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        if not 1 <= k <= entries:
            raise ValueError(f"k must be in [1, {entries}] (the candidates per row), got {k}")
    elif k is not None:
        raise ValueError(f"k is used only with select='topk', got k={k} with select={select!r}")
    if isinstance(alpha, Tensor):
        if not alpha.dtype.is_floating_point:
            raise TypeError(f"alpha must be a floating-point tensor, got {alpha.dtype}")
        if alpha.shape not in ((), (rows,)):
            raise ValueError(
                f"alpha must be a float, a 0-d tensor or a ({rows},) tensor (one per row), "
                f"got shape {tuple(alpha.shape)}"
            )
    else:
        check_number("alpha", alpha, -math.inf, low_ok=False)


def _check_inputs(img, txt, backend: str) -> None:
    check_paired_rows(img, txt, ("img", "txt"), backend, "(pairs)")
    check_finite("img", img, backend=backend)
    check_finite("txt", txt, backend=backend)


def _check_alpha_tensor(alpha, device: torch.device) -> None:
    """A tensor alpha is on the inputs' device and finite (a float one is checked already)."""
    if isinstance(alpha, Tensor):
        if alpha.device != device:
            raise ValueError(f"alpha must be on the inputs' device {device}, got {alpha.device}")
        check_finite("alpha", alpha)


# --------------------------------------------------------------------------- custom ops
def _forward_fake(
    img: Tensor,
    txt: Tensor,
    alpha: Tensor,
    kind: int,
    select: int,
    k: int,
    temperature: float,
    largest: bool,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss (), dloss/dimg (N, D), dloss/dtxt (N, D), dloss/dalpha (N,)); the gradients empty
    without need_grad."""
    shape = img.shape if need_grad else (0,)
    alpha_shape = alpha.shape if need_grad else (0,)
    return (
        img.new_empty(()),
        img.new_empty(shape),
        txt.new_empty(shape),
        alpha.new_empty(alpha_shape),
    )


_OPS = define_loss_ops(
    "sparse_spatial_loss", "fastalign.kernels.triton.sparse_spatial", _forward_fake
)


# --------------------------------------------------------------------------- public API
def sparse_select(
    E: Tensor,
    select: str = "threshold",
    alpha: float | Tensor = 1.0,
    k: int | None = None,
    temperature: float = 0.05,
    largest: bool = True,
    exclude_diagonal: bool = True,
) -> Tensor:
    """Per-row sparse selection weights of a score matrix (plain PyTorch).

    Each row i is judged against the mean mu_i and the biased (population) std sigma_i of its
    candidate entries (all M, or the M - 1 off the diagonal with ``exclude_diagonal``).

    Args:
        E: (N, M) finite floating-point scores; square when ``exclude_diagonal``.
        select: ``"threshold"``: w = 1 where E_ij > mu_i + alpha_i * sigma_i, else 0;
            ``"soft"``: w = sigmoid((E_ij - mu_i - alpha_i * sigma_i) / temperature);
            ``"topk"``: w = 1 on the k largest entries of the row (ties to the lower column).
        alpha: float, 0-d tensor or (N,) tensor (one per row); in soft mode a tensor that
            requires grad receives its gradient.
        k: entries kept per row in topk mode, 1 <= k <= candidates per row; only there.
        temperature: of the soft mode (> 0).
        largest: False selects the smallest entries instead: the rules above applied to -E
            (threshold: E_ij < mu_i - alpha_i * sigma_i).
        exclude_diagonal: the diagonal is no candidate, takes no part in mu and sigma, and
            gets weight 0.

    Returns:
        (N, M) weights in E's dtype. Threshold and topk weights are 0 or 1 and carry no
        gradient; soft weights are differentiable in E (mu and sigma included) and alpha. A
        row of equal candidates has sigma = 0 exactly and selects nothing in threshold mode.
    """
    if not isinstance(E, Tensor):
        raise TypeError(f"E must be a torch.Tensor, got {type(E).__name__}")
    if E.dim() != 2 or not E.dtype.is_floating_point:
        raise ValueError(f"E must be a 2-D floating-point tensor, got {E.dtype} {tuple(E.shape)}")
    n, m = E.shape
    if exclude_diagonal and n != m:
        raise ValueError(f"exclude_diagonal needs a square E, got shape {tuple(E.shape)}")
    entries = m - 1 if exclude_diagonal else m
    if entries < 1:
        raise ValueError(f"E needs at least one candidate per row, got shape {tuple(E.shape)}")
    _check_selection(select, alpha, k, temperature, largest, entries, n)
    _check_alpha_tensor(alpha, E.device)
    check_finite("E", E)
    return _select_weights(E, select, alpha, k, temperature, largest, exclude_diagonal)


def sparse_spatial_loss(
    img: Tensor,
    txt: Tensor,
    kind: str = "inter",
    select: str = "threshold",
    alpha: float | Tensor = 1.0,
    k: int | None = None,
    temperature: float = 0.05,
    largest: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Sparse spatial constraint on paired global embeddings (DIAS L_inter, L_intra).

    With u_i = img_i / max(||img_i||, 1e-12), v_i likewise (F.normalize's eps: a zero row
    gives cosines 0), X = 1 - U V^T, Y = 1 - U U^T, Z = 1 - V V^T:
    ``kind="inter"``: E = |X - X^T|; ``kind="intra"``: E = |Y - Z|. Row i selects among its
    N - 1 off-diagonal entries with weights w_i. as :func:`sparse_select` defines them, and
    the loss is (1/N) sum_ij w_ij E_ij^2.

    Args:
        img: (N, D) image embeddings, N >= 2; row n pairs with row n of ``txt``.
        txt: (N, D) text embeddings, same dtype and device.
        kind: ``"inter"`` or ``"intra"``.
        select: ``"threshold"`` (the DIAS rule, E_ij > mu_i + alpha sigma_i), ``"soft"`` or
            ``"topk"``; mu_i and sigma_i are the mean and biased std of row i's off-diagonal
            entries (N = 2: one entry, sigma = 0).
        alpha: float, 0-d tensor or (N,) tensor. In soft mode a tensor that requires grad
            receives its gradient; in the hard modes the selection carries no gradient.
        k: entries kept per row with ``select="topk"``, 1 <= k <= N - 1; only there.
        temperature: of the soft mode (> 0).
        largest: False selects the smallest discrepancies instead (see :func:`sparse_select`).
        backend: ``"auto"`` (C++ on CPU tensors, Triton on CUDA tensors), ``"reference"``,
            ``"cpu"``, ``"triton"`` or ``"cuda"`` (the hand-written CUDA kernels of csrc/cuda,
            when fastalign._C was built with them; float32 arithmetic for every input dtype).

    Returns:
        A scalar in the inputs' dtype. Gradients flow to img and txt through the selected
        entries and, in soft mode, also through the weights, mu_i and sigma_i (the exact
        derivative of the loss as defined; none through sigma_i where it is 0, as torch.std)
        and to alpha. The fast backends compute every gradient in the forward when one is
        needed and the backward only scales them (no double backward).

    Raises:
        ValueError: when img, txt or a tensor alpha holds a NaN or an infinity, naming the
            tensor and the index. CPU inputs are always checked; CUDA inputs only after
            ``fastalign.set_finite_checks(True)`` (or with FASTALIGN_CHECK_FINITE=1), as the
            check costs a device synchronisation. Unchecked, the ``"cuda"`` kernels give the
            reference's NaN loss and gradients.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(img, Tensor):
        raise TypeError(f"img must be a torch.Tensor, got {type(img).__name__}")
    backend = resolve_backend(backend, img.device, "sparse_spatial_loss")
    _check_inputs(img, txt, backend)
    n = img.shape[0]
    _check_selection(select, alpha, k, temperature, largest, n - 1, n)
    _check_alpha_tensor(alpha, img.device)
    if backend == "reference":
        return sparse_spatial_loss_reference(img, txt, kind, select, alpha, k, temperature, largest)
    if isinstance(alpha, Tensor):
        # Only the soft weights depend smoothly on alpha: elsewhere it takes no gradient.
        alpha = alpha if select == "soft" else alpha.detach()
        alpha_rows = alpha.to(img.dtype).expand(n)
    else:
        alpha_rows = torch.full((n,), float(alpha), dtype=img.dtype, device=img.device)
    need_grad = torch.is_grad_enabled() and (
        img.requires_grad or txt.requires_grad or alpha_rows.requires_grad
    )
    loss, _, _, _ = _OPS[backend]["sparse_spatial_loss_forward"](
        img.contiguous(),
        txt.contiguous(),
        alpha_rows,
        KINDS.index(kind),
        SELECTS.index(select),
        k or 0,
        float(temperature),
        largest,
        need_grad,
    )
    return loss
