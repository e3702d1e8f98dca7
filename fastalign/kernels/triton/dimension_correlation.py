"""Triton kernels of the dimension-correlation loss: loss and gradients in one call.

A column pass gives each column's mean, 1/std and C's diagonal; the matrix kernels load raw
tiles, standardise them on the fly and tl.dot them: C = A^T B / N in (D x D) tiles reducing
over N, or for barlow with N < D the symmetric Gram matrices A A^T, B B^T in (N x N) tiles on
and above the diagonal, reducing over D. The gradient kernels rebuild dL/dC tile by tile from
C (or use the Gram matrices), and a last column pass applies the standardisation's backward.
Partial losses are stored per program and summed afterwards: no atomics, deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastalign.kernels.triton import _common
from fastalign.kernels.triton._common import (
    LOG2E,
    load_tile,
    load_tile_t,
    lse_result,
    lse_start,
    lse_step,
    program_block,
)
from fastalign.ops import _options

# The Gram matrices enter tl.dot in the inputs' dtype, and their diagonal is about D: float16
# takes the path through C beyond this D.
_GRAM_MAX_D_FLOAT16 = 16384


@triton.jit
def _column_pair_rows(x_ptr, y_ptr, rows, N, cols, col_ok, stride_x, stride_y):
    """Rows ``rows`` (int64) of x and of y in the columns ``cols``, as float32 (0 outside), and
    the mask of the entries inside: what each step of the column passes reads."""
    x = load_tile(x_ptr, rows, rows < N, cols, col_ok, stride_x).to(tl.float32)
    y = load_tile(y_ptr, rows, rows < N, cols, col_ok, stride_y).to(tl.float32)
    return (rows < N)[:, None] & col_ok[None, :], x, y


@triton.jit
def _load_stats(stats_ptr, cols, col_ok, D):
    """(mean, rstd) of the columns ``cols`` from one side's (2, D) statistics, 0 past D."""
    mean = tl.load(stats_ptr + cols, mask=col_ok, other=0.0)
    rstd = tl.load(stats_ptr + D + cols, mask=col_ok, other=0.0)
    return mean, rstd


