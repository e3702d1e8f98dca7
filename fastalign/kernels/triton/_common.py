"""What the Triton kernel files share: launch settings, tile loads, the tl.dot loop over the
feature dimension, reductions that keep NaN as torch does, and the description of a kernel for
the ahead-of-time compile check."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import triton
import triton.language as tl

# Register cap of every launch. Without it ptxas (with the --regAllocOptLevel=2 that Triton 3.9
# passes) aims at ~64-80 registers and spills a few bytes; 128 keeps the fp16/bf16 kernels
# spill-free for all block sizes the launchers pick, at 4 (16) resident CTAs (warps) per SM.
MAXNREG = 128


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: float32 inputs use TF32 only where torch allows it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def matrix_tile(dtype: torch.dtype) -> int:
    """Output tile side of the matrix kernels: the fp32 "ieee" dot runs on FMA units, narrower."""
    return 32 if dtype == torch.float32 else 64


def reduction_block(dtype: torch.dtype) -> int:
    """Step of a matrix kernel's reduction loop (the inner dimension of each tl.dot)."""
    return 16 if dtype == torch.float32 else 32


def launch(
    kernel,
    grid,
    tensors: tuple,
    sizes: tuple,
    scalars: tuple = (),
    *,
    num_warps: int = 4,
    dot_dtype: torch.dtype | None = None,
    **constexprs,
) -> None:
    """``kernel[grid](*tensors, *sizes, *scalars, **constexprs)`` as compile_check compiles it:
    under the register cap :data:`MAXNREG`; with ``dot_dtype``, also the tl.dot PRECISION for
    that input dtype.

    Every kernel takes its arguments in this order: the tensors (pointers), then the sizes and
    strides (int32), then the float scalars, then the constexprs.
    """
    if dot_dtype is not None:
        constexprs["PRECISION"] = dot_precision(dot_dtype)
    kernel[grid](*tensors, *sizes, *scalars, **constexprs, num_warps=num_warps, maxnreg=MAXNREG)


def launch_tiled(
    kernel,
    rows: int,
    cols: int,
    like: torch.Tensor,
    tensors: tuple,
    sizes: tuple,
    scalars: tuple = (),
    *,
    tiles: tuple[str, str],
    **options,
) -> torch.Tensor:
    """A float32 (rows, cols) output ``out`` on ``like``'s device, computed tile by tile by a
    matrix kernel that takes (tensors..., out, sizes..., out's row stride, scalars...).

    The tile side (:func:`matrix_tile` of ``like``'s dtype, which also sets the tl.dot
    precision) goes to the two constexprs named in ``tiles`` (rows, columns), and the grid
    covers out; ``options`` are :func:`launch`'s (other constexprs, num_warps). Returns out.
    """
    out = torch.empty(rows, cols, dtype=torch.float32, device=like.device)
    tile = matrix_tile(like.dtype)
    grid = (triton.cdiv(rows, tile), triton.cdiv(cols, tile))
    constexprs = dict.fromkeys(tiles, tile) | options
    launch(
        kernel,
        grid,
        (*tensors, out),
        (*sizes, out.stride(0)),
        scalars,
        dot_dtype=like.dtype,
        **constexprs,
    )
    return out


@triton.jit
def program_block(axis: tl.constexpr, BLOCK: tl.constexpr, n):
    """This program's block of BLOCK indices along the launch grid's ``axis`` (block i of the
    range 0 .. n) and the mask of those below n."""
    offs = tl.program_id(axis) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def load_tile(base, rows, row_ok, cols, col_ok, stride):
    """The (rows x cols) tile base[rows * stride + cols] of a row-major matrix, 0 outside.
    Pass int64 ``rows`` where rows * stride may pass 2^31."""
    return tl.load(
        base + rows[:, None] * stride + cols[None, :],
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,
    )


@triton.jit
def load_tile_t(base, rows, row_ok, cols, col_ok, stride):
    """The transpose (cols x rows) of :func:`load_tile`'s tile, loaded as such for tl.dot."""
    return tl.load(
        base + rows[None, :] * stride + cols[:, None],
        mask=row_ok[None, :] & col_ok[:, None],
        other=0.0,
    )


