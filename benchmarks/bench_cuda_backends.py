"""Times the three GPU backends of the operators that have a CUDA kernel: reference (plain
PyTorch), triton and cuda (csrc/cuda), forward + backward, on CUDA tensors. Needs a GPU.

    python benchmarks/bench_cuda_backends.py [--quick]
"""

from __future__ import annotations

import argparse
import sys

import torch

import fastalign
from fastalign._backends import backends


def time_ms(fn, repeats: int = 20) -> float:
    """Median of `repeats` timed calls after 3 warm-up calls (CUDA events)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def dimension_correlation_case(backend: str, n: int, d: int, mode: str):
    a = torch.randn(n, d, device="cuda", requires_grad=True)
    b = torch.randn(n, d, device="cuda", requires_grad=True)

    def step():
        loss = fastalign.dimension_correlation_loss(a, b, mode=mode, backend=backend)
        loss.backward()

    return step


def sparse_spatial_case(backend: str, n: int, d: int, kind: str, select: str):
    img = torch.randn(n, d, device="cuda", requires_grad=True)
    txt = torch.randn(n, d, device="cuda", requires_grad=True)
    k = n // 8 if select == "topk" else None

    def step():
        loss = fastalign.sparse_spatial_loss(
            img, txt, kind=kind, select=select, k=k, backend=backend
        )
        loss.backward()

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_cuda_backends: no CUDA device here; this benchmark needs a GPU.")
        return 2
    available = backends("dimension_correlation_loss")
    names = [name for name in ("reference", "triton", "cuda") if available[name] == "available"]
    missing = {name: available[name] for name in ("triton", "cuda") if name not in names}
    if missing:
        print(f"skipping backends: {missing}")
    shapes = [(256, 512), (4096, 1024)] if args.quick else [(256, 512), (4096, 1024), (4096, 2048)]
    print(f"device: {torch.cuda.get_device_name()}")
    print(f"{'op':28} {'N':>5} {'D':>5} {'mode':8} " + " ".join(f"{n + ' ms':>12}" for n in names))
    for n, d in shapes:
        for mode in ("barlow", "softmax"):
            times = [time_ms(dimension_correlation_case(name, n, d, mode)) for name in names]
            row = " ".join(f"{t:12.3f}" for t in times)
            print(f"{'dimension_correlation_loss':28} {n:5d} {d:5d} {mode:8} {row}")
    available = backends("sparse_spatial_loss")
    names = [name for name in ("reference", "triton", "cuda") if available[name] == "available"]
    for n, d in [(256, 1024), (4096, 1024)]:
        for kind, select in [("inter", "threshold"), ("intra", "soft"), ("inter", "topk")]:
            times = [time_ms(sparse_spatial_case(name, n, d, kind, select)) for name in names]
            row = " ".join(f"{t:12.3f}" for t in times)
            label = f"sparse_spatial_loss {kind}"
            print(f"{label:28} {n:5d} {d:5d} {select:8} " + row + "  " + " ".join(names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
