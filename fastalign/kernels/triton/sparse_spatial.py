"""Triton kernels of the sparse spatial loss: loss and gradients in one call.

A row pass gives every row's norm. The discrepancy kernel normalises raw
tiles on the fly and tl.dots them into D (inter V U^T - U V^T, intra V V^T - U U^T) in
(BLOCK_M x BLOCK_M) tiles on and above the diagonal, storing each tile and its mirror. The
selection kernel owns blocks of whole rows of D: mean and biased std, threshold (or the k-th
largest key, found by bisection on the float bits), loss per row and, with a gradient,
Gamma = dL/dD in place. The gradient kernel forms Omega = Gamma +- Gamma^T tile by tile and
tl.dots it with the normalised rows; a last row pass applies the normalisation's backward.
Per-row partial losses are summed afterwards: no atomics, deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastalign.kernels.triton import _common
from fastalign.kernels.triton._common import load_tile, load_tile_t, max_nan, program_block
from fastalign.kernels.triton.dimension_correlation import _spec
from fastalign.ops import _options

# F.normalize's eps, as on every backend.
_NORM_EPS = 1e-12


@triton.jit
def _row_norm_kernel(x_ptr, norm_ptr, N, D, stride_x, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """||x_r|| (float32) for a block of rows."""
    rows, row_ok = program_block(0, BLOCK_R, N)
    offs_d = tl.arange(0, BLOCK_D)
    squares = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        x = load_tile(x_ptr, rows.to(tl.int64), row_ok, cols, cols < D, stride_x).to(tl.float32)
        squares += tl.sum(x * x, axis=1)
    tl.store(norm_ptr + rows, tl.sqrt(squares), mask=row_ok)


@triton.jit
def _normalized_tile(
    x_ptr, norm_ptr, rows, row_ok, cols, col_ok, stride_x, eps, TRANSPOSE: tl.constexpr
):
    """Rows of x divided by max(||x_r||, eps), in x's dtype; (cols, rows) when TRANSPOSE."""
    scale = 1.0 / tl.maximum(tl.load(norm_ptr + rows, mask=row_ok, other=1.0), eps)
    if TRANSPOSE:
        x = load_tile_t(x_ptr, rows.to(tl.int64), row_ok, cols, col_ok, stride_x)
        x = x.to(tl.float32) * scale[None, :]
    else:
        x = load_tile(x_ptr, rows.to(tl.int64), row_ok, cols, col_ok, stride_x)
        x = x.to(tl.float32) * scale[:, None]
    return x.to(x_ptr.dtype.element_ty)