@triton.jit
def dot_rows(acc, x_rows, x_ok, y_rows, y_ok, D, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """acc + X @ Y^T (float32) for two blocks of rows of length D, given by pointers to their
    first elements (``x_rows`` (M,), ``y_rows`` (N,), unit stride along D): the tl.dot loop over
    the feature dimension, in BLOCK_D steps, that the score and logit kernels start from."""
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        d_ok = dd < D
        x = tl.load(x_rows[:, None] + dd[None, :], mask=x_ok[:, None] & d_ok[None, :], other=0.0)
        y_t = tl.load(y_rows[None, :] + dd[:, None], mask=y_ok[None, :] & d_ok[:, None], other=0.0)
        acc = tl.dot(x, y_t, acc, input_precision=PRECISION)
    return acc


# log2(e): the kernels take exp(x) as exp2(x * LOG2E), the faster instruction.
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def lse_start(BLOCK: tl.constexpr):
    """The state (running maximum, running sum) of :func:`lse_step` before any block, for BLOCK
    slices at once."""
    return tl.full([BLOCK], float("-inf"), dtype=tl.float32), tl.zeros([BLOCK], dtype=tl.float32)


@triton.jit
def lse_step(best, total, x, scale, valid, axis: tl.constexpr):
    """One block ``x`` of a running log-sum-exp along ``axis``: the running maximum ``best`` of
    x and ``total`` = sum exp2((x - best) * scale) (scale = log2(e) / temperature), updated.
    Where ``valid`` is False (slices of -inf only, never stored) the maximum is held at 0 so
    that no inf - inf enters."""
    new_best = tl.where(valid, tl.maximum(best, tl.max(x, axis=axis)), 0.0)
    shifted = (x - tl.expand_dims(new_best, axis)) * scale
    total = total * tl.exp2((best - new_best) * scale) + tl.sum(tl.exp2(shifted), axis=axis)
    return new_best, total


@triton.jit
def lse_result(best, total, scale, valid):
    """The log-sum-exp of the blocks :func:`lse_step` took (at the same ``scale``), in x's
    units: best + log2(total) / scale; 0 where not ``valid``."""
    return best + tl.log2(tl.where(valid, total, 1.0)) / scale


# --------------------------------------------------------------------------- NaN as torch
# tl.max, tl.argmax and tl.maximum pass over NaN (IEEE maxNum, numpy's nanmax under the
# interpreter), while torch.max / amax / argmax / sort take NaN for the largest value. With the
# finite checks off a NaN input reaches the kernels, and each backend must then give the NaNs
# (and the arg-max positions) the reference gives: the kernels reduce through these helpers.


@triton.jit
def max_nan(x, axis: tl.constexpr):
    """tl.max along ``axis``, NaN where the reduced slice holds a NaN (torch.amax)."""
    return tl.max(x, axis=axis) + tl.sum(tl.where(x == x, 0.0, x), axis=axis)


@triton.jit
def argmax_nan(x, axis: tl.constexpr):
    """The first index of the maximum along ``axis``, or of the first NaN where the slice holds
    one (torch.argmax)."""
    is_nan = x != x
    first_nan = tl.argmax(is_nan.to(tl.int32), axis=axis)
    # NaN masked out of the plain arg-max: an all-NaN slice makes the interpreter's raise
    first_max = tl.argmax(tl.where(is_nan, float("-inf"), x), axis=axis)
    return tl.where(tl.max(is_nan.to(tl.int32), axis=axis) > 0, first_nan, first_max)


@triton.jit
def merge_max(best, best_idx, tile_max, tile_arg):
    """A running (maximum, first arg-max) after one more tile, whose indices all come after the
    earlier ones: the tile takes over only when strictly larger, or with the first NaN."""
    takes = (tile_max > best) | ((tile_max != tile_max) & (best == best))
    best = tl.maximum(best, tile_max, propagate_nan=tl.PropagateNan.ALL)
    return best, tl.where(takes, tile_arg, best_idx)


# --------------------------------------------------------------------------- AOT check
def aot_spec(
    name: str,
    fn,
    constexprs: dict,
    num_warps: int,
    expect_mma: bool,
    pointers: dict[str, str],
    floats: Iterable[str] = (),
    divisible: Iterable[str] | None = None,
) -> dict:
    """One specialisation of the kernel ``fn`` for compile_check, with the argument types and
    the register cap (:data:`MAXNREG`) its launcher uses.

    ``pointers`` gives the element type of pointer arguments (fp32 for the others), ``floats``
    names the fp32 scalars; other arguments (sizes, strides) are i32. ``divisible`` names the
    integer arguments that are multiples of 16 at run time (contiguous inputs, D % 16 == 0), by
    default D and the ``stride_*`` arguments: the JIT hints them, and every pointer, as such.
    """
    floats = set(floats)
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = f"*{pointers.get(arg, 'fp32')}"
        else:
            signature[arg] = "fp32" if arg in floats else "i32"
    if divisible is None:
        divisible = [arg for arg in fn.arg_names if arg == "D" or arg.startswith("stride_")]
    divisible = set(divisible)
    return {
        "name": name,
        "fn": fn,
        "signature": signature,
        "constexprs": constexprs,
        "num_warps": num_warps,
        "expect_mma": expect_mma,
        "options": {"maxnreg": MAXNREG},
        "divisibility": {
            arg: 16 for arg, ty in signature.items() if ty.startswith("*") or arg in divisible
        },
    }
