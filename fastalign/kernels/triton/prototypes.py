"""Triton kernels of the prototype operators.

Assignment: one program per block of rows streams over the prototypes, tl.dot-ing raw tiles
(row scaling by 1 / |x| |p| after the product) into logits with a running row statistic (log-sum-
exp or arg-max); Sinkhorn alternates a column pass and a row pass over the logits, keeping each
row's log-normaliser aside; one elementwise pass writes the result. The softmax backward rebuilds
dL/dlogits = P (G - <G, P>) / tau inside the tl.dot tiles of both gradient products. Top-m
mixture: one program per block of queries streams over the keys in tl.dot tiles and merges each
tile into a running top-m (evicting the worst entry while a tile element beats it); the backward
gathers the m selected keys and values and scatter-adds their gradients with atomics. The O(N D)
normalisation steps run in PyTorch around the kernels.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastalign.kernels.triton import _common
from fastalign.kernels.triton._common import (
    LOG2E,
    argmax_nan,
    dot_rows,
    load_tile,
    load_tile_t,
    lse_result,
    lse_start,
    lse_step,
    max_nan,
    merge_max,
    program_block,
)
from fastalign.ops import _options

_NORM_EPS = 1e-12  # F.normalize's


@triton.jit
def _cosine_tile(
    x_rows,
    row_ok,
    inv_x,
    y_ptr,
    inv_y_ptr,
    n0,
    N,
    stride_y,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(cols, col_ok, dots, dots * inv_x[m] * inv_y[n]): the rows n0 .. n0 + BLOCK_N of y (N
    rows), which of them exist, and the (BLOCK_M x BLOCK_N) dot products of a block of x rows
    (pointers ``x_rows``) with them, raw and scaled by the inverse norms (the raw tiles enter
    tl.dot; scaling the product is cheaper than normalising both). One step of the loop over y
    that the logits and the top-m mixture run."""
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dots = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    y_rows = y_ptr + cols.to(tl.int64) * stride_y
    dots = dot_rows(dots, x_rows, row_ok, y_rows, col_ok, D, BLOCK_D, PRECISION)
    inv_y = tl.load(inv_y_ptr + cols, mask=col_ok, other=0.0)
    return cols, col_ok, dots, dots * inv_x[:, None] * inv_y[None, :]


