"""The kernel microbenchmarks as a pytest-benchmark suite.

    pytest benchmarks --benchmark-only

Each case is a key of one benchmark script's ``build_case``: the scripts' ``suite`` functions
pick fastalign at moderate shapes, and one plain-PyTorch case (region_word's BLAS-bound
forward) is the control: when it slows down too, the machine did, not the kernels. Time: one
warm-up call, then about TARGET_S of calls (at least MIN_ROUNDS). Memory: the scripts' probe
(benchmarks/_runner.py: peak rise of one call in a fresh process on CPU), kept in each
benchmark's extra_info and printed after the timing table.

Compare runs made with the same thread count (extra_info "threads"). On a machine shared with
other jobs, two threads that wait for each other at every parallel region make medians swing
by 10x: run both sides with OMP_NUM_THREADS=1 there. Fix glibc's mmap threshold on both sides
too (MALLOC_MMAP_THRESHOLD_=268435456, as ``make bench-compare`` does): the dynamic one follows
what the process allocated before, and a kernel whose large buffers come from fresh pages pays
their page faults on every call (up to 20% on one case, from allocation history alone).
"""

from __future__ import annotations

import importlib
import math
import time

import pytest
import torch
from _runner import OPERATOR_BENCHMARKS, peak_memory_mib, synchronize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODULES = tuple(importlib.import_module(f"bench_{name}") for name in OPERATOR_BENCHMARKS)
TARGET_S = 1.5
MIN_ROUNDS = 3
MAX_ROUNDS = 50

CASES = [
    pytest.param(module, key, id=f"{module.__name__.removeprefix('bench_')}:{key}")
    for module in MODULES
    for key in module.suite(DEVICE.type)
]


@pytest.mark.parametrize("module,key", CASES)
def test_kernel(benchmark, memory_rows, module, key):
    fn = module.build_case(key)

    def call():
        fn()
        synchronize(DEVICE)

    start = time.perf_counter()
    call()  # warm-up: thread pools, BLAS buffers, Triton compiles
    first = time.perf_counter() - start
    rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(TARGET_S / first)))
    benchmark.group = module.__name__.removeprefix("bench_")
    benchmark.pedantic(call, rounds=rounds, iterations=1)
    case = module.build_case(key) if DEVICE.type == "cuda" else None
    peak, outputs = peak_memory_mib(key, case, DEVICE, script=module.__file__)
    memory = {"peak_MiB": peak, "outputs_MiB": outputs, "working_MiB": max(peak - outputs, 0.0)}
    benchmark.extra_info.update(memory, threads=torch.get_num_threads())
    memory_rows.append({"group": benchmark.group, "case": key, **memory})
