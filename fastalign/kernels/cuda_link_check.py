"""Link check of a CUDA build of fastalign._C (``make cuda-link-check``; no GPU needed).

Imports fastalign, lists every compiled ``fastalign::`` op that has a CPU kernel, and says
whether the CUDA dispatch key holds a kernel for it too. Exits non-zero when one lacks it: a
CUDA build must cover every compiled op.

    python -m fastalign.kernels.cuda_link_check
"""

from __future__ import annotations

import sys

import torch

import fastalign  # noqa: F401  (importing it loads fastalign._C, which registers the ops)


def compiled_ops() -> list[str]:
    """The ``fastalign::`` ops with a C++ kernel under the CPU key (the Triton ops excluded)."""
    return sorted(
        name
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("fastalign::")
        and not name.endswith("_triton")
        and torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    )


def main() -> int:
    ops = compiled_ops()
    if not ops:
        print("no compiled fastalign:: op found: fastalign._C did not load")
        return 1
    missing = []
    width = max(len(op) for op in ops)
    print(f"{'op':<{width}}  CUDA kernel")
    for op in ops:
        registered = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
        print(f"{op:<{width}}  {'registered' if registered else 'MISSING'}")
        if not registered:
            missing.append(op)
    print(f"{len(ops) - len(missing)} of {len(ops)} compiled ops have a CUDA kernel")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
