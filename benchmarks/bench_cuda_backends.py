"""Times the three GPU backends of every operator: reference (plain PyTorch), triton and cuda
(csrc/cuda), forward + backward, on CUDA tensors, and the peak memory one call allocates beyond
its inputs; "-" where a backend is unavailable for that operator (the reason is in
fastalign.backends()), "error" where it raised (the message goes to the CSV). Needs a GPU.

    python benchmarks/bench_cuda_backends.py [--quick] [--csv PATH]
"""

from __future__ import annotations

import argparse
import csv
import sys
from functools import partial
from pathlib import Path

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


def peak_mib(fn) -> float:
    """Peak memory one call allocates beyond what existed before it (inputs, warm caches)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(build) -> dict:
    """time_ms and peak_MiB of one backend's case, or its error (a failing backend must not stop
    the others)."""
    try:
        fn = build()
        return {"time_ms": time_ms(fn), "peak_MiB": peak_mib(fn), "error": ""}
    except Exception as exc:  # reported in the table and the CSV
        torch.cuda.synchronize()
        return {"time_ms": None, "peak_MiB": None, "error": f"{type(exc).__name__}: {exc}"}


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
    parser.add_argument("--csv", type=Path, help="also write every cell to this CSV file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_cuda_backends: no CUDA device here; this benchmark needs a GPU.")
        return 2
    names = ("reference", "triton", "cuda")
    print(f"device: {torch.cuda.get_device_name()}")
    header = " ".join(f"{n + ' ms':>12} {'MiB':>8}" for n in names)
    print(f"{'op':28} {'N':>5} {'D':>5} {'mode':9} {header}")
    rows = []
    for label, n, d, mode, op, build in benchmark_rows(args.quick):
        available = backends(op)
        cells = []
        for name in names:
            if available[name] != "available":
                cells.append(f"{'-':>12} {'-':>8}")
                continue
            result = measure(partial(build, name))
            rows.append({"op": label, "N": n, "D": d, "mode": mode, "backend": name, **result})
            if result["error"]:
                cells.append(f"{'error':>12} {'-':>8}")
            else:
                cells.append(f"{result['time_ms']:12.3f} {result['peak_MiB']:8.1f}")
        print(f"{label:28} {n:5d} {d:5d} {mode:9} {' '.join(cells)}", flush=True)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"written to {args.csv}")
    return 1 if any(row["error"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