@triton.jit
def _discrepancy_kernel(
    x_ptr,
    y_ptr,
    norm_x_ptr,
    norm_y_ptr,
    d_ptr,
    N,
    D,
    stride_x,
    stride_y,
    eps,
    KIND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Tile (I, J), J >= I, of D (float32) and its mirror: x = img (U), y = txt (V);
    inter D = V U^T - U V^T (antisymmetric), intra D = V V^T - U U^T (symmetric).
    Programs below the diagonal do nothing."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    if pid_j >= pid_i:
        ri = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
        rj = pid_j * BLOCK_M + tl.arange(0, BLOCK_M)
        i_ok = ri < N
        j_ok = rj < N
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            cols = k0 + offs_k
            k_ok = cols < D
            u_i = _normalized_tile(x_ptr, norm_x_ptr, ri, i_ok, cols, k_ok, stride_x, eps, False)
            v_i = _normalized_tile(y_ptr, norm_y_ptr, ri, i_ok, cols, k_ok, stride_y, eps, False)
            u_j = _normalized_tile(x_ptr, norm_x_ptr, rj, j_ok, cols, k_ok, stride_x, eps, True)
            v_j = _normalized_tile(y_ptr, norm_y_ptr, rj, j_ok, cols, k_ok, stride_y, eps, True)
            if KIND == _options.SPATIAL_KIND_INTER:
                acc = tl.dot(v_i, u_j, acc, input_precision=PRECISION)
                acc = tl.dot(-u_i, v_j, acc, input_precision=PRECISION)
            else:
                acc = tl.dot(v_i, v_j, acc, input_precision=PRECISION)
                acc = tl.dot(-u_i, u_j, acc, input_precision=PRECISION)
        ok = i_ok[:, None] & j_ok[None, :]
        tl.store(d_ptr + ri[:, None].to(tl.int64) * N + rj[None, :], acc, mask=ok)
        if pid_j > pid_i:
            mirror = -acc if KIND == _options.SPATIAL_KIND_INTER else acc
            tl.store(d_ptr + rj[None, :].to(tl.int64) * N + ri[:, None], mirror, mask=ok)


@triton.jit
def _off_diagonal(rows, row_ok, cols, N):
    """(rows x cols) mask of the entries inside D and off its diagonal."""
    return row_ok[:, None] & (cols < N)[None, :] & (cols[None, :] != rows[:, None])


@triton.jit
def _selection_key(base, cols, ok, LARGEST: tl.constexpr):
    """int32 keys that order like the selection (larger first when LARGEST); -1 off limits.
    A NaN comes first either way, as in the reference's descending torch.sort."""
    e = tl.abs(tl.load(base + cols[None, :], mask=ok, other=0.0))
    bits = e.to(tl.int32, bitcast=True)
    key = bits if LARGEST else 0x7FFFFFFF - bits
    return tl.where(ok, tl.where(e != e, 0x7FFFFFFF, key), -1)


@triton.jit
def _select_kernel(
    d_ptr,
    alpha_ptr,
    loss_ptr,
    grad_alpha_ptr,
    N,
    k,
    inv_tau,
    SELECT: tl.constexpr,
    LARGEST: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """For a block of whole rows of D (E = |D|, the diagonal left out): mean and biased std
    (a row of equal entries: that value and 0), the selection, sum_j w E^2 per row, dL/dalpha
    per row (soft) and, when NEED_GRAD, Gamma = sign(D) dL/dE in place (see the C++ kernel for
    the formulas)."""
    rows, row_ok = program_block(0, BLOCK_R, N)
    base = d_ptr + rows[:, None].to(tl.int64) * N
    offs_c = tl.arange(0, BLOCK_C)
    m = N - 1
    sign = 1.0 if LARGEST else -1.0
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    low = tl.full([BLOCK_R], float("inf"), dtype=tl.float32)
    high = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for c0 in range(0, N, BLOCK_C):
        cols = c0 + offs_c
        ok = _off_diagonal(rows, row_ok, cols, N)
        e = tl.abs(tl.load(base + cols[None, :], mask=ok, other=0.0))
        total += tl.sum(e, axis=1)
        # NaN-keeping, as torch.amin / amax: a row with a NaN is never "constant"
        low_here = -max_nan(tl.where(ok, -e, float("-inf")), 1)
        low = tl.minimum(low, low_here, propagate_nan=tl.PropagateNan.ALL)
        high_here = max_nan(tl.where(ok, e, float("-inf")), 1)
        high = tl.maximum(high, high_here, propagate_nan=tl.PropagateNan.ALL)
    constant = low == high
    mu = tl.where(constant, low, total / m)
    squares = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, N, BLOCK_C):
        cols = c0 + offs_c
        ok = _off_diagonal(rows, row_ok, cols, N)
        e = tl.abs(tl.load(base + cols[None, :], mask=ok, other=0.0))
        centered = tl.where(ok, e - mu[:, None], 0.0)
        squares += tl.sum(centered * centered, axis=1)
    sigma = tl.where(constant, 0.0, tl.sqrt(squares / m))
    alpha = tl.load(alpha_ptr + rows, mask=row_ok, other=0.0)
    threshold = mu + sign * alpha * sigma
    if SELECT == _options.SPATIAL_SELECT_TOPK:
        # The k-th key of the row, keys ordered as the selection (E >= 0, so its float bits
        # order like it): the largest prefix with at least k keys >= it, bit by bit.
        prefix = tl.zeros([BLOCK_R], dtype=tl.int32)
        for bit in range(0, 31):
            candidate = prefix | (1 << (30 - bit))
            count = tl.zeros([BLOCK_R], dtype=tl.int32)
            for c0 in range(0, N, BLOCK_C):
                cols = c0 + offs_c
                ok = _off_diagonal(rows, row_ok, cols, N)
                key = _selection_key(base, cols, ok, LARGEST)
                count += tl.sum((key >= candidate[:, None]).to(tl.int32), axis=1)
            prefix = tl.where(count >= k, candidate, prefix)
        above = tl.zeros([BLOCK_R], dtype=tl.int32)
        for c0 in range(0, N, BLOCK_C):
            cols = c0 + offs_c
            ok = _off_diagonal(rows, row_ok, cols, N)
            key = _selection_key(base, cols, ok, LARGEST)
            above += tl.sum((key > prefix[:, None]).to(tl.int32), axis=1)
        ties_wanted = k - above  # entries equal to the k-th taken, lowest columns first
        ties_seen = tl.zeros([BLOCK_R], dtype=tl.int32)
    loss = tl.zeros([BLOCK_R], dtype=tl.float32)
    curvature = tl.zeros([BLOCK_R], dtype=tl.float32)  # sum_j E^2 w (1 - w) / T
    for c0 in range(0, N, BLOCK_C):
        cols = c0 + offs_c
        ok = _off_diagonal(rows, row_ok, cols, N)
        dv = tl.load(base + cols[None, :], mask=ok, other=0.0)
        e = tl.abs(dv)
        if SELECT == _options.SPATIAL_SELECT_TOPK:
            key = _selection_key(base, cols, ok, LARGEST)
            tie = (key == prefix[:, None]).to(tl.int32)
            rank = ties_seen[:, None] + tl.cumsum(tie, axis=1)
            chosen = (key > prefix[:, None]) | ((tie != 0) & (rank <= ties_wanted[:, None]))
            w = tl.where(chosen, 1.0, 0.0)
            ties_seen += tl.sum(tie, axis=1)
        elif SELECT == _options.SPATIAL_SELECT_THRESHOLD:
            w = tl.where(sign * (e - threshold[:, None]) > 0.0, 1.0, 0.0)
        else:
            w = tl.sigmoid(sign * (e - threshold[:, None]) * inv_tau)
            curvature += tl.sum(tl.where(ok, e * e * w * (1.0 - w), 0.0), axis=1) * inv_tau
        w = tl.where(ok, w, 0.0)
        loss += tl.sum(w * e * e, axis=1)
        if NEED_GRAD and SELECT != _options.SPATIAL_SELECT_SOFT:  # G = 2 w E / N and sign(D) E = D
            tl.store(
                base + cols[None, :], 2.0 * w * dv / N, mask=row_ok[:, None] & (cols < N)[None, :]
            )
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    if SELECT == _options.SPATIAL_SELECT_SOFT:
        tl.store(grad_alpha_ptr + rows, -curvature * sigma / N, mask=row_ok)
        if NEED_GRAD:
            r = -sign * curvature / N  # dL/dthreshold
            through_sigma = tl.where(
                sigma > 0.0, r * sign * alpha / (m * tl.where(sigma > 0.0, sigma, 1.0)), 0.0
            )
            for c0 in range(0, N, BLOCK_C):
                cols = c0 + offs_c
                ok = _off_diagonal(rows, row_ok, cols, N)
                dv = tl.load(base + cols[None, :], mask=ok, other=0.0)
                e = tl.abs(dv)
                w = tl.sigmoid(sign * (e - threshold[:, None]) * inv_tau)
                g = (2.0 * w * e + sign * e * e * w * (1.0 - w) * inv_tau) / N
                g += r[:, None] / m + through_sigma[:, None] * (e - mu[:, None])
                g = tl.where(dv > 0.0, g, tl.where(dv < 0.0, -g, 0.0))
                g = tl.where(ok, g, 0.0)
                tl.store(base + cols[None, :], g, mask=row_ok[:, None] & (cols < N)[None, :])


@triton.jit
def _gradient_kernel(
    gamma_ptr,
    x_ptr,
    norm_ptr,
    out_ptr,
    N,
    D,
    stride_x,
    stride_out,
    eps,
    scale,
    MIRROR_SIGN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[n, d] = sum_m Omega[n, m] W[m, d] (float32), Omega = Gamma + MIRROR_SIGN Gamma^T
    built tile by tile, W the rows of x normalised. Omega enters tl.dot times `scale` (N: its
    entries are O(1/N), below float16's normal range for large N) and leaves divided by it."""
    rows, row_ok = program_block(0, BLOCK_N, N)
    cols, col_ok = program_block(1, BLOCK_D, D)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, N, BLOCK_M):
        ms = m0 + offs_m
        m_ok = ms < N
        gamma = load_tile(gamma_ptr, rows.to(tl.int64), row_ok, ms, m_ok, N)
        gamma_t = load_tile_t(gamma_ptr, ms.to(tl.int64), m_ok, rows, row_ok, N)
        omega = ((gamma + MIRROR_SIGN * gamma_t) * scale).to(x_ptr.dtype.element_ty)
        w = _normalized_tile(x_ptr, norm_ptr, ms, m_ok, cols, col_ok, stride_x, eps, False)
        acc = tl.dot(omega, w, acc, input_precision=PRECISION)
    out = out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :]
    tl.store(out, acc / scale, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _normalize_backward_kernel(
    x_ptr,
    norm_ptr,
    g_ptr,
    out_ptr,
    N,
    D,
    stride_x,
    stride_g,
    stride_out,
    eps,
    scale,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out = scale * (g - u (u . g)) / ||x|| per row, u = x / ||x||, g = dL/du / scale; a row
    of norm below eps: out = scale * g / eps (F.normalize's backward)."""
    rows, row_ok = program_block(0, BLOCK_R, N)
    norm = tl.load(norm_ptr + rows, mask=row_ok, other=1.0)
    inv_norm = 1.0 / tl.maximum(norm, eps)
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dot = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        x = load_tile(x_ptr, rows64, row_ok, cols, cols < D, stride_x)
        g = load_tile(g_ptr, rows64, row_ok, cols, cols < D, stride_g)
        dot += tl.sum(x.to(tl.float32) * g, axis=1)
    dot = tl.where(norm < eps, 0.0, dot * inv_norm)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        x = load_tile(x_ptr, rows64, row_ok, cols, cols < D, stride_x)
        g = load_tile(g_ptr, rows64, row_ok, cols, cols < D, stride_g)
        u = x.to(tl.float32) * inv_norm[:, None]
        grad = scale * inv_norm[:, None] * (g - u * dot[:, None])
        out = out_ptr + rows64[:, None] * stride_out + cols[None, :]
        ok = row_ok[:, None] & (cols < D)[None, :]
        tl.store(out, grad.to(out_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------- launchers
_ROW_BLOCK = 16  # rows per program of the row passes
_COLUMN_BLOCK = 128  # columns per step of the row passes
# Columns per step of the selection kernel: it keeps several (rows x columns) tiles live.
_SELECT_COLUMNS = 64
# Warps of the tl.dot kernels: on sm_90 a 64 x 64 accumulator with four operand tiles (two
# for the gradient) spills at 4 warps under the register cap.
_MATRIX_WARPS = 8


def _row_norms(x: Tensor) -> Tensor:
    n, d = x.shape
    norm = torch.empty(n, dtype=torch.float32, device=x.device)
    _common.launch(
        _row_norm_kernel,
        (triton.cdiv(n, _ROW_BLOCK),),
        (x, norm),
        (n, d, x.stride(0)),
        BLOCK_R=_ROW_BLOCK,
        BLOCK_D=_COLUMN_BLOCK,
    )
    return norm


def _launch_gradient(gamma, x, norm, mirror_sign: int) -> Tensor:
    n, d = x.shape
    return _common.launch_tiled(
        _gradient_kernel,
        n,
        d,
        x,
        (gamma, x, norm),
        (n, d, x.stride(0)),
        (_NORM_EPS, float(n)),
        tiles=("BLOCK_N", "BLOCK_D"),
        MIRROR_SIGN=mirror_sign,
        BLOCK_M=_common.reduction_block(x.dtype),
        num_warps=_MATRIX_WARPS,
    )


def _launch_normalize_backward(x, norm, grad_hat, sign: float) -> Tensor:
    n, d = x.shape
    out = torch.empty_like(x)
    _common.launch(
        _normalize_backward_kernel,
        (triton.cdiv(n, _ROW_BLOCK),),
        (x, norm, grad_hat, out),
        (n, d, x.stride(0), grad_hat.stride(0), out.stride(0)),
        (_NORM_EPS, float(sign)),
        BLOCK_R=_ROW_BLOCK,
        BLOCK_D=_COLUMN_BLOCK,
    )
    return out


def sparse_spatial_loss_forward(
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
    """Fused sparse spatial loss and, when ``need_grad``, its gradients.

    Args:
        img, txt: (N, D) float16/bfloat16/float32, one shape, dtype and device, N >= 2.
        alpha: (N,) per-row alpha (any strides).
        kind: 0 inter, 1 intra.  select: 0 threshold, 1 soft, 2 topk (k: 1 <= k <= N - 1).
        temperature: of the soft mode.  largest: False selects the smallest discrepancies.
        need_grad: also return dL/dimg, dL/dtxt, dL/dalpha for an upstream gradient of 1.

    Returns:
        (loss (), grad_img (N, D), grad_txt (N, D), grad_alpha (N,)) in the inputs' dtype; the
        gradients are ``torch.empty(0)`` without ``need_grad``.
    """
    n, d = img.shape
    if img.stride(1) != 1 or txt.stride(1) != 1:
        img, txt = img.contiguous(), txt.contiguous()
    device = img.device
    f32 = dict(dtype=torch.float32, device=device)
    norm_img, norm_txt = _row_norms(img), _row_norms(txt)
    discrepancy = torch.empty(n, n, **f32)  # D, then Gamma in place
    tile = _common.matrix_tile(img.dtype)
    _common.launch(
        _discrepancy_kernel,
        (triton.cdiv(n, tile), triton.cdiv(n, tile)),
        (img, txt, norm_img, norm_txt, discrepancy),
        (n, d, img.stride(0), txt.stride(0)),
        (_NORM_EPS,),
        KIND=kind,
        BLOCK_M=tile,
        BLOCK_K=_common.reduction_block(img.dtype),
        dot_dtype=img.dtype,
        num_warps=_MATRIX_WARPS,
    )
    row_loss = torch.empty(n, **f32)
    grad_alpha = torch.zeros(n, **f32)
    _common.launch(
        _select_kernel,
        (triton.cdiv(n, _ROW_BLOCK),),
        (discrepancy, alpha.to(torch.float32).contiguous(), row_loss, grad_alpha),
        (n, k),
        (1.0 / temperature,),
        SELECT=select,
        LARGEST=largest,
        NEED_GRAD=need_grad,
        BLOCK_R=_ROW_BLOCK,
        BLOCK_C=_SELECT_COLUMNS,
    )
    loss = (row_loss.double().sum() / n).to(img.dtype)
    if not need_grad:  # fresh empties: the outputs of a custom op must not alias
        return (loss, *(torch.empty(0, dtype=img.dtype, device=device) for _ in range(3)))
    # inter: dL/dU = -Omega V, dL/dV = Omega U (Omega antisymmetric); intra: dL/dU = -Omega U,
    # dL/dV = Omega V (Omega symmetric).
    mirror_sign = -1 if kind == _options.SPATIAL_KIND_INTER else 1
    sources = (
        (txt, norm_txt, img, norm_img)
        if kind == _options.SPATIAL_KIND_INTER
        else (img, norm_img, txt, norm_txt)
    )
    grad_u = _launch_gradient(discrepancy, sources[0], sources[1], mirror_sign)
    grad_v = _launch_gradient(discrepancy, sources[2], sources[3], mirror_sign)
    grad_img = _launch_normalize_backward(img, norm_img, grad_u, -1.0)
    grad_txt = _launch_normalize_backward(txt, norm_txt, grad_v, 1.0)
    return loss, grad_img, grad_txt, grad_alpha.to(img.dtype)


# --------------------------------------------------------------------------- AOT check
def aot_specs() -> list[dict]:
    """Kernels and the specialisations the launchers use, for the ahead-of-time compile check:
    the tl.dot kernels in float16 and bfloat16 (must show mma), the row passes once each."""
    specs = []
    for dtype, ty in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        tile, block = _common.matrix_tile(dtype), _common.reduction_block(dtype)
        dot = dict(PRECISION="tf32")
        for kind_name, kind in (
            ("inter", _options.SPATIAL_KIND_INTER),
            ("intra", _options.SPATIAL_KIND_INTRA),
        ):
            specs.append(
                _spec(
                    f"sparse_spatial_discrepancy_{kind_name}_{ty}",
                    _discrepancy_kernel,
                    ty,
                    dict(KIND=kind, BLOCK_M=tile, BLOCK_K=block, **dot),
                    _MATRIX_WARPS,
                    True,
                )
            )
        specs.append(
            _spec(
                f"sparse_spatial_grad_{ty}",
                _gradient_kernel,
                ty,
                dict(MIRROR_SIGN=-1, BLOCK_N=tile, BLOCK_M=block, BLOCK_D=tile, **dot),
                _MATRIX_WARPS,
                True,
            )
        )
    rows = dict(BLOCK_R=_ROW_BLOCK, BLOCK_D=_COLUMN_BLOCK)
    specs.append(_spec("sparse_spatial_norm_fp16", _row_norm_kernel, "fp16", rows, 4, False))
    specs.append(
        _spec(
            "sparse_spatial_norm_bwd_fp16",
            _normalize_backward_kernel,
            "fp16",
            rows,
            4,
            False,
            out_ty="fp16",
        )
    )
    for select_name, select in (
        ("threshold", _options.SPATIAL_SELECT_THRESHOLD),
        ("soft", _options.SPATIAL_SELECT_SOFT),
        ("topk", _options.SPATIAL_SELECT_TOPK),
    ):
        constexprs = dict(
            SELECT=select, LARGEST=True, NEED_GRAD=True, BLOCK_R=_ROW_BLOCK, BLOCK_C=_SELECT_COLUMNS
        )
        specs.append(
            _spec(
                f"sparse_spatial_select_{select_name}", _select_kernel, "fp32", constexprs, 4, False
            )
        )
    return specs
