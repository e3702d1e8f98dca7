"""Triton kernels of the fused region-word similarity, forward and backward.

Forward: a program per (query item, key item) streams tl.dot score tiles over D chunks, aligns
online over keys, aggregates over queries. Backward: a program per (item, token block, D chunk)
rebuilds each tile's one-hot/softmax coefficients G and accumulates G @ tokens; no atomics.
"""

from __future__ import annotations

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
    lse_step,
    max_nan,
    merge_max,
    program_block,
)
from fastalign.ops import _options


@triton.jit
def _activate(s, LEAKY: tl.constexpr):
    """leaky_relu with slope 0.1 (the LAPS score) when LEAKY, else identity."""
    if LEAKY:
        s = tl.where(s > 0, s, s * 0.1)
    return s


@triton.jit
def _region_word_fwd_kernel(
    q_ptr,
    k_ptr,
    q_len_ptr,
    k_len_ptr,
    score_ptr,
    a_ptr,
    idx_ptr,
    n_k,
    D,
    stride_q_item,
    stride_q_tok,
    stride_k_item,
    stride_k_tok,
    stride_s_q,
    stride_s_k,
    stride_a_q,
    stride_a_k,
    align_tau,
    aggregate_tau,
    ALIGN: tl.constexpr,
    AGGREGATE: tl.constexpr,
    LEAKY: tl.constexpr,
    STORE_A: tl.constexpr,
    STORE_IDX: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """score[q, k] = AGGREGATE_{query tokens} ALIGN_{key tokens} act(<q_tok, k_tok>)."""
    pid = tl.program_id(0).to(tl.int64)
    qi = pid // n_k
    ki = pid % n_k
    q_len = tl.load(q_len_ptr + qi).to(tl.int32)
    k_len = tl.load(k_len_ptr + ki).to(tl.int32)
    q_base = q_ptr + qi * stride_q_item
    k_base = k_ptr + ki * stride_k_item
    aux_off = qi * stride_a_q + ki * stride_a_k

    offs_q = tl.arange(0, BLOCK_Q)
    offs_k = tl.arange(0, BLOCK_K)
    align_scale = LOG2E / align_tau
    agg_scale = LOG2E / aggregate_tau

    # aggregate state over query tokens, reduced block by block (every block has a valid row)
    if AGGREGATE == _options.AGGREGATE_MEAN or AGGREGATE == _options.AGGREGATE_SUM:
        agg = tl.sum(tl.zeros([BLOCK_Q], dtype=tl.float32), axis=0)
    else:
        agg = tl.max(tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32), axis=0)
    agg_sum = tl.sum(tl.zeros([BLOCK_Q], dtype=tl.float32), axis=0)

    for q0 in range(0, q_len, BLOCK_Q):
        rows = q0 + offs_q
        row_ok = rows < q_len
        best = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
        best_idx = tl.zeros([BLOCK_Q], dtype=tl.int32)
        run_sum = tl.zeros([BLOCK_Q], dtype=tl.float32)
        for k0 in range(0, k_len, BLOCK_K):
            cols = k0 + offs_k
            col_ok = cols < k_len
            s = tl.zeros([BLOCK_Q, BLOCK_K], dtype=tl.float32)
            q_rows, k_rows = q_base + rows * stride_q_tok, k_base + cols * stride_k_tok
            s = dot_rows(s, q_rows, row_ok, k_rows, col_ok, D, BLOCK_D, PRECISION)
            s = _activate(s, LEAKY)
            s = tl.where(col_ok[None, :], s, float("-inf"))
            if ALIGN == _options.ALIGN_MAX:  # a NaN score is the maximum, as in torch.max
                tile_max = max_nan(s, 1)
                if STORE_IDX:
                    tile_arg = argmax_nan(s, 1).to(tl.int32) + k0
                    best, best_idx = merge_max(best, best_idx, tile_max, tile_arg)
                else:
                    best = tl.maximum(best, tile_max, propagate_nan=tl.PropagateNan.ALL)
            else:  # a NaN score makes its sum NaN
                best, run_sum = lse_step(best, run_sum, s, align_scale, row_ok, 1)
        if ALIGN == _options.ALIGN_MAX:
            aligned = best
        else:
            aligned = best + align_tau * tl.log(run_sum)
        if STORE_A:
            tl.store(a_ptr + aux_off + rows, tl.where(row_ok, aligned, 0.0), mask=row_ok)
        if STORE_IDX:
            tl.store(idx_ptr + aux_off + rows, tl.where(row_ok, best_idx, 0), mask=row_ok)

        if AGGREGATE == _options.AGGREGATE_MEAN or AGGREGATE == _options.AGGREGATE_SUM:
            agg += tl.sum(tl.where(row_ok, aligned, 0.0), axis=0)
        else:
            aligned = tl.where(row_ok, aligned, float("-inf"))
            if AGGREGATE == _options.AGGREGATE_LSE:
                agg, agg_sum = lse_step(agg, agg_sum, aligned, agg_scale, True, 0)
            else:
                agg = tl.maximum(agg, max_nan(aligned, 0), propagate_nan=tl.PropagateNan.ALL)

    if AGGREGATE == _options.AGGREGATE_MEAN:
        score = agg / q_len.to(tl.float32)
    elif AGGREGATE == _options.AGGREGATE_LSE:
        score = agg + aggregate_tau * tl.log(agg_sum)
    else:
        score = agg
    out = score_ptr + qi * stride_s_q + ki * stride_s_k
    if ACCUMULATE:
        score += tl.load(out)
    tl.store(out, score)


