"""Which backends exist on this machine, and how ``backend="auto"`` resolves.

The compiled extension ``fastalign._C`` is optional: without it only the reference
and (on a GPU, or under ``TRITON_INTERPRET=1``) the Triton backend run.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")

try:
    from fastalign import _C  # noqa: F401  (loading it registers the fastalign:: ops)

    _EXTENSION_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only without a build
    _EXTENSION_ERROR = str(exc)


def extension_loaded() -> bool:
    return _EXTENSION_ERROR is None


# Every public operator and its ops, the forward first: "fastalign::<op>" is the compiled op
# (csrc/ops.cpp, kernels in csrc/cpu and csrc/cuda), "fastalign::<op>_triton" the Triton one
# (fastalign/kernels/triton/<module>.py); fastalign/ops/<module>.py registers both through
# fastalign/ops/_library.py. A new operator adds its line here.
OPERATOR_OPS: dict[str, tuple[str, ...]] = {
    "region_word_similarity": ("region_word_forward", "region_word_backward"),
    "dimension_correlation_loss": ("dimension_correlation_loss_forward",),
    "sparse_spatial_loss": ("sparse_spatial_loss_forward",),
    "prototype_assign": ("prototype_assign_forward", "prototype_assign_backward"),
    "prototype_update": ("prototype_update",),
    "prototype_topk_mix": ("prototype_topk_mix_forward", "prototype_topk_mix_backward"),
}


# Asked of the dispatcher once, at import (when fastalign._C has registered its kernels): the
# query cannot be traced, and torch.compile(fullgraph=True) must get through resolve_backend.
_HAS_CUDA_KERNEL = {
    op: extension_loaded()
    and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastalign::{names[0]}", "CUDA")
    for op, names in OPERATOR_OPS.items()
}


def extension_has_cuda(op: str | None = None) -> bool:
    """True when fastalign._C holds a CUDA kernel for ``op`` (a public operator name), or for
    any operator when ``op`` is None."""
    if op is None:
        return any(_HAS_CUDA_KERNEL.values())
    return _HAS_CUDA_KERNEL.get(op, False)


def triton_interpret() -> bool:
    """True when Triton kernels are run by the interpreter on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    return _TRITON_IMPORTABLE


def backends(op: str | None = None) -> dict[str, str]:
    """Availability of each backend on this machine (for the public operator ``op``, or for
    any operator when None: the CUDA kernels do not yet cover every operator).

    Returns a dict mapping backend name to ``"available"`` or the reason it is not.
    """
    report = {"reference": "available"}
    if extension_loaded():
        report["cpu"] = "available"
    else:
        report["cpu"] = f"unavailable: fastalign._C did not load ({_EXTENSION_ERROR})"
    if not triton_importable():
        report["triton"] = "unavailable: triton is not installed"
    elif torch.cuda.is_available() or triton_interpret():
        report["triton"] = "available"
    else:
        report["triton"] = "unavailable: no CUDA device (set TRITON_INTERPRET=1 to run on CPU)"
    if extension_has_cuda(op) and torch.cuda.is_available():
        report["cuda"] = "available"
    elif not extension_has_cuda(op):
        report["cuda"] = "unavailable: fastalign._C was built without CUDA kernels for this op"
    else:
        report["cuda"] = "unavailable: no CUDA device"
    return report


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """Turn ``backend`` into a concrete backend for tensors on ``device``.

    ``"auto"`` picks the C++ kernel for CPU tensors and Triton for CUDA tensors, and
    falls back to the reference when the fast path is not available.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu":
            return "cpu" if extension_loaded() else "reference"
        if device.type == "cuda" and triton_importable():
            return "triton"
        return "reference"
    if backend == "reference":
        return backend
    status = backends(op)[backend]
    if status != "available":
        raise RuntimeError(f"{op}: backend {backend!r} is {status}")
    expected = {"cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda", "cpu")}[backend]
    if device.type not in expected or (
        backend == "triton" and device.type == "cpu" and not triton_interpret()
    ):
        raise ValueError(
            f"{op}: backend {backend!r} needs tensors on {' or '.join(expected)}, got {device}"
        )
    return backend
