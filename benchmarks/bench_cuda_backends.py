"""Times the three GPU backends of every operator: reference (plain PyTorch), triton and cuda
(csrc/cuda), forward + backward, on CUDA tensors; "-" where a backend is unavailable for that
operator (the reason is in fastalign.backends()). Needs a GPU.

    python benchmarks/bench_cuda_backends.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

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


def prototype_assign_case(backend: str, n: int, k: int, d: int, mode: str):
    x = torch.randn(n, d, device="cuda", requires_grad=mode == "softmax")
    p = torch.randn(k, d, device="cuda", requires_grad=mode == "softmax")
    upstream = torch.randn(n, k, device="cuda")

    def step():
        q = fastalign.prototype_assign(x, p, mode=mode, backend=backend)
        if q.requires_grad:
            q.backward(upstream)

    return step


def region_word_case(backend: str, n: int, d: int, mode: tuple[str, str, str, str | None]):
    """n images of 36 regions x n captions padded to 40 words (Flickr30K-like lengths)."""
    regions = torch.randn(n, 36, d, device="cuda", requires_grad=True)
    words = torch.randn(n, 40, d, device="cuda", requires_grad=True)
    word_lengths = torch.randint(6, 25, (n,), device="cuda")
    direction, align, aggregate, activation = mode

    def step():
        scores = fastalign.region_word_similarity(
            regions,
            words,
            word_lengths=word_lengths,
            direction=direction,
            align=align,
            aggregate=aggregate,
            score_activation=activation,
            backend=backend,
        )
        scores.sum().backward()


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


def prototype_update_case(backend: str, n: int, k: int, d: int):
    p, x = torch.randn(k, d, device="cuda"), torch.randn(n, d, device="cuda")
    assignments = torch.softmax(torch.randn(n, k, device="cuda") / 0.1, dim=1)
    return lambda: fastalign.prototype_update(p, x, assignments, 0.9, backend=backend)


def prototype_topk_mix_case(backend: str, n: int, k: int, d: int, m: int):
    q = torch.randn(n, d, device="cuda", requires_grad=True)
    keys = torch.randn(k, d, device="cuda", requires_grad=True)
    values = torch.randn(k, 512, device="cuda", requires_grad=True)

    def step():
        fastalign.prototype_topk_mix(q, keys, values, m=m, backend=backend).sum().backward()

    return step


def benchmark_rows(quick: bool):
    """(label, N, D, mode, public operator, case builder taking the backend) of every row."""
    rows = []
    dim_shapes = [(256, 512), (4096, 1024)] + ([] if quick else [(4096, 2048)])
    for n, d in dim_shapes:
        for mode in ("barlow", "softmax"):
            build = partial(dimension_correlation_case, n=n, d=d, mode=mode)
            rows.append(
                ("dimension_correlation_loss", n, d, mode, "dimension_correlation_loss", build)
            )
    region_modes = {
        "CHAN": ("t2i", "max", "lse", None),
        "LAPS": ("both", "max", "mean", "leaky_relu"),
    }
    for n in (64,) if quick else (64, 128):
        for label, mode in region_modes.items():
            build = partial(region_word_case, n=n, d=1024, mode=mode)
            rows.append(("region_word_similarity", n, 1024, label, "region_word_similarity", build))
    for n in (256,) if quick else (256, 4096):
        for kind, select in [("inter", "threshold"), ("intra", "soft"), ("inter", "topk")]:
            build = partial(sparse_spatial_case, n=n, d=1024, kind=kind, select=select)
            rows.append(
                (f"sparse_spatial_loss {kind}", n, 1024, select, "sparse_spatial_loss", build)
            )
    # K = 3000 prototypes (softmax timed forward + backward), MASK's K = 12385 concept keys.
    for n in (1024,) if quick else (1024, 8192):
        for mode in ("softmax", "hard", "sinkhorn"):
            build = partial(prototype_assign_case, n=n, k=3000, d=256, mode=mode)
            rows.append(("prototype_assign(K=3000)", n, 256, mode, "prototype_assign", build))
        build = partial(prototype_update_case, n=n, k=3000, d=256)
        rows.append(("prototype_update(K=3000)", n, 256, "ema", "prototype_update", build))
        build = partial(prototype_topk_mix_case, n=n, k=12385, d=300, m=10)
        rows.append(("prototype_topk_mix(K=12385)", n, 300, "m=10", "prototype_topk_mix", build))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_cuda_backends: no CUDA device here; this benchmark needs a GPU.")
        return 2
    names = ("reference", "triton", "cuda")
    print(f"device: {torch.cuda.get_device_name()}")
    print(f"{'op':28} {'N':>5} {'D':>5} {'mode':9} " + " ".join(f"{n + ' ms':>12}" for n in names))
    for label, n, d, mode, op, build in benchmark_rows(args.quick):
        available = backends(op)
        cells = [
            f"{time_ms(build(name)):12.3f}" if available[name] == "available" else f"{'-':>12}"
            for name in names
        ]
        print(f"{label:28} {n:5d} {d:5d} {mode:9} {' '.join(cells)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