@triton.jit
def _logits_kernel(
    x_ptr,
    p_ptr,
    inv_x_ptr,
    inv_p_ptr,
    out_ptr,
    stat_ptr,
    arg_ptr,
    N,
    K,
    D,
    stride_x,
    stride_p,
    stride_out,
    scale,
    MODE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[n, k] = scale * <x_n, p_k> / (|x_n| |p_k|) (inverse norms given) for a block of
    rows, all K; with what the assignment MODE needs of each row: its log-sum-exp (softmax)
    or its first arg-max (hard)."""
    rows, row_ok = program_block(0, BLOCK_N, N)
    rows64 = rows.to(tl.int64)
    inv_x = tl.load(inv_x_ptr + rows, mask=row_ok, other=0.0) * scale
    x_rows = x_ptr + rows64 * stride_x
    best, total = lse_start(BLOCK_N)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols, col_ok, _, s = _cosine_tile(
            x_rows, row_ok, inv_x, p_ptr, inv_p_ptr, k0, K, stride_p, D,
            BLOCK_N, BLOCK_K, BLOCK_D, PRECISION,
        )  # fmt: skip
        ok = row_ok[:, None] & col_ok[None, :]
        tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], s, mask=ok)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        if MODE == _options.ASSIGN_MODE_SOFTMAX:  # a NaN logit makes its sum NaN
            best, total = lse_step(best, total, s, LOG2E, row_ok, 1)
        if MODE == _options.ASSIGN_MODE_HARD:  # the first maximum, or the first NaN
            tile_arg = argmax_nan(s, 1).to(tl.int32) + k0
            best, best_idx = merge_max(best, best_idx, max_nan(s, 1), tile_arg)
    if MODE == _options.ASSIGN_MODE_SOFTMAX:
        tl.store(stat_ptr + rows, lse_result(best, total, LOG2E, row_ok), mask=row_ok)
    if MODE == _options.ASSIGN_MODE_HARD:
        tl.store(arg_ptr + rows, best_idx, mask=row_ok)


@triton.jit
def _sinkhorn_columns_kernel(
    logq_ptr,
    row_shift_ptr,
    col_shift_ptr,
    N,
    K,
    stride,
    log_column_mass,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Column step: col_shift[k] = logsumexp_n(logq[n, k] - row_shift[n]) - log(N / K)."""
    cols, col_ok = program_block(0, BLOCK_K, K)
    offs_n = tl.arange(0, BLOCK_N)
    best, total = lse_start(BLOCK_K)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + offs_n
        row_ok = rows < N
        ok = row_ok[:, None] & col_ok[None, :]
        v = tl.load(
            logq_ptr + rows[:, None].to(tl.int64) * stride + cols[None, :],
            mask=ok,
            other=float("-inf"),
        )
        shift = tl.load(row_shift_ptr + rows, mask=row_ok, other=0.0)
        v = tl.where(ok, v - shift[:, None], float("-inf"))
        best, total = lse_step(best, total, v, LOG2E, col_ok, 0)
    lse = lse_result(best, total, LOG2E, col_ok)
    tl.store(col_shift_ptr + cols, lse - log_column_mass, mask=col_ok)


@triton.jit
def _sinkhorn_rows_kernel(
    logq_ptr,
    row_shift_ptr,
    col_shift_ptr,
    N,
    K,
    stride,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Row step after a column step: logq[n, k] -= row_shift[n] + col_shift[k] (stored), and
    row_shift[n] = logsumexp_k of the result (applied by the next pass)."""
    rows, row_ok = program_block(0, BLOCK_N, N)
    rows64 = rows.to(tl.int64)
    old_shift = tl.load(row_shift_ptr + rows, mask=row_ok, other=0.0)
    offs_k = tl.arange(0, BLOCK_K)
    best, total = lse_start(BLOCK_N)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        col_ok = cols < K
        ok = row_ok[:, None] & col_ok[None, :]
        ptrs = logq_ptr + rows64[:, None] * stride + cols[None, :]
        col_shift = tl.load(col_shift_ptr + cols, mask=col_ok, other=0.0)
        v = tl.load(ptrs, mask=ok, other=0.0) - old_shift[:, None] - col_shift[None, :]
        tl.store(ptrs, v, mask=ok)
        v = tl.where(ok, v, float("-inf"))
        best, total = lse_step(best, total, v, LOG2E, row_ok, 1)
    tl.store(row_shift_ptr + rows, lse_result(best, total, LOG2E, row_ok), mask=row_ok)


@triton.jit
def _finish_kernel(
    logits_ptr,
    shift_ptr,
    arg_ptr,
    out_ptr,
    N,
    K,
    stride_in,
    stride_out,
    HARD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out = exp(logits - shift[row]) (softmax, Sinkhorn), or the one-hot of arg[row] (hard)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < N
    ok = row_ok[:, None] & (cols < K)[None, :]
    rows64 = rows.to(tl.int64)
    if HARD:
        arg = tl.load(arg_ptr + rows, mask=row_ok, other=-1)
        q = (cols[None, :] == arg[:, None]).to(tl.float32)
    else:
        shift = tl.load(shift_ptr + rows, mask=row_ok, other=0.0)
        v = tl.load(logits_ptr + rows64[:, None] * stride_in + cols[None, :], mask=ok, other=0.0)
        q = tl.exp2((v - shift[:, None]) * LOG2E)
    out = out_ptr + rows64[:, None] * stride_out + cols[None, :]
    tl.store(out, q.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _row_dot_kernel(
    g_ptr, a_ptr, dot_ptr, N, K, stride_g, stride_a, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    """dot[n] = <G_n, P_n>, the softmax backward's row term."""
    rows, row_ok = program_block(0, BLOCK_N, N)
    rows64 = rows.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        ok = row_ok[:, None] & (cols < K)[None, :]
        g = tl.load(g_ptr + rows64[:, None] * stride_g + cols[None, :], mask=ok, other=0.0)
        a = tl.load(a_ptr + rows64[:, None] * stride_a + cols[None, :], mask=ok, other=0.0)
        total += tl.sum(g.to(tl.float32) * a.to(tl.float32), axis=1)
    tl.store(dot_ptr + rows, total, mask=row_ok)


@triton.jit
def _assign_grad_kernel(
    g_ptr,
    a_ptr,
    row_dot_ptr,
    y_ptr,
    inv_y_ptr,
    out_ptr,
    M,
    J,
    D,
    stride_gm,
    stride_gj,
    stride_y,
    stride_out,
    inv_tau,
    DOT_ON_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[i, d] = sum_j dS(i, j) Y[j, d] / |Y_j|, dS = P (G - row_dot) / tau read through
    (stride_gm, stride_gj) from G and P (same strides): dL/dx_unit (i = n, j = k, row_dot
    on i, DOT_ON_M) or dL/dp_unit (i = k, j = n, the transposed view, row_dot on j)."""
    ms, m_ok = program_block(0, BLOCK_M, M)
    ds, d_ok = program_block(1, BLOCK_D, D)
    offs_j = tl.arange(0, BLOCK_J)
    if DOT_ON_M:
        dot_m = tl.load(row_dot_ptr + ms, mask=m_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j0 in range(0, J, BLOCK_J):
        js = j0 + offs_j
        j_ok = js < J
        ok = m_ok[:, None] & j_ok[None, :]
        offs = ms[:, None].to(tl.int64) * stride_gm + js[None, :].to(tl.int64) * stride_gj
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        inv_y = tl.load(inv_y_ptr + js, mask=j_ok, other=0.0)
        if DOT_ON_M:
            ds_tile = a * (g - dot_m[:, None])
        else:
            dot_j = tl.load(row_dot_ptr + js, mask=j_ok, other=0.0)
            ds_tile = a * (g - dot_j[None, :])
        ds_tile = tl.where(ok, ds_tile * (inv_y[None, :] * inv_tau), 0.0)
        y = load_tile(y_ptr, js.to(tl.int64), j_ok, ds, d_ok, stride_y)
        acc = tl.dot(ds_tile.to(y_ptr.dtype.element_ty), y, acc, input_precision=PRECISION)
    out = out_ptr + ms[:, None].to(tl.int64) * stride_out + ds[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _update_kernel(
    p_ptr,
    x_ptr,
    a_ptr,
    mass_ptr,
    out_ptr,
    N,
    K,
    D,
    stride_p,
    stride_x,
    stride_a,
    stride_out,
    momentum,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[k] = momentum p_k + (1 - momentum) sum_n a_nk x_n / mass_k where mass_k = sum_n a_nk
    > 0, else p_k; also stores mass_k. A (BLOCK_K, BLOCK_D) tile reducing over N."""
    ks, k_ok = program_block(0, BLOCK_K, K)
    ds, d_ok = program_block(1, BLOCK_D, D)
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    mass = tl.zeros([BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + offs_n
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        a_t = load_tile_t(a_ptr, rows64, row_ok, ks, k_ok, stride_a)  # (BLOCK_K, BLOCK_N): A^T
        x = load_tile(x_ptr, rows64, row_ok, ds, d_ok, stride_x)
        mass += tl.sum(a_t.to(tl.float32), axis=1)
        acc = tl.dot(a_t, x, acc, input_precision=PRECISION)
    ok = k_ok[:, None] & d_ok[None, :]
    ks64 = ks.to(tl.int64)
    p = tl.load(p_ptr + ks64[:, None] * stride_p + ds[None, :], mask=ok, other=0.0)
    p = p.to(tl.float32)
    has_mass = mass > 0
    moved = momentum * p + (1.0 - momentum) * acc / tl.where(has_mass, mass, 1.0)[:, None]
    out = out_ptr + ks64[:, None] * stride_out + ds[None, :]
    tl.store(out, tl.where(has_mass[:, None], moved, p), mask=ok)
    if tl.program_id(1) == 0:
        tl.store(mass_ptr + ks, mass, mask=k_ok)


@triton.jit
def _topk_mix_forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    inv_q_ptr,
    inv_k_ptr,
    out_ptr,
    idx_ptr,
    w_ptr,
    N,
    K,
    D,
    DV,
    m,
    stride_q,
    stride_k,
    stride_v,
    stride_out,
    inv_tau,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    M_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """For a block of queries: the m keys of highest cosine (lowest index on ties), softmax of
    their raw dot products * inv_tau, and the weighted sum of their values.

    The running top-m is an unsorted (BLOCK_Q, M_PAD) list. While some tile element beats its
    row's worst entry, every row takes its best remaining tile element (lowest index among
    equals) and, if it beats the worst entry, replaces it (the highest index among equal worst
    entries goes). Tile elements arrive in decreasing order and after all earlier tiles, so
    an element equal to the worst entry always has the higher index and never enters."""
    rows, row_ok = program_block(0, BLOCK_Q, N)
    rows64 = rows.to(tl.int64)
    inv_q = tl.load(inv_q_ptr + rows, mask=row_ok, other=0.0)
    slots = tl.arange(0, M_PAD)
    slot_ok = slots < m
    # Empty slots hold -inf and distinct negative indices; padding slots never count as worst.
    top_cos = tl.where(slot_ok, float("-inf"), float("inf")) + tl.zeros(
        [BLOCK_Q, M_PAD], tl.float32
    )
    top_dot = tl.zeros([BLOCK_Q, M_PAD], dtype=tl.float32)
    top_idx = -1 - slots[None, :] + tl.zeros([BLOCK_Q, M_PAD], dtype=tl.int32)
    q_rows = q_ptr + rows64 * stride_q
    for k0 in range(0, K, BLOCK_K):
        cols, col_ok, dots, cos = _cosine_tile(
            q_rows, row_ok, inv_q, k_ptr, inv_k_ptr, k0, K, stride_k, D,
            BLOCK_Q, BLOCK_K, BLOCK_D, PRECISION,
        )  # fmt: skip
        # torch.sort puts a NaN first; +inf (never a cosine) stands for it, lowest index first
        cos = tl.where(cos != cos, float("inf"), cos)
        cos = tl.where(col_ok[None, :], cos, float("-inf"))
        worst = tl.min(top_cos, axis=1)
        best = tl.max(cos, axis=1)
        while tl.max(tl.where(row_ok & (best > worst), 1, 0), axis=0) > 0:
            best_col = tl.min(tl.where(cos == best[:, None], cols[None, :], 2147483647), axis=1)
            picked = cols[None, :] == best_col[:, None]
            best_dot = tl.sum(tl.where(picked, dots, 0.0), axis=1)
            evict = tl.max(tl.where(top_cos == worst[:, None], top_idx, -2147483647), axis=1)
            replace = (best > worst)[:, None] & (top_idx == evict[:, None])
            top_cos = tl.where(replace, best[:, None], top_cos)
            top_dot = tl.where(replace, best_dot[:, None], top_dot)
            top_idx = tl.where(replace, best_col[:, None], top_idx)
            cos = tl.where(picked, float("-inf"), cos)
            worst = tl.min(top_cos, axis=1)
            best = tl.max(cos, axis=1)
    logits = tl.where(slot_ok[None, :], top_dot * inv_tau, float("-inf"))
    shift = tl.max(logits, axis=1)
    e = tl.exp2((logits - shift[:, None]) * LOG2E)
    w = e / tl.sum(e, axis=1)[:, None]
    ok = row_ok[:, None] & slot_ok[None, :]
    tl.store(idx_ptr + rows64[:, None] * m + slots[None, :], top_idx.to(tl.int64), mask=ok)
    tl.store(w_ptr + rows64[:, None] * m + slots[None, :], w, mask=ok)
    offs_dv = tl.arange(0, BLOCK_D)
    for d0 in range(0, DV, BLOCK_D):
        ds = d0 + offs_dv
        d_ok = ds < DV
        acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
        for j in range(0, m):
            w_j = tl.sum(tl.where(slots[None, :] == j, w, 0.0), axis=1)
            idx_j = tl.sum(tl.where(slots[None, :] == j, top_idx, 0), axis=1)
            v = tl.load(
                v_ptr + idx_j[:, None].to(tl.int64) * stride_v + ds[None, :],
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            acc += w_j[:, None] * v.to(tl.float32)
        out = out_ptr + rows64[:, None] * stride_out + ds[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _topk_mix_backward_kernel(
    g_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    idx_ptr,
    w_ptr,
    grad_q_ptr,
    grad_k_ptr,
    grad_v_ptr,
    N,
    D,
    DV,
    m,
    stride_g,
    stride_q,
    stride_k,
    stride_v,
    inv_tau,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    M_PAD: tl.constexpr,
):
    """Through the m selected keys: gv_j = <G_n, v_j>, c_j = w_j (gv_j - sum_i w_i gv_i) / tau;
    dq_n = sum_j c_j k_j (stored), dk_j += c_j q_n and dv_j += w_j G_n (float32 atomics)."""
    rows, row_ok = program_block(0, BLOCK_Q, N)
    rows64 = rows.to(tl.int64)
    slots = tl.arange(0, M_PAD)
    ok = row_ok[:, None] & (slots < m)[None, :]
    idx = tl.load(idx_ptr + rows64[:, None] * m + slots[None, :], mask=ok, other=0)
    w = tl.load(w_ptr + rows64[:, None] * m + slots[None, :], mask=ok, other=0.0).to(tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    gv = tl.zeros([BLOCK_Q, M_PAD], dtype=tl.float32)
    for j in range(0, m):
        idx_j = tl.sum(tl.where(slots[None, :] == j, idx, 0), axis=1)
        total = tl.zeros([BLOCK_Q], dtype=tl.float32)
        for d0 in range(0, DV, BLOCK_D):
            ds = d0 + offs_d
            mask = row_ok[:, None] & (ds < DV)[None, :]
            g = tl.load(g_ptr + rows64[:, None] * stride_g + ds[None, :], mask=mask, other=0.0)
            v = tl.load(v_ptr + idx_j[:, None] * stride_v + ds[None, :], mask=mask, other=0.0)
            total += tl.sum(g.to(tl.float32) * v.to(tl.float32), axis=1)
            tl.atomic_add(
                grad_v_ptr + idx_j[:, None] * DV + ds[None, :],
                tl.sum(tl.where(slots[None, :] == j, w, 0.0), axis=1)[:, None] * g.to(tl.float32),
                mask=mask,
            )
        gv = tl.where(slots[None, :] == j, total[:, None], gv)
    mean = tl.sum(w * gv, axis=1)
    coef = w * (gv - mean[:, None]) * inv_tau
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + offs_d
        mask = row_ok[:, None] & (ds < D)[None, :]
        q = tl.load(q_ptr + rows64[:, None] * stride_q + ds[None, :], mask=mask, other=0.0)
        acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
        for j in range(0, m):
            idx_j = tl.sum(tl.where(slots[None, :] == j, idx, 0), axis=1)
            c_j = tl.sum(tl.where(slots[None, :] == j, coef, 0.0), axis=1)
            k = tl.load(k_ptr + idx_j[:, None] * stride_k + ds[None, :], mask=mask, other=0.0)
            acc += c_j[:, None] * k.to(tl.float32)
            tl.atomic_add(
                grad_k_ptr + idx_j[:, None] * D + ds[None, :],
                c_j[:, None] * q.to(tl.float32),
                mask=mask,
            )
        tl.store(grad_q_ptr + rows64[:, None] * D + ds[None, :], acc, mask=mask)


# --------------------------------------------------------------------------- launchers
_ROW_BLOCK = 32  # rows per program of the row and column passes
_COL_BLOCK = 64  # columns per step of the row and column passes
_REDUCTION_BLOCK = 32  # feature columns per tl.dot step


def _warps(kernel) -> int:
    """8 warps for the kernels holding a 64 x 64 fp32 accumulator next to two loaded tiles
    (ptxas spills them at 4 warps and the register cap), 4 for the others."""
    return 8 if kernel in (_logits_kernel, _assign_grad_kernel) else 4


def _inverse_norms(x: Tensor, normalize: bool = True) -> Tensor:
    """(rows,) float32 1 / max(|row|, eps), as F.normalize divides; ones without normalize."""
    if not normalize:
        return torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
    return torch.linalg.vector_norm(x.float(), dim=1).clamp_min(_NORM_EPS).reciprocal()


def _normalize_backward(grad: Tensor, x: Tensor) -> Tensor:
    """The gradient through x / max(|x|, eps) row by row, from the gradient w.r.t. the unit rows
    (float32): (g - y <g, y>) / |x|, or g / eps where the norm was clamped."""
    x = x.float()
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    unit = x / norm.clamp_min(_NORM_EPS)
    projected = grad - unit * (grad * unit).sum(dim=1, keepdim=True)
    return torch.where(norm >= _NORM_EPS, projected, grad) / norm.clamp_min(_NORM_EPS)


def prototype_assign_forward(
    x: Tensor, prototypes: Tensor, mode: int, tau: float, iters: int, normalize: bool
) -> Tensor:
    """(N, K) assignments of x (N, D) to prototypes (K, D); see fastalign.prototype_assign."""
    x, prototypes = x.contiguous(), prototypes.contiguous()
    (n, d), k = x.shape, prototypes.shape[0]
    device = x.device
    logits = torch.empty(n, k, dtype=torch.float32, device=device)
    shift = torch.zeros(n, dtype=torch.float32, device=device)
    arg = torch.empty(n, dtype=torch.int32, device=device)
    tile = _common.matrix_tile(x.dtype)
    _common.launch(
        _logits_kernel,
        (triton.cdiv(n, tile),),
        (
            x,
            prototypes,
            _inverse_norms(x, normalize),
            _inverse_norms(prototypes, normalize),
            logits,
            shift,
            arg,
        ),
        (n, k, d, x.stride(0), prototypes.stride(0), logits.stride(0)),
        (1.0 if mode == _options.ASSIGN_MODE_HARD else 1.0 / tau,),
        MODE=mode,
        BLOCK_N=tile,
        BLOCK_K=tile,
        BLOCK_D=_REDUCTION_BLOCK,
        dot_dtype=x.dtype,
        num_warps=_warps(_logits_kernel),
    )
    if mode == _options.ASSIGN_MODE_SINKHORN:
        column_shift = torch.empty(k, dtype=torch.float32, device=device)
        for _ in range(iters):
            _common.launch(
                _sinkhorn_columns_kernel,
                (triton.cdiv(k, _COL_BLOCK),),
                (logits, shift, column_shift),
                (n, k, logits.stride(0)),
                (math.log(n / k),),
                BLOCK_N=_ROW_BLOCK,
                BLOCK_K=_COL_BLOCK,
            )
            _common.launch(
                _sinkhorn_rows_kernel,
                (triton.cdiv(n, _ROW_BLOCK),),
                (logits, shift, column_shift),
                (n, k, logits.stride(0)),
                BLOCK_N=_ROW_BLOCK,
                BLOCK_K=_COL_BLOCK,
            )
    # float32 results overwrite the logits in place (each element is read, then written)
    out = logits if x.dtype == torch.float32 else torch.empty(n, k, dtype=x.dtype, device=device)
    _common.launch(
        _finish_kernel,
        (triton.cdiv(n, _ROW_BLOCK), triton.cdiv(k, _COL_BLOCK)),
        (logits, shift, arg, out),
        (n, k, logits.stride(0), out.stride(0)),
        HARD=mode == _options.ASSIGN_MODE_HARD,
        BLOCK_N=_ROW_BLOCK,
        BLOCK_K=_COL_BLOCK,
    )
    return out


def _launch_assign_grad(grad, assignments, row_dot, y, inv_y, transposed, tau) -> Tensor:
    """dS Y_unit (transposed False: (N, D) for x) or dS^T X_unit (True: (K, D) for p)."""
    n, k = assignments.shape
    rows, reduce = (k, n) if transposed else (n, k)
    d = y.shape[1]
    strides = (1, k) if transposed else (k, 1)
    return _common.launch_tiled(
        _assign_grad_kernel,
        rows,
        d,
        y,
        (grad, assignments, row_dot, y, inv_y),
        (rows, reduce, d, *strides, y.stride(0)),
        (1.0 / tau,),
        tiles=("BLOCK_M", "BLOCK_D"),
        DOT_ON_M=not transposed,
        BLOCK_J=_REDUCTION_BLOCK,
        num_warps=_warps(_assign_grad_kernel),
    )


def prototype_assign_backward(
    grad: Tensor, assignments: Tensor, x: Tensor, prototypes: Tensor, tau: float, normalize: bool
) -> tuple[Tensor, Tensor]:
    """Gradients of the softmax assignment w.r.t. x and prototypes from dL/dP and P."""
    grad, assignments = grad.contiguous(), assignments.contiguous()
    x, prototypes = x.contiguous(), prototypes.contiguous()
    n, k = assignments.shape
    row_dot = torch.empty(n, dtype=torch.float32, device=x.device)
    _common.launch(
        _row_dot_kernel,
        (triton.cdiv(n, _ROW_BLOCK),),
        (grad, assignments, row_dot),
        (n, k, grad.stride(0), assignments.stride(0)),
        BLOCK_N=_ROW_BLOCK,
        BLOCK_K=_COL_BLOCK,
    )
    inv_x, inv_p = _inverse_norms(x, normalize), _inverse_norms(prototypes, normalize)
    grad_x = _launch_assign_grad(grad, assignments, row_dot, prototypes, inv_p, False, tau)
    grad_p = _launch_assign_grad(grad, assignments, row_dot, x, inv_x, True, tau)
    if normalize:
        grad_x, grad_p = _normalize_backward(grad_x, x), _normalize_backward(grad_p, prototypes)
    return grad_x.to(x.dtype), grad_p.to(prototypes.dtype)


def prototype_update(
    prototypes: Tensor, x: Tensor, assignments: Tensor, momentum: float, normalize: bool
) -> Tensor:
    """(K, D) EMA of the assignment-weighted means; see fastalign.prototype_update."""
    prototypes, x, assignments = (t.contiguous() for t in (prototypes, x, assignments))
    (k, d), n = prototypes.shape, x.shape[0]
    mass = torch.empty(k, dtype=torch.float32, device=x.device)
    out = _common.launch_tiled(
        _update_kernel,
        k,
        d,
        x,
        (prototypes, x, assignments, mass),
        (n, k, d, prototypes.stride(0), x.stride(0), assignments.stride(0)),
        (float(momentum),),
        tiles=("BLOCK_K", "BLOCK_D"),
        BLOCK_N=_REDUCTION_BLOCK,
    )
    if normalize:  # only the prototypes that moved
        unit = out / torch.linalg.vector_norm(out, dim=1, keepdim=True).clamp_min(_NORM_EPS)
        out = torch.where(mass[:, None] > 0, unit, out)
    return out.to(prototypes.dtype)


def _slots(m: int) -> int:
    """Width of the (queries, slots) top-m tensors: a power of two >= m."""
    return triton.next_power_of_2(m)


_QUERY_BLOCK = 32  # queries per program of the top-m mixture


def prototype_topk_mix_forward(
    queries: Tensor, keys: Tensor, values: Tensor, m: int, tau: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(out (N, Dv), indices (N, m) int64, weights (N, m)); see fastalign.prototype_topk_mix.
    The indices of a row come in no particular order."""
    queries, keys, values = queries.contiguous(), keys.contiguous(), values.contiguous()
    (n, d), k, dv = queries.shape, keys.shape[0], values.shape[1]
    device = queries.device
    out = torch.empty(n, dv, dtype=values.dtype, device=device)
    indices = torch.empty(n, m, dtype=torch.int64, device=device)
    weights = torch.empty(n, m, dtype=torch.float32, device=device)
    block_k = _common.matrix_tile(queries.dtype)
    _common.launch(
        _topk_mix_forward_kernel,
        (triton.cdiv(n, _QUERY_BLOCK),),
        (
            queries,
            keys,
            values,
            _inverse_norms(queries),
            _inverse_norms(keys),
            out,
            indices,
            weights,
        ),
        (n, k, d, dv, m, queries.stride(0), keys.stride(0), values.stride(0), out.stride(0)),
        (1.0 / tau,),
        BLOCK_Q=_QUERY_BLOCK,
        BLOCK_K=block_k,
        BLOCK_D=_REDUCTION_BLOCK,
        M_PAD=_slots(m),
        dot_dtype=queries.dtype,
    )
    return out, indices, weights.to(queries.dtype)


def prototype_topk_mix_backward(
    grad: Tensor,
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    indices: Tensor,
    weights: Tensor,
    tau: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the top-m mixture w.r.t. queries, keys and values, through the selected
    keys; dL/dkeys and dL/dvalues are accumulated with float32 atomics."""
    grad, queries, keys, values = (t.contiguous() for t in (grad, queries, keys, values))
    indices, weights = indices.contiguous(), weights.contiguous()
    (n, d), dv, m = queries.shape, values.shape[1], indices.shape[1]
    f32 = dict(dtype=torch.float32, device=queries.device)
    grad_q = torch.empty(n, d, **f32)
    grad_k = torch.zeros(keys.shape, **f32)
    grad_v = torch.zeros(values.shape, **f32)
    _common.launch(
        _topk_mix_backward_kernel,
        (triton.cdiv(n, _QUERY_BLOCK),),
        (grad, queries, keys, values, indices, weights, grad_q, grad_k, grad_v),
        (n, d, dv, m, grad.stride(0), queries.stride(0), keys.stride(0), values.stride(0)),
        (1.0 / tau,),
        BLOCK_Q=_QUERY_BLOCK,
        BLOCK_D=_REDUCTION_BLOCK,
        M_PAD=_slots(m),
    )
    return grad_q.to(queries.dtype), grad_k.to(keys.dtype), grad_v.to(values.dtype)


# --------------------------------------------------------------------------- AOT check
_INPUT_PTRS = ("x_ptr", "p_ptr", "y_ptr", "q_ptr", "k_ptr", "v_ptr", "a_ptr", "g_ptr")
_FLOAT_ARGS = ("scale", "log_column_mass", "inv_tau", "momentum")


def _spec(name, fn, ty, constexprs, expect_mma):
    """The launchers' argument types: inputs in ``ty``, the outputs of the top-m mixture and of
    the finishing pass (and the weights its backward reads) in ``ty``, the indices int64,
    arg-max int32, other tensors float32."""
    pointers = dict.fromkeys(_INPUT_PTRS, ty) | {"idx_ptr": "i64", "arg_ptr": "i32"}
    if fn in (_topk_mix_forward_kernel, _finish_kernel):
        pointers["out_ptr"] = ty
    if fn is _topk_mix_backward_kernel:
        pointers["w_ptr"] = ty
    # the hints the JIT derives for contiguous inputs with 16-aligned strides
    strides = [arg for arg in fn.arg_names if arg.startswith("stride")]
    return _common.aot_spec(
        name, fn, constexprs, _warps(fn), expect_mma, pointers, _FLOAT_ARGS, strides
    )


def aot_specs() -> list[dict]:
    """Kernels and the specialisations the launchers use, for the ahead-of-time compile check:
    the tl.dot kernels in float16 and bfloat16 (must show mma), the other passes once."""
    specs = []
    dot = dict(PRECISION="tf32")
    for dtype, ty in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        tile = _common.matrix_tile(dtype)
        specs += [
            _spec(
                f"prototype_logits_lse_{ty}",
                _logits_kernel,
                ty,
                dict(
                    MODE=_options.ASSIGN_MODE_SOFTMAX,
                    BLOCK_N=tile,
                    BLOCK_K=tile,
                    BLOCK_D=_REDUCTION_BLOCK,
                    **dot,
                ),
                True,
            ),
            _spec(
                f"prototype_assign_grad_{ty}",
                _assign_grad_kernel,
                ty,
                dict(DOT_ON_M=True, BLOCK_M=tile, BLOCK_J=_REDUCTION_BLOCK, BLOCK_D=tile, **dot),
                True,
            ),
            _spec(
                f"prototype_update_{ty}",
                _update_kernel,
                ty,
                dict(BLOCK_N=_REDUCTION_BLOCK, BLOCK_K=tile, BLOCK_D=tile, **dot),
                True,
            ),
            _spec(
                f"prototype_topk_mix_{ty}",
                _topk_mix_forward_kernel,
                ty,
                dict(
                    BLOCK_Q=_QUERY_BLOCK,
                    BLOCK_K=tile,
                    BLOCK_D=_REDUCTION_BLOCK,
                    M_PAD=_slots(10),
                    **dot,
                ),
                True,
            ),
        ]
    rows = dict(BLOCK_N=_ROW_BLOCK, BLOCK_K=_COL_BLOCK)
    specs += [
        _spec("prototype_logits_argmax_fp16", _logits_kernel, "fp16",
              dict(MODE=_options.ASSIGN_MODE_HARD, BLOCK_N=64, BLOCK_K=64, BLOCK_D=32, **dot),
              True),
        _spec("prototype_sinkhorn_columns", _sinkhorn_columns_kernel, "fp32", rows, False),
        _spec("prototype_sinkhorn_rows", _sinkhorn_rows_kernel, "fp32", rows, False),
        _spec("prototype_finish_fp16", _finish_kernel, "fp16", dict(HARD=False, **rows), False),
        _spec("prototype_row_dot_fp16", _row_dot_kernel, "fp16", rows, False),
        _spec("prototype_topk_mix_bwd_fp16", _topk_mix_backward_kernel, "fp16",
              dict(BLOCK_Q=_QUERY_BLOCK, BLOCK_D=_REDUCTION_BLOCK, M_PAD=_slots(10)), False),
    ]  # fmt: skip
    return specs