@triton.jit
def _column_stats_kernel(
    a_ptr,
    b_ptr,
    stats_a_ptr,
    stats_b_ptr,
    diag_ptr,
    N,
    D,
    stride_a,
    stride_b,
    eps,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per column of a and b: mean, 1/sqrt(biased var + eps) (rows 0 and 1 of the side's
    (2, D) statistics) and C_kk."""
    cols, col_ok = program_block(0, BLOCK_D, D)
    offs_n = tl.arange(0, BLOCK_N)
    sum_a = tl.zeros([BLOCK_D], dtype=tl.float32)
    sum_b = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = (n0 + offs_n).to(tl.int64)
        _, x, y = _column_pair_rows(a_ptr, b_ptr, rows, N, cols, col_ok, stride_a, stride_b)
        sum_a += tl.sum(x, axis=0)
        sum_b += tl.sum(y, axis=0)
    mean_a = sum_a / N
    mean_b = sum_b / N
    squares_a = tl.zeros([BLOCK_D], dtype=tl.float32)
    squares_b = tl.zeros([BLOCK_D], dtype=tl.float32)
    cross = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = (n0 + offs_n).to(tl.int64)
        ok, x, y = _column_pair_rows(a_ptr, b_ptr, rows, N, cols, col_ok, stride_a, stride_b)
        x = tl.where(ok, x - mean_a[None, :], 0.0)
        y = tl.where(ok, y - mean_b[None, :], 0.0)
        squares_a += tl.sum(x * x, axis=0)
        squares_b += tl.sum(y * y, axis=0)
        cross += tl.sum(x * y, axis=0)
    rstd_a = 1.0 / tl.sqrt(squares_a / N + eps)
    rstd_b = 1.0 / tl.sqrt(squares_b / N + eps)
    tl.store(stats_a_ptr + cols, mean_a, mask=col_ok)
    tl.store(stats_a_ptr + D + cols, rstd_a, mask=col_ok)
    tl.store(stats_b_ptr + cols, mean_b, mask=col_ok)
    tl.store(stats_b_ptr + D + cols, rstd_b, mask=col_ok)
    tl.store(diag_ptr + cols, cross * rstd_a * rstd_b / N, mask=col_ok)


@triton.jit
def _standardized_tile(
    x_ptr, rows, row_ok, cols, col_ok, stride, mean, rstd, TRANSPOSE: tl.constexpr
):
    """The (rows x cols) tile of x standardised per column, (x - mean) * rstd, 0 outside, in x's
    dtype for tl.dot; its transpose (cols x rows) when TRANSPOSE. mean and rstd hold the tile's
    columns, 0 past D: there the tile is 0 already, so only the rows are masked (a full mask
    costs the softmax gradient kernel registers it does not have on sm_90)."""
    if TRANSPOSE:
        x = load_tile_t(x_ptr, rows, row_ok, cols, col_ok, stride).to(tl.float32)
        x = tl.where(row_ok[None, :], (x - mean[:, None]) * rstd[:, None], 0.0)
    else:
        x = load_tile(x_ptr, rows, row_ok, cols, col_ok, stride).to(tl.float32)
        x = tl.where(row_ok[:, None], (x - mean[None, :]) * rstd[None, :], 0.0)
    return x.to(x_ptr.dtype.element_ty)


@triton.jit
def _correlation_kernel(
    a_ptr,
    b_ptr,
    stats_a_ptr,
    stats_b_ptr,
    c_ptr,
    loss_ptr,
    N,
    D,
    stride_a,
    stride_b,
    off_diagonal_weight,
    STORE_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One (BLOCK_K x BLOCK_L) tile of C = A^T B / N; stores it when STORE_C, and always its
    off-diagonal barlow partial lambda * sum C_kl^2."""
    pid_k = tl.program_id(0)
    pid_l = tl.program_id(1)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ls = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    k_ok = ks < D
    l_ok = ls < D
    mean_a, rstd_a = _load_stats(stats_a_ptr, ks, k_ok, D)
    mean_b, rstd_b = _load_stats(stats_b_ptr, ls, l_ok, D)
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_K, BLOCK_L], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = (n0 + offs_n).to(tl.int64)
        row_ok = rows < N
        a_t = _standardized_tile(a_ptr, rows, row_ok, ks, k_ok, stride_a, mean_a, rstd_a, True)
        b_tile = _standardized_tile(b_ptr, rows, row_ok, ls, l_ok, stride_b, mean_b, rstd_b, False)
        acc = tl.dot(a_t, b_tile, acc, input_precision=PRECISION)
    c = acc / N
    off = (ks[:, None] != ls[None, :]) & k_ok[:, None] & l_ok[None, :]
    partial = tl.sum(tl.sum(tl.where(off, c * c, 0.0), axis=1), axis=0)
    tl.store(loss_ptr + pid_k * tl.num_programs(1) + pid_l, off_diagonal_weight * partial)
    if STORE_C:
        out = c_ptr + ks[:, None].to(tl.int64) * D + ls[None, :]
        tl.store(out, c, mask=k_ok[:, None] & l_ok[None, :])