@triton.jit
def _region_word_bwd_kernel(
    x_ptr,
    y_ptr,
    x_len_ptr,
    y_len_ptr,
    grad_ptr,
    cq_ptr,
    auxq_ptr,
    ck_ptr,
    auxk_ptr,
    n_y,
    LX,
    D,
    stride_x_item,
    stride_x_tok,
    stride_y_item,
    stride_y_tok,
    stride_g_item,
    stride_g_tok,
    stride_cq_x,
    stride_cq_y,
    stride_ck_x,
    stride_ck_y,
    align_tau,
    ALIGN: tl.constexpr,
    LEAKY: tl.constexpr,
    HAS_Q: tl.constexpr,
    HAS_K: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """grad_x[x, u, :] = sum_{y, v} G[u, v] * y_tok[v, :] for one (x, u block, D chunk).

    Source "q" is the direction where x's tokens are the queries (coef and aux indexed by u),
    source "k" the one where they are the keys (coef and aux indexed by y's token v).
    """
    pid = tl.program_id(0).to(tl.int64)
    n_ublocks = tl.cdiv(LX, BLOCK_U)
    xi = pid // n_ublocks
    u0 = (pid % n_ublocks).to(tl.int32) * BLOCK_U
    x_len = tl.load(x_len_ptr + xi).to(tl.int32)
    offs_u = u0 + tl.arange(0, BLOCK_U)
    u_ok = offs_u < x_len
    offs_v = tl.arange(0, BLOCK_V)
    offs_do, do_ok = program_block(1, BLOCK_DO, D)
    x_base = x_ptr + xi * stride_x_item
    align_scale = LOG2E / align_tau

    acc = tl.zeros([BLOCK_U, BLOCK_DO], dtype=tl.float32)
    n_y_run = tl.where(u0 < x_len, n_y, 0)  # blocks past the real length only write zeros
    # per-y pointers advance by one item stride per step (64-bit pointer arithmetic)
    y_base = y_ptr
    cq_base = cq_ptr + xi * stride_cq_x
    auxq_base = auxq_ptr + xi * stride_cq_x
    ck_base = ck_ptr + xi * stride_ck_x
    auxk_base = auxk_ptr + xi * stride_ck_x
    for yi in range(0, n_y_run):
        y_len = tl.load(y_len_ptr + yi).to(tl.int32)
        if HAS_Q:
            cq = tl.load(cq_base + offs_u, mask=u_ok, other=0.0)
            if ALIGN == _options.ALIGN_MAX:
                iq = tl.load(auxq_base + offs_u, mask=u_ok, other=-1)
            else:
                aq = tl.load(auxq_base + offs_u, mask=u_ok, other=0.0)
        for v0 in range(0, y_len, BLOCK_V):
            cols = v0 + offs_v
            v_ok = cols < y_len
            valid = u_ok[:, None] & v_ok[None, :]
            g = tl.zeros([BLOCK_U, BLOCK_V], dtype=tl.float32)
            if HAS_K:
                ck = tl.load(ck_base + cols, mask=v_ok, other=0.0)
            if ALIGN == _options.ALIGN_MAX:
                if HAS_Q:
                    g += tl.where(iq[:, None] == cols[None, :], cq[:, None], 0.0)
                if HAS_K:
                    ik = tl.load(auxk_base + cols, mask=v_ok, other=-1)
                    g += tl.where(ik[None, :] == offs_u[:, None], ck[None, :], 0.0)
            else:
                s = tl.zeros([BLOCK_U, BLOCK_V], dtype=tl.float32)
                x_rows, y_rows = x_base + offs_u * stride_x_tok, y_base + cols * stride_y_tok
                s = dot_rows(s, x_rows, u_ok, y_rows, v_ok, D, BLOCK_D, PRECISION)
                # padded tokens get -inf so that their exp is 0 (no overflow on garbage)
                act = tl.where(valid, _activate(s, LEAKY), float("-inf"))
                if HAS_Q:
                    g += cq[:, None] * tl.exp2((act - aq[:, None]) * align_scale)
                if HAS_K:
                    ak = tl.load(auxk_base + cols, mask=v_ok, other=0.0)
                    g += ck[None, :] * tl.exp2((act - ak[None, :]) * align_scale)
                if LEAKY:  # leaky_relu'(s)
                    g = tl.where(s > 0, g, g * 0.1)
            g = tl.where(valid, g, 0.0)
            y_tile = load_tile(y_base, cols, v_ok, offs_do, do_ok, stride_y_tok)
            acc = tl.dot(g.to(y_tile.dtype), y_tile, acc, input_precision=PRECISION)
        y_base += stride_y_item
        cq_base += stride_cq_y
        auxq_base += stride_cq_y
        ck_base += stride_ck_y
        auxk_base += stride_ck_y

    out = grad_ptr + xi * stride_g_item + offs_u[:, None] * stride_g_tok + offs_do[None, :]
    tl.store(out, acc.to(grad_ptr.dtype.element_ty), mask=(offs_u[:, None] < LX) & do_ok[None, :])


# --------------------------------------------------------------------------- launchers
def _token_block(n: int) -> int:
    return 16 if n <= 16 else 32


def _d_block(dtype: torch.dtype) -> int:
    """D chunk of the score tiles: the fp32 "ieee" dot runs on FMA units and needs narrower."""
    return 16 if dtype == torch.float32 else 64


def _out_block(align: int, dim: int) -> int:
    """D chunk of one backward program; lse recomputes the scores once per chunk, so wider."""
    return min(64 if align == _options.ALIGN_MAX else 128, max(16, triton.next_power_of_2(dim)))


def _backward_warps(align: int) -> int:
    """The lse backward holds a (BLOCK_U x 128) fp32 accumulator and a score tile: 8 warps."""
    return 4 if align == _options.ALIGN_MAX else 8


def _launch_forward(
    queries: Tensor,
    keys: Tensor,
    query_lengths: Tensor,
    key_lengths: Tensor,
    scores: Tensor,
    keys_are_images: bool,
    align: int,
    aggregate: int,
    align_tau: float,
    aggregate_tau: float,
    leaky: bool,
    need_values: bool,
    store_idx: bool,
    accumulate: bool,
) -> tuple[Tensor, Tensor]:
    """One direction's scores into ``scores`` (Ni, Nt), added when ``accumulate``; returns its
    aligned values (float32) and arg-max key tokens (int32), (Ni, Nt, query tokens) where kept,
    else fresh empties (the outputs of a custom op must not alias)."""
    n_q, len_q, dim = queries.shape
    n_k, len_k, _ = keys.shape
    device = queries.device
    shape = (n_k, n_q, len_q) if keys_are_images else (n_q, n_k, len_q)
    a_out = torch.zeros(shape if need_values else (0,), dtype=torch.float32, device=device)
    idx_out = torch.zeros(shape if store_idx else (0,), dtype=torch.int32, device=device)
    # scores and aux are (Ni, Nt, ...): the key item is axis 0 where the keys are the images
    query_axis = 1 if keys_are_images else 0
    aux_strides = (shape[1] * len_q, len_q)
    if n_q * n_k == 0:
        return a_out, idx_out
    _common.launch(
        _region_word_fwd_kernel,
        (n_q * n_k,),
        (
            queries,
            keys,
            query_lengths,
            key_lengths,
            scores,
            a_out if need_values else scores,
            idx_out if store_idx else scores,
        ),
        (
            n_k,
            dim,
            queries.stride(0),
            queries.stride(1),
            keys.stride(0),
            keys.stride(1),
            scores.stride(query_axis),
            scores.stride(1 - query_axis),
            aux_strides[query_axis],
            aux_strides[1 - query_axis],
        ),
        (float(align_tau), float(aggregate_tau)),
        ALIGN=align,
        AGGREGATE=aggregate,
        LEAKY=bool(leaky),
        STORE_A=need_values,
        STORE_IDX=store_idx,
        ACCUMULATE=accumulate,
        BLOCK_Q=_token_block(len_q),
        BLOCK_K=_token_block(len_k),
        BLOCK_D=_d_block(queries.dtype),
        dot_dtype=queries.dtype,
    )
    return a_out, idx_out


def _unused_aux(device: torch.device) -> tuple[Tensor, Tensor]:
    """The aligned values and arg-max indices of an unused direction: fresh empties."""
    unused_values = torch.empty(0, dtype=torch.float32, device=device)
    return unused_values, torch.empty(0, dtype=torch.int32, device=device)


def region_word_forward(
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
    """Fused region-word similarity forward.

    Args:
        regions: (Ni, R, D) float16/bfloat16/float32, contiguous.
        words: (Nt, L, D), same dtype and device.
        region_lengths: (Ni,) int64, 1 <= len <= R.  word_lengths: (Nt,) int64, 1 <= len <= L.
        direction: 0 t2i, 1 i2t, 2 both.  align: 0 max, 1 lse.
        aggregate: 0 mean, 1 sum, 2 max, 3 lse.
        leaky: apply leaky_relu(0.1) to every dot product before ALIGN.
        need_indices: also return the arg-max indices (align max only).
        need_values: also return the aligned values.

    Returns:
        (scores (Ni, Nt) in the inputs' dtype, a_t2i (Ni, Nt, L) float32,
        idx_t2i (Ni, Nt, L) int32, a_i2t (Ni, Nt, R) float32, idx_i2t (Ni, Nt, R) int32);
        aux tensors that are not produced are ``torch.empty(0)`` on the device, and
        padded tokens hold 0.
    """
    device = regions.device
    scores = torch.empty((regions.shape[0], words.shape[0]), dtype=torch.float32, device=device)
    store_idx = need_indices and align == _options.ALIGN_MAX
    options = (align, aggregate, align_tau, aggregate_tau, leaky, need_values, store_idx)
    t2i = direction in (_options.DIRECTION_T2I, _options.DIRECTION_BOTH)
    i2t = direction in (_options.DIRECTION_I2T, _options.DIRECTION_BOTH)
    # t2i: the words query the regions; i2t: the regions query the words, added to t2i for both
    a_t2i, idx_t2i = (
        _launch_forward(
            words, regions, word_lengths, region_lengths, scores, True, *options, accumulate=False
        )
        if t2i
        else _unused_aux(device)
    )
    a_i2t, idx_i2t = (
        _launch_forward(
            regions, words, region_lengths, word_lengths, scores, False, *options, accumulate=t2i
        )
        if i2t
        else _unused_aux(device)
    )
    return scores.to(regions.dtype), a_t2i, idx_t2i, a_i2t, idx_i2t


def _launch_backward(
    x: Tensor,
    y: Tensor,
    x_lengths: Tensor,
    y_lengths: Tensor,
    coef_q: Tensor,
    aux_q: Tensor,
    coef_k: Tensor,
    aux_k: Tensor,
    x_axis: int,
    align: int,
    align_tau: float,
    leaky: bool,
) -> Tensor:
    """Gradient of x; coef/aux tensors are (Ni, Nt, tokens) with x's item on ``x_axis``."""
    n_x, len_x, dim = x.shape
    grad = torch.empty_like(x)
    has_q, has_k = coef_q.numel() > 0, coef_k.numel() > 0
    if not (has_q or has_k) or grad.numel() == 0 or y.shape[0] == 0:
        return grad.zero_()
    coef_q, aux_q = (coef_q.contiguous(), aux_q.contiguous()) if has_q else (grad, grad)
    coef_k, aux_k = (coef_k.contiguous(), aux_k.contiguous()) if has_k else (grad, grad)
    q_strides = (coef_q.stride(x_axis), coef_q.stride(1 - x_axis)) if has_q else (0, 0)
    k_strides = (coef_k.stride(x_axis), coef_k.stride(1 - x_axis)) if has_k else (0, 0)
    block_u = _token_block(len_x)
    block_v = _token_block(y.shape[1])
    block_do = _out_block(align, dim)
    grid = (n_x * triton.cdiv(len_x, block_u), triton.cdiv(dim, block_do))
    _common.launch(
        _region_word_bwd_kernel,
        grid,
        (x, y, x_lengths, y_lengths, grad, coef_q, aux_q, coef_k, aux_k),
        (
            y.shape[0],
            len_x,
            dim,
            *x.stride()[:2],
            *y.stride()[:2],
            *grad.stride()[:2],
            *q_strides,
            *k_strides,
        ),
        (float(align_tau),),
        ALIGN=align,
        LEAKY=bool(leaky),
        HAS_Q=has_q,
        HAS_K=has_k,
        BLOCK_U=block_u,
        BLOCK_V=block_v,
        BLOCK_D=_d_block(x.dtype),
        BLOCK_DO=block_do,
        dot_dtype=x.dtype,
        num_warps=_backward_warps(align),
    )
    return grad


def region_word_backward(
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
    """Fused region-word similarity backward (deterministic, no atomics).

    Args:
        coef_t2i: (Ni, Nt, L) float32 dScore/da_t2i (times act' for align max), any strides;
            values at padded words are ignored; ``empty(0)`` when t2i is unused.
        aux_t2i: (Ni, Nt, L) int32 arg-max regions (align max) or float32 aligned values
            a_t2i (align lse).
        coef_i2t, aux_i2t: the same for i2t, (Ni, Nt, R).
        regions: (Ni, R, D), words: (Nt, L, D); region_lengths (Ni,), word_lengths (Nt,) int64.
        align: 0 max, 1 lse.  align_tau: lse temperature.  leaky: leaky_relu(0.1) scores.

    Returns:
        (grad_regions (Ni, R, D), grad_words (Nt, L, D)) in the inputs' dtype, 0 at padding.
    """
    options = (align, align_tau, leaky)
    # regions' tokens are the queries of i2t and the keys of t2i; coef tensors are (Ni, Nt, .)
    grad_regions = _launch_backward(
        regions,
        words,
        region_lengths,
        word_lengths,
        coef_i2t,
        aux_i2t,
        coef_t2i,
        aux_t2i,
        0,
        *options,
    )
    grad_words = _launch_backward(
        words,
        regions,
        word_lengths,
        region_lengths,
        coef_t2i,
        aux_t2i,
        coef_i2t,
        aux_i2t,
        1,
        *options,
    )
    return grad_regions, grad_words


# --------------------------------------------------------------------------- AOT check
def _divisible(fn) -> list[str]:
    """D and the token and item strides: multiples of 16 for contiguous inputs, D % 16 == 0."""
    return [name for name in fn.arg_names if name == "D" or name.endswith(("_item", "_tok"))]


def aot_specs() -> list[dict]:
    """Kernels and realistic specialisations for the ahead-of-time compile check."""
    specs = []
    for dtype, ty in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        fwd_const = {
            "ALIGN": _options.ALIGN_MAX,
            "AGGREGATE": _options.AGGREGATE_MEAN,
            "LEAKY": True,
            "STORE_A": True,
            "STORE_IDX": True,
            "ACCUMULATE": False,
            "BLOCK_Q": 32,
            "BLOCK_K": 32,
            "BLOCK_D": _d_block(dtype),
            "PRECISION": "tf32",
        }
        pointers = {"q_ptr": ty, "k_ptr": ty, "q_len_ptr": "i64", "k_len_ptr": "i64"}
        pointers["idx_ptr"] = "i32"
        for align_name, align in (("max", _options.ALIGN_MAX), ("lse", _options.ALIGN_LSE)):
            const = dict(fwd_const, ALIGN=align, STORE_IDX=align == _options.ALIGN_MAX)
            if align == _options.ALIGN_LSE:
                const["AGGREGATE"] = _options.AGGREGATE_LSE
            fn = _region_word_fwd_kernel
            floats = ("align_tau", "aggregate_tau")
            name = f"region_word_fwd_{align_name}_{ty}"
            specs.append(
                _common.aot_spec(name, fn, const, 4, True, pointers, floats, _divisible(fn))
            )
    for align_name, align, aux_ty in (
        ("max", _options.ALIGN_MAX, "i32"),
        ("lse", _options.ALIGN_LSE, "fp32"),
    ):
        bwd_const = {
            "ALIGN": align,
            "LEAKY": True,
            "HAS_Q": True,
            "HAS_K": True,
            "BLOCK_U": 32,
            "BLOCK_V": 32,
            "BLOCK_D": 64,
            "BLOCK_DO": 64 if align == _options.ALIGN_MAX else 128,
            "PRECISION": "tf32",
        }
        pointers = {"x_ptr": "fp16", "y_ptr": "fp16", "grad_ptr": "fp16"}
        pointers |= {"x_len_ptr": "i64", "y_len_ptr": "i64", "auxq_ptr": aux_ty, "auxk_ptr": aux_ty}
        fn = _region_word_bwd_kernel
        warps = _backward_warps(align)
        name = f"region_word_bwd_{align_name}_fp16"
        specs.append(
            _common.aot_spec(
                name, fn, bwd_const, warps, True, pointers, ("align_tau",), _divisible(fn)
            )
        )
    return specs
