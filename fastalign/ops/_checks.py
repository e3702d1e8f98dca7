"""Argument checks shared by the operators: clear errors that name the argument."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# What each backend's kernels take (README, "Operators").
BACKEND_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "triton": (torch.float16, torch.bfloat16, torch.float32),
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
}


def check_number(name: str, value: float, low: float, low_ok: bool) -> None:
    """A finite real number above ``low`` (or equal to it when ``low_ok``)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and (value > low or (low_ok and value == low))):
        expected = f">= {low}" if low_ok else f"> {low}"
        raise ValueError(f"{name} must be a finite number {expected}, got {value}")


def check_backend_dtype(dtype: torch.dtype, backend: str) -> None:
    """The dtype is one the chosen backend's kernels take (any for the reference)."""
    allowed = BACKEND_DTYPES.get(backend)
    if allowed and dtype not in allowed:
        raise TypeError(
            f"backend {backend!r} supports dtypes {[str(d) for d in allowed]}, got {dtype}"
        )


def check_floating_tensor(name: str, x: object, dims: int, layout: str) -> None:
    """A torch.Tensor of ``dims`` dimensions (``layout`` names them, e.g. "(N, D)") holding
    floating-point values."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D {layout}, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_paired_rows(x: Tensor, y: Tensor, names: tuple[str, str], backend: str, why: str) -> None:
    """Two (N, D) floating-point matrices of one shape, dtype and device, N >= 2, D >= 1,
    whose row n comes from one matched pair; ``why`` says why N >= 2 rows are needed."""
    for name, t in zip(names, (x, y)):
        check_floating_tensor(name, t, 2, "(N, D)")
    both = f"{names[0]} and {names[1]}"
    if x.shape != y.shape:
        raise ValueError(
            f"{both} must have one shape (N, D) (row n of each from one matched pair), got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] < 2:
        raise ValueError(f"{both} need N >= 2 rows {why}, got N = {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{both} need D >= 1 columns, got shape {tuple(x.shape)}")
    if x.dtype != y.dtype:
        raise TypeError(f"{both} must share a dtype, got {x.dtype} and {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"{both} must be on one device, got {x.device} and {y.device}")
    check_backend_dtype(x.dtype, backend)