@triton.jit
def _logsumexp_kernel(
    c_ptr, lse_ptr, D, stride_r, stride_c, inv_tau, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    """lse[r] = log sum_c exp(C[r, c] / tau), rows r along stride_r (rows or columns of C)."""
    rs, r_ok = program_block(0, BLOCK_R, D)
    offs_c = tl.arange(0, BLOCK_C)
    scale = inv_tau * LOG2E  # base-2 exponentials
    best, total = lse_start(BLOCK_R)
    for c0 in range(0, D, BLOCK_C):
        cs = c0 + offs_c
        ok = r_ok[:, None] & (cs < D)[None, :]
        x = tl.load(
            c_ptr + rs[:, None].to(tl.int64) * stride_r + cs[None, :].to(tl.int64) * stride_c,
            mask=ok,
            other=float("-inf"),
        )
        x = tl.where(ok, x * scale, float("-inf"))
        best, total = lse_step(best, total, x, 1.0, r_ok, 1)  # a NaN in C makes its sum NaN
    lse = lse_result(best, total, 1.0, r_ok) / LOG2E
    tl.store(lse_ptr + rs, lse, mask=r_ok)


@triton.jit
def _correlation_grad_kernel(
    x_ptr,
    stats_ptr,
    c_ptr,
    diag_ptr,
    lse_i_ptr,
    lse_j_ptr,
    out_ptr,
    N,
    D,
    stride_x,
    stride_ci,
    stride_cj,
    stride_out,
    off_diagonal_weight,
    inv_tau,
    scale,
    MODE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[n, j] = scale * sum_i X_hat[n, i] G(i, j), G = dL/dC read through (stride_ci,
    stride_cj): G^T for dL/dA_hat = B_hat G^T / N, G for dL/dB_hat = A_hat G / N.

    barlow: G = 2 lambda C off the diagonal, -2 (1 - C_kk) on it (C_kk from diag_ptr);
    softmax: G = exp(C / tau - lse_i[i]) + exp(C / tau - lse_j[j]) - 2 I (scale holds the
    1 / (2 D tau)); both terms are symmetric in i and j, so one formula serves both sides.
    """
    rows, row_ok = program_block(0, BLOCK_N, N)
    rows64 = rows.to(tl.int64)
    js, j_ok = program_block(1, BLOCK_J, D)
    offs_i = tl.arange(0, BLOCK_I)
    exp_scale = inv_tau * LOG2E
    if MODE == _options.CORRELATION_MODE_SOFTMAX:
        lse_j = tl.load(lse_j_ptr + js, mask=j_ok, other=0.0) * LOG2E
    acc = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.float32)
    for i0 in range(0, D, BLOCK_I):
        cols = i0 + offs_i
        i_ok = cols < D
        mean, rstd = _load_stats(stats_ptr, cols, i_ok, D)
        x = _standardized_tile(x_ptr, rows64, row_ok, cols, i_ok, stride_x, mean, rstd, False)
        ok = i_ok[:, None] & j_ok[None, :]
        c = tl.load(
            c_ptr + cols[:, None].to(tl.int64) * stride_ci + js[None, :].to(tl.int64) * stride_cj,
            mask=ok,
            other=0.0,
        )
        on_diagonal = cols[:, None] == js[None, :]
        if MODE == _options.CORRELATION_MODE_BARLOW:
            diag = tl.load(diag_ptr + cols, mask=i_ok, other=0.0)
            g = tl.where(on_diagonal, -2.0 * (1.0 - diag[:, None]), 2.0 * off_diagonal_weight * c)
        else:
            lse_i = tl.load(lse_i_ptr + cols, mask=i_ok, other=0.0) * LOG2E
            s = c * exp_scale
            g = tl.exp2(s - lse_i[:, None]) + tl.exp2(s - lse_j[None, :])
            g = g - tl.where(on_diagonal, 2.0, 0.0)
        g = tl.where(ok, g, 0.0).to(x_ptr.dtype.element_ty)
        acc = tl.dot(x, g, acc, input_precision=PRECISION)
    out = out_ptr + rows64[:, None] * stride_out + js[None, :]
    tl.store(out, acc * scale, mask=row_ok[:, None] & j_ok[None, :])


@triton.jit
def _gram_kernel(
    a_ptr,
    b_ptr,
    stats_a_ptr,
    stats_b_ptr,
    gram_a_ptr,
    gram_b_ptr,
    loss_ptr,
    N,
    D,
    stride_a,
    stride_b,
    STORE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One (BLOCK_M x BLOCK_M) tile (r, s), r <= s, of the symmetric Ga = A_hat A_hat^T and
    Gb = B_hat B_hat^T: stores it and its mirror when STORE, and always the tile's part of
    <Ga, Gb>_F (twice off the diagonal). Programs below the diagonal do nothing."""
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    if pid_s >= pid_r:
        rs = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
        ss = pid_s * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = rs < N
        s_ok = ss < N
        rs64 = rs.to(tl.int64)
        ss64 = ss.to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        acc_a = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            d_ok = cols < D
            mean_a, rstd_a = _load_stats(stats_a_ptr, cols, d_ok, D)
            mean_b, rstd_b = _load_stats(stats_b_ptr, cols, d_ok, D)
            x = _standardized_tile(a_ptr, rs64, r_ok, cols, d_ok, stride_a, mean_a, rstd_a, False)
            x_t = _standardized_tile(a_ptr, ss64, s_ok, cols, d_ok, stride_a, mean_a, rstd_a, True)
            acc_a = tl.dot(x, x_t, acc_a, input_precision=PRECISION)
            y = _standardized_tile(b_ptr, rs64, r_ok, cols, d_ok, stride_b, mean_b, rstd_b, False)
            y_t = _standardized_tile(b_ptr, ss64, s_ok, cols, d_ok, stride_b, mean_b, rstd_b, True)
            acc_b = tl.dot(y, y_t, acc_b, input_precision=PRECISION)
        partial = tl.sum(tl.sum(acc_a * acc_b, axis=1), axis=0)  # padding rows are 0 in both
        partial = tl.where(pid_s == pid_r, partial, 2.0 * partial)
        tl.store(loss_ptr + pid_r * tl.num_programs(1) + pid_s, partial)
        if STORE:
            ok = r_ok[:, None] & s_ok[None, :]
            tl.store(gram_a_ptr + rs64[:, None] * N + ss[None, :], acc_a, mask=ok)
            tl.store(gram_b_ptr + rs64[:, None] * N + ss[None, :], acc_b, mask=ok)
            if pid_s > pid_r:
                tl.store(gram_a_ptr + ss64[None, :] * N + rs[:, None], acc_a, mask=ok)
                tl.store(gram_b_ptr + ss64[None, :] * N + rs[:, None], acc_b, mask=ok)


@triton.jit
def _gram_grad_kernel(
    x_ptr,
    y_ptr,
    stats_x_ptr,
    stats_y_ptr,
    gram_ptr,
    g_ptr,
    out_ptr,
    N,
    D,
    stride_x,
    stride_y,
    stride_out,
    coef,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[n, d] = coef * sum_m Gram_y[n, m] X_hat[m, d] + Y_hat[n, d] * g[d]: the barlow
    gradient w.r.t. X_hat without C (x = a, y = b for dL/dA_hat; the reverse for dL/dB_hat)."""
    rows, row_ok = program_block(0, BLOCK_N, N)
    rows64 = rows.to(tl.int64)
    cols, col_ok = program_block(1, BLOCK_D, D)
    mean_x, rstd_x = _load_stats(stats_x_ptr, cols, col_ok, D)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, N, BLOCK_M):
        ms = m0 + offs_m
        m_ok = ms < N
        gram = tl.load(
            gram_ptr + rows64[:, None] * N + ms[None, :],
            mask=row_ok[:, None] & m_ok[None, :],
            other=0.0,
        )
        x = _standardized_tile(
            x_ptr, ms.to(tl.int64), m_ok, cols, col_ok, stride_x, mean_x, rstd_x, False
        )
        acc = tl.dot(gram.to(x_ptr.dtype.element_ty), x, acc, input_precision=PRECISION)
    ok = row_ok[:, None] & col_ok[None, :]
    mean_y, rstd_y = _load_stats(stats_y_ptr, cols, col_ok, D)
    g = tl.load(g_ptr + cols, mask=col_ok, other=0.0)
    y = tl.load(y_ptr + rows64[:, None] * stride_y + cols[None, :], mask=ok, other=0.0)
    y = (y.to(tl.float32) - mean_y[None, :]) * rstd_y[None, :]
    out = out_ptr + rows64[:, None] * stride_out + cols[None, :]
    tl.store(out, acc * coef + y * g[None, :], mask=ok)


@triton.jit
def _standardize_backward_kernel(
    x_ptr,
    stats_ptr,
    g_ptr,
    out_ptr,
    N,
    D,
    stride_x,
    stride_g,
    stride_out,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) per column: the gradient through
    the standardisation, x_hat recomputed from x."""
    cols, col_ok = program_block(0, BLOCK_D, D)
    mean, rstd = _load_stats(stats_ptr, cols, col_ok, D)
    offs_n = tl.arange(0, BLOCK_N)
    sum_g = tl.zeros([BLOCK_D], dtype=tl.float32)
    sum_gx = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = (n0 + offs_n).to(tl.int64)
        ok, x, g = _column_pair_rows(x_ptr, g_ptr, rows, N, cols, col_ok, stride_x, stride_g)
        x_hat = (x - mean[None, :]) * rstd[None, :]
        sum_g += tl.sum(g, axis=0)
        sum_gx += tl.sum(tl.where(ok, g * x_hat, 0.0), axis=0)
    mean_g = sum_g / N
    mean_gx = sum_gx / N
    for n0 in range(0, N, BLOCK_N):
        rows = (n0 + offs_n).to(tl.int64)
        ok, x, g = _column_pair_rows(x_ptr, g_ptr, rows, N, cols, col_ok, stride_x, stride_g)
        x_hat = (x - mean[None, :]) * rstd[None, :]
        grad = rstd[None, :] * (g - mean_g[None, :] - x_hat * mean_gx[None, :])
        out = out_ptr + rows[:, None] * stride_out + cols[None, :]
        tl.store(out, grad.to(out_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------- launchers
_COLUMN_BLOCK = 64  # columns per program of the column passes
_ROW_BLOCK = 32  # rows per step of the column passes


def _use_gram(n: int, d: int, mode: int, path: int, dtype) -> bool:
    """Through C: N D^2 multiply-adds (+ 2 N D^2 for the gradients); through the symmetric
    Gram matrices (tiles on and above the diagonal): about N^2 D (+ 2 N^2 D). Gram when N < D.
    """
    if mode != _options.CORRELATION_MODE_BARLOW or path == _options.CORRELATION_PATH_CORRELATION:
        return False
    if path == _options.CORRELATION_PATH_GRAM:
        return True
    if dtype == torch.float16 and d > _GRAM_MAX_D_FLOAT16:
        return False
    return n < d


def _launch_correlation(a, b, stats, c, store_c: bool, off_diagonal_weight: float) -> Tensor:
    """C (when store_c) and the per-tile off-diagonal barlow partials."""
    n, d = a.shape
    tile = _common.matrix_tile(a.dtype)
    grid = (triton.cdiv(d, tile), triton.cdiv(d, tile))
    partials = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=a.device)
    _common.launch(
        _correlation_kernel,
        grid,
        (a, b, *stats, c, partials),
        (n, d, a.stride(0), b.stride(0)),
        (float(off_diagonal_weight),),
        STORE_C=store_c,
        BLOCK_N=_common.reduction_block(a.dtype),
        BLOCK_K=tile,
        BLOCK_L=tile,
        dot_dtype=a.dtype,
    )
    return partials


def _launch_logsumexp(c: Tensor, tau: float, along_rows: bool) -> Tensor:
    d = c.shape[0]
    lse = torch.empty(d, dtype=torch.float32, device=c.device)
    strides = (c.stride(0), c.stride(1)) if along_rows else (c.stride(1), c.stride(0))
    block_r, block_c = (16, 64) if along_rows else (64, 16)  # coalesced along C's rows
    _common.launch(
        _logsumexp_kernel,
        (triton.cdiv(d, block_r),),
        (c, lse),
        (d, *strides),
        (1.0 / tau,),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    return lse


def _launch_correlation_grad(x, stats_x, c, diag, lse_i, lse_j, transpose_c, o, scale):
    """dL/dX_hat (float32) through C: X_hat G^T / N when transpose_c (x = b), else X_hat G / N."""
    n, d = x.shape
    c_strides = (c.stride(1), c.stride(0)) if transpose_c else (c.stride(0), c.stride(1))
    return _common.launch_tiled(
        _correlation_grad_kernel,
        n,
        d,
        x,
        (x, stats_x, c, diag, lse_i, lse_j),
        (n, d, x.stride(0), *c_strides),
        (float(o["off_diagonal_weight"]), 1.0 / o["tau"], float(scale)),
        tiles=("BLOCK_N", "BLOCK_J"),
        MODE=o["mode"],
        BLOCK_I=_common.reduction_block(x.dtype),
    )


def _gram_block(dtype: torch.dtype) -> int:
    """Rows per Gram tile: two (rows x rows) fp32 accumulators spill beyond 32 at 4 warps."""
    return 32


def _launch_gram(a, b, stats, store: bool):
    n, d = a.shape
    block = _gram_block(a.dtype)
    grid = (triton.cdiv(n, block), triton.cdiv(n, block))
    shape = (n, n) if store else (0,)
    gram_a = torch.empty(shape, dtype=torch.float32, device=a.device)
    gram_b = torch.empty(shape, dtype=torch.float32, device=a.device)
    partials = torch.zeros(grid[0] * grid[1], dtype=torch.float32, device=a.device)
    _common.launch(
        _gram_kernel,
        grid,
        (a, b, *stats, gram_a, gram_b, partials),
        (n, d, a.stride(0), b.stride(0)),
        STORE=store,
        BLOCK_M=block,
        BLOCK_D=_common.reduction_block(a.dtype),
        dot_dtype=a.dtype,
    )
    return partials, gram_a, gram_b


_GRAM_GRAD_WARPS = 8  # a 64 x 64 accumulator, a Gram tile and the epilogue's loads


def _launch_gram_grad(x, y, stats_x, stats_y, gram_y, g, coef) -> Tensor:
    n, d = x.shape
    return _common.launch_tiled(
        _gram_grad_kernel,
        n,
        d,
        x,
        (x, y, stats_x, stats_y, gram_y, g),
        (n, d, x.stride(0), y.stride(0)),
        (float(coef),),
        tiles=("BLOCK_N", "BLOCK_D"),
        BLOCK_M=_common.reduction_block(x.dtype),
        num_warps=_GRAM_GRAD_WARPS,
    )


def _launch_standardize_backward(x, stats_x, grad_hat) -> Tensor:
    n, d = x.shape
    out = torch.empty_like(x)
    _common.launch(
        _standardize_backward_kernel,
        (triton.cdiv(d, _COLUMN_BLOCK),),
        (x, stats_x, grad_hat, out),
        (n, d, x.stride(0), grad_hat.stride(0), out.stride(0)),
        BLOCK_N=_ROW_BLOCK,
        BLOCK_D=_COLUMN_BLOCK,
    )
    return out


def dimension_correlation_loss_forward(
    a: Tensor,
    b: Tensor,
    mode: int,
    off_diagonal_weight: float,
    tau: float,
    eps: float,
    need_grad: bool,
    path: int = _options.CORRELATION_PATH_AUTO,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused dimension-correlation loss and, when ``need_grad``, its gradients.

    Args:
        a, b: (N, D) float16/bfloat16/float32, one shape, dtype and device, rows contiguous
            (unit column stride), N >= 2.
        mode: 0 barlow, 1 softmax.  off_diagonal_weight: barlow's lambda.  tau: softmax's
            temperature.  eps: added to every column's biased variance.
        need_grad: also return dL/da and dL/db for an upstream gradient of 1.
        path: 0 auto, 1 through C, 2 through the Gram matrices (barlow only).

    Returns:
        (loss () in the inputs' dtype, grad_a (N, D), grad_b (N, D)) in the inputs' dtype;
        the gradients are ``torch.empty(0)`` without ``need_grad``.
    """
    n, d = a.shape
    if a.stride(1) != 1 or b.stride(1) != 1:
        a, b = a.contiguous(), b.contiguous()
    device = a.device
    f32 = dict(dtype=torch.float32, device=device)
    # per side (a, b): the columns' mean and 1 / std, rows of one (2, D) block
    stats_a, stats_b = stats = torch.empty(2, 2, d, **f32)
    diag = torch.empty(d, **f32)
    _common.launch(
        _column_stats_kernel,
        (triton.cdiv(d, _COLUMN_BLOCK),),
        (a, b, stats_a, stats_b, diag),
        (n, d, a.stride(0), b.stride(0)),
        (float(eps),),
        BLOCK_N=_ROW_BLOCK,
        BLOCK_D=_COLUMN_BLOCK,
    )
    o = dict(mode=mode, off_diagonal_weight=off_diagonal_weight, tau=tau)
    empty = torch.empty(0, **f32)
    grad_a_hat = grad_b_hat = None
    if mode == _options.CORRELATION_MODE_SOFTMAX:
        c = torch.empty(d, d, **f32)
        _launch_correlation(a, b, stats, c, True, 0.0)
        lse_rows = _launch_logsumexp(c, tau, along_rows=True)
        lse_cols = _launch_logsumexp(c, tau, along_rows=False)
        log_softmax = 2 * c.diagonal().double() / tau - lse_rows.double() - lse_cols.double()
        loss = -log_softmax.sum() / (2 * d)
        if need_grad:
            scale = 1.0 / (2 * d * tau * n)
            grad_a_hat = _launch_correlation_grad(
                b, stats_b, c, diag, lse_cols, lse_rows, True, o, scale
            )
            grad_b_hat = _launch_correlation_grad(
                a, stats_a, c, diag, lse_rows, lse_cols, False, o, scale
            )
    elif _use_gram(n, d, mode, path, a.dtype):
        partials, gram_a, gram_b = _launch_gram(a, b, stats, need_grad)
        diag64 = diag.double()
        frobenius = partials.double().sum() / n**2
        on_diagonal = (1 - diag64).pow(2).sum()
        loss = on_diagonal + off_diagonal_weight * (frobenius - diag64.pow(2).sum())
        if need_grad:
            g = (-2 * (1 - diag) - 2 * off_diagonal_weight * diag) / n
            coef = 2 * off_diagonal_weight / n**2
            grad_a_hat = _launch_gram_grad(a, b, stats_a, stats_b, gram_b, g, coef)
            grad_b_hat = _launch_gram_grad(b, a, stats_b, stats_a, gram_a, g, coef)
    else:
        c = torch.empty((d, d) if need_grad else (0,), **f32)
        partials = _launch_correlation(a, b, stats, c, need_grad, off_diagonal_weight)
        loss = (1 - diag.double()).pow(2).sum() + partials.double().sum()
        if need_grad:
            grad_a_hat = _launch_correlation_grad(
                b, stats_b, c, diag, empty, empty, True, o, 1.0 / n
            )
            grad_b_hat = _launch_correlation_grad(
                a, stats_a, c, diag, empty, empty, False, o, 1.0 / n
            )
    if not need_grad:  # fresh empties: the outputs of a custom op must not alias
        no_grad = (torch.empty(0, dtype=a.dtype, device=device) for _ in range(2))
        return (loss.to(a.dtype), *no_grad)
    grad_a = _launch_standardize_backward(a, stats_a, grad_a_hat)
    grad_b = _launch_standardize_backward(b, stats_b, grad_b_hat)
    return loss.to(a.dtype), grad_a, grad_b


# --------------------------------------------------------------------------- AOT check
_FLOAT_ARGS = ("eps", "off_diagonal_weight", "inv_tau", "scale", "coef")
_INPUT_PTRS = ("a_ptr", "b_ptr", "x_ptr", "y_ptr")


def _spec(name, fn, ty, constexprs, num_warps, expect_mma, out_ty="fp32"):
    """The launchers' argument types: inputs in ``ty``, ``out_ptr`` in ``out_ty``, other tensors
    float32."""
    pointers = dict.fromkeys(_INPUT_PTRS, ty) | {"out_ptr": out_ty}
    return _common.aot_spec(name, fn, constexprs, num_warps, expect_mma, pointers, _FLOAT_ARGS)


def aot_specs() -> list[dict]:
    """Kernels and the specialisations the launchers use, for the ahead-of-time compile check:
    every tl.dot kernel in float16 and bfloat16 (must show mma), the column passes once."""
    specs = []
    for dtype, ty in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        tile, block, gram = (
            _common.matrix_tile(dtype),
            _common.reduction_block(dtype),
            _gram_block(dtype),
        )
        dot = dict(PRECISION="tf32")
        specs.append(
            _spec(
                f"dimension_correlation_c_{ty}",
                _correlation_kernel,
                ty,
                dict(STORE_C=True, BLOCK_N=block, BLOCK_K=tile, BLOCK_L=tile, **dot),
                4,
                True,
            )
        )
        for mode_name, mode in (
            ("barlow", _options.CORRELATION_MODE_BARLOW),
            ("softmax", _options.CORRELATION_MODE_SOFTMAX),
        ):
            specs.append(
                _spec(
                    f"dimension_correlation_grad_{mode_name}_{ty}",
                    _correlation_grad_kernel,
                    ty,
                    dict(MODE=mode, BLOCK_N=tile, BLOCK_I=block, BLOCK_J=tile, **dot),
                    4,
                    True,
                )
            )
        specs.append(
            _spec(
                f"dimension_correlation_gram_{ty}",
                _gram_kernel,
                ty,
                dict(STORE=True, BLOCK_M=gram, BLOCK_D=block, **dot),
                4,
                True,
            )
        )
        specs.append(
            _spec(
                f"dimension_correlation_gram_grad_{ty}",
                _gram_grad_kernel,
                ty,
                dict(BLOCK_N=tile, BLOCK_M=block, BLOCK_D=tile, **dot),
                _GRAM_GRAD_WARPS,
                True,
            )
        )
    columns = dict(BLOCK_N=_ROW_BLOCK, BLOCK_D=_COLUMN_BLOCK)
    specs.append(
        _spec("dimension_correlation_stats_fp16", _column_stats_kernel, "fp16", columns, 4, False)
    )
    specs.append(
        _spec(
            "dimension_correlation_std_bwd_fp16",
            _standardize_backward_kernel,
            "fp16",
            columns,
            4,
            False,
            out_ty="fp16",
        )
    )
    for along_rows in (True, False):
        block_r, block_c = (16, 64) if along_rows else (64, 16)
        specs.append(
            _spec(
                f"dimension_correlation_lse_{'rows' if along_rows else 'cols'}",
                _logsumexp_kernel,
                "fp32",
                dict(BLOCK_R=block_r, BLOCK_C=block_c),
                4,
                False,
            )
        )
    return specs
