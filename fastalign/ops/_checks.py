"""Argument checks shared by the operators: clear errors that name the argument."""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

# What each backend's kernels take.
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


# --------------------------------------------------------------------------- finite values
# Checking a CUDA tensor for NaN / inf reads a flag back from the device: one synchronisation
# per operator call, which a GPU training loop should not pay unless asked to. CPU tensors are
# always checked (a pass over memory, no synchronisation).
_check_finite_on_device = os.environ.get("FASTALIGN_CHECK_FINITE", "0") == "1"


def set_finite_checks(enabled: bool) -> None:
    """Turn the NaN / infinity check of every operator's inputs on or off for tensors that are
    not on the CPU (CUDA).

    CPU inputs are always checked. On CUDA the check costs one device synchronisation per call,
    so it is off by default; the environment variable ``FASTALIGN_CHECK_FINITE=1`` turns it on
    at import. With it off, a non-finite CUDA input reaches the kernels, and both GPU backends
    give the reference's answer for a NaN wherever it sits: NaN where the plain-PyTorch
    reference has it, and a NaN taken for the largest value in every max, arg-max and top-k, as
    ``torch.max`` / ``argmax`` / ``sort`` do (a max-align returns the NaN). Under torch.compile
    no input is checked: the check depends on the data.
    """
    global _check_finite_on_device
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _check_finite_on_device = enabled


def finite_checks_enabled() -> bool:
    """Whether non-CPU (CUDA) inputs are checked for NaN / infinity (CPU inputs always are)."""
    return _check_finite_on_device


def finite_check_applies(device: torch.device) -> bool:
    """The policy: inputs on ``device`` are checked for NaN / inf (always on the CPU, elsewhere
    when :func:`set_finite_checks` or FASTALIGN_CHECK_FINITE=1 asked for it)."""
    return device.type == "cpu" or _check_finite_on_device


def check_finite(
    name: str, x: Tensor, lengths: Tensor | None = None, backend: str | None = None
) -> None:
    """Raise ValueError naming ``x`` and the index of its first NaN / inf (row-major order),
    where the policy of :func:`finite_check_applies` applies to x's device.

    ``lengths`` (N,): only the first lengths[n] rows of x[n] (N, tokens, ...) are read by the
    kernels, so only those are checked. Skipped while torch.compile traces (data-dependent), and
    for ``backend`` "cpu": the compiled CPU kernels raise the same error themselves, from a pass
    they make anyway where they can (a second pass here would read every input twice).
    """
    if backend == "cpu" or torch.compiler.is_compiling() or not finite_check_applies(x.device):
        return
    x = x.detach()
    if bool(torch.isfinite(x.sum())):  # one reduction; an overflowing sum looks closer below
        return
    bad = ~torch.isfinite(x)
    if lengths is not None:
        padded = torch.arange(x.shape[1], device=x.device) >= lengths[:, None]
        bad &= ~padded.view(*padded.shape, *([1] * (x.dim() - 2)))
    where = bad.nonzero()
    if len(where):
        index = tuple(int(i) for i in where[0])
        raise ValueError(
            f"{name} holds a non-finite value ({float(x[index])}) at "
            f"[{', '.join(map(str, index))}]: the operators need finite inputs"
        )
