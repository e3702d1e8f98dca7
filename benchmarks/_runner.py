"""Shared benchmark runner: wall time, peak extra memory, a printed table and a CSV.

Peak memory on CPU is the rise of the resident set (VmHWM) over its level just before
one call, measured in a fresh process (glibc and MKL told to hand large blocks back), so
it counts every allocation, the BLAS's included. On CUDA it is the rise of
``torch.cuda.max_memory_allocated``. Cases too long to run twice (:func:`measure_once`)
take their time from that same call.

CSV files go to benchmarks/results/, or to the folder FASTALIGN_BENCH_RESULTS names
(benchmarks/bench_all.py gives each operator benchmark its own).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

RESULTS_DIR = Path(
    os.environ.get("FASTALIGN_BENCH_RESULTS") or Path(__file__).resolve().parent / "results"
)
_MEMORY_FLAG = "--measure-memory-of"
# The operator benchmarks (benchmarks/bench_NAME.py): plain PyTorch versus fastalign, with
# ``build_case`` and ``suite`` (benchmarks/test_kernels.py) and a --quick set of cases
# (benchmarks/bench_all.py).
OPERATOR_BENCHMARKS = ("region_word", "dimension_correlation", "sparse_spatial", "prototypes")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object], device: torch.device, repeat: int = 5, warmup: bool = True
) -> float:
    """Median wall time of ``fn`` in milliseconds, after one warm-up call if ``warmup``."""
    if warmup:
        fn()
        synchronize(device)
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def interleaved_times_ms(
    cases: dict[str, Callable[[], object]],
    device: torch.device,
    repeat: int = 5,
    warmup: bool = True,
) -> dict[str, float]:
    """Median wall time of each case in milliseconds, their calls alternating (a, b, a, b,
    ...) after one warm-up call each if ``warmup``, so that a change in a shared machine's
    load affects every case alike."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values() if warmup else ():
        fn()
        synchronize(device)
    for _ in range(repeat):
        for name, fn in cases.items():
            samples[name].append(time_ms(fn, device, repeat=1, warmup=False))
    return {name: statistics.median(ms) for name, ms in samples.items()}


def operator_case(
    fn: Callable[..., torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    mode: str,
    upstream: torch.Tensor | None = None,
) -> Callable[[], object]:
    """A zero-argument call of ``fn(*inputs)``: ``"forward"`` under no_grad, or
    ``"forward+backward"``, returning the inputs' gradients (for ``upstream``, or for a
    scalar output)."""
    if mode == "forward":

        def forward():
            with torch.no_grad():
                return fn(*inputs)

        return forward
    for x in inputs:
        x.requires_grad_()

    def forward_backward():
        return torch.autograd.grad(fn(*inputs), inputs, upstream)

    return forward_backward


def compare_parts(
    parts: dict[str, tuple[str, tuple[str, ...]]],
    build_case: Callable[[str], Callable[[], object]],
    device: torch.device,
    repeat: int,
) -> list[dict]:
    """:func:`compare_cases` for every part: ``parts`` maps a part to (its table label, its
    implementations, the first the baseline); case keys are ``part:impl:device``."""
    rows = []
    for part, (label, impls) in parts.items():
        keys = {impl: f"{part}:{impl}:{device}" for impl in impls}
        rows += compare_cases({"case": label}, keys, build_case, device, repeat)
    return rows


def method_step_main(doc: str, parts, build_case, name: str, what: str) -> list[dict]:
    """The command line of a method's training-step benchmark (``--device``, ``--repeat``):
    every part of ``parts`` compared (:func:`compare_parts`), the table titled ``what`` on
    the batch of bench_train_step.py printed and written as ``name``; returns its rows."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = compare_parts(parts, build_case, device, args.repeat)
    title = (
        f"{what} (batch 128, R 36, Flickr30K-like lengths, D 1024) on {machine_description(device)}"
    )
    report(rows, name, title)
    return rows


def compare_cases(
    labels: dict[str, object],
    keys: dict[str, str],
    build_case: Callable[[str], Callable[[], object]],
    device: torch.device,
    repeat: int,
    warmup: bool = True,
) -> list[dict]:
    """Table rows comparing implementations of one case, the first one the baseline.

    ``keys`` maps each implementation to its case key; every row holds ``labels``, the
    implementation, its median time (calls interleaved, after a warm-up call each if
    ``warmup``: long cases skip it), speedup over the first, peak memory rise, returned
    tensors' size, working memory (peak - outputs) and that as a share of the first's.
    Progress goes to stdout. benchmarks/bench_all.py reads these columns back.
    """
    cases = {impl: build_case(key) for impl, key in keys.items()}
    times = interleaved_times_ms(cases, device, repeat, warmup)
    del cases
    rows, first = [], None
    for impl, key in keys.items():
        case = build_case(key) if device.type == "cuda" else None
        peak, outputs = peak_memory_mib(key, case, device)
        working = max(peak - outputs, 0.0)
        first = first or (times[impl], working)
        rows.append(
            {
                **labels,
                "impl": impl,
                "time_ms": times[impl],
                "speedup": first[0] / times[impl],
                "peak_MiB": peak,
                "outputs_MiB": outputs,
                "working_MiB": working,
                "working_vs_first": f"{100 * working / max(first[1], 1e-9):.1f}%",
            }
        )
        label = " ".join(f"{k}={v}" for k, v in labels.items())
        print(f"{label} {impl}: {times[impl]:.2f} ms, {peak:.1f} MiB", flush=True)
    return rows


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _output_mib(result: object) -> float:
    tensors = result if isinstance(result, (tuple, list)) else (result,)
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)) / 2**20


def measuring_env() -> dict[str, str]:
    """The environment of a memory-measuring child process: glibc and MKL told to hand
    large blocks back to the system, so that a freed buffer leaves the resident set."""
    return dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="65536",
        MALLOC_TRIM_THRESHOLD_="0",
        MKL_DISABLE_FAST_MM="1",
    )


def peak_memory_mib(
    case_key: str,
    fn: Callable[[], object] | None,
    device: torch.device,
    script: str | None = None,
) -> tuple[float, float]:
    """(peak rise, size of the returned tensors) of one call of a case, in MiB.

    The rise is over what existed before the call, so inputs are not counted; what the
    call returns (scores, gradients) is, and ``peak - outputs`` is the working memory.
    CPU: runs ``script`` (by default the running script; under pytest, the benchmark script
    that defines the case) again as ``--measure-memory-of case_key`` in a fresh process.
    """
    if device.type == "cuda":
        fn()
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        outputs = _output_mib(fn())
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, outputs
    measured = _measure_in_fresh_process(case_key, script)
    return measured["peak_MiB"], measured["outputs_MiB"]


def measure_once(
    case_key: str,
    fn: Callable[[], object] | None,
    device: torch.device,
    script: str | None = None,
) -> dict:
    """Time, peak memory and result of one call of a case too long to run twice: ``time_ms``,
    ``peak_MiB``, ``outputs_MiB`` (as :func:`peak_memory_mib`) and ``result``, what the call
    returned when it is a mapping of numbers (a recall table), else None.

    CPU: the call measured by :func:`peak_memory_mib`'s fresh process (after its warm-up),
    timed there; ``fn`` is unused. CUDA: one call of ``fn`` after a warm-up call.
    """
    if device.type != "cuda":
        return _measure_in_fresh_process(case_key, script)
    fn()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize(device)
    return {
        "time_ms": (time.perf_counter() - start) * 1e3,
        "peak_MiB": (torch.cuda.max_memory_allocated(device) - base) / 2**20,
        "outputs_MiB": _output_mib(result),
        "result": _numbers(result),
    }


def _measure_in_fresh_process(case_key: str, script: str | None) -> dict:
    out = subprocess.run(
        [sys.executable, script or sys.argv[0], _MEMORY_FLAG, case_key],
        env=measuring_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _numbers(result: object) -> dict | None:
    """``result`` as a plain dict when it is a mapping of numbers (a recall table)."""
    if isinstance(result, Mapping) and all(isinstance(v, (int, float)) for v in result.values()):
        return dict(result)
    return None


def serve_memory_request(
    cases: Callable[[str], Callable[[], object]],
    warmup_key: Callable[[str], str] = lambda key: key,
) -> bool:
    """In the child process: build the case, warm up, measure one call, print its peak
    memory, the size of what it returned, its time and (a recall table) its result as JSON.

    The warm-up runs the case ``warmup_key(key)`` (a smaller one for long cases), so that
    one-time allocations (thread pools, BLAS buffers) are not counted.
    """
    if _MEMORY_FLAG not in sys.argv:
        return False
    key = sys.argv[sys.argv.index(_MEMORY_FLAG) + 1]
    cases(warmup_key(key))()
    fn = cases(key)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    measured = {
        "peak_MiB": (_rss_kib("VmHWM") - before) / 1024,
        "outputs_MiB": _output_mib(result),
        "time_ms": elapsed * 1e3,
        "result": _numbers(result),
    }
    print(json.dumps(measured))
    return True


def machine_description(device: torch.device) -> str:
    """The machine of a benchmark, for its title: the GPU's name, or the CPU's model, widest
    vector instruction set, caches (those of CPU 0, from sysfs), torch's thread count out of
    the CPUs, and the torch version."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info: dict[str, str] = {}  # the first CPU's fields
    for line in _CPUINFO.read_text().splitlines() if _CPUINFO.is_file() else ():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    cpu = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    features = ", ".join([isa, *_cache_sizes()])
    n = torch.get_num_threads()
    threads = f"{n} thread{'s' * (n != 1)} of {os.cpu_count()} CPUs"
    return f"{cpu} ({features}), {threads}, torch {torch.__version__}"


_CPUINFO = Path("/proc/cpuinfo")
_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


def _cache_sizes() -> list[str]:
    """CPU 0's data and unified caches, smallest level first: ``["L1d 32 KiB", "L2 1 MiB",
    ...]`` (empty where sysfs does not describe them)."""
    caches = []
    for index in sorted(_CACHES.glob("index*")):
        level, kind, size = ((index / f).read_text().strip() for f in ("level", "type", "size"))
        if kind == "Instruction":
            continue
        if size.endswith("K") and size[:-1].isdigit():  # sysfs writes KiB as "1024K"
            kib = int(size[:-1])
            size = f"{kib // 1024} MiB" if kib % 1024 == 0 else f"{kib} KiB"
        caches.append(f"L{level}{'d' if kind == 'Data' else ''} {size}")
    return caches


def table_lines(rows: list[dict]) -> list[str]:
    """``rows`` as the lines of an aligned table, header first."""
    columns = list(rows[0])
    cells = [[_format(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[k]) for r in cells)) for k, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    return lines + ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]


def report(rows: list[dict], name: str, title: str) -> Path:
    """Prints ``rows`` as an aligned table and writes them to RESULTS_DIR/<name>.csv."""
    print(f"\n{title}")
    print("\n".join(table_lines(rows)))
    path = write_csv(rows, name)
    print(f"written to {path}")
    return path


def write_csv(rows: list[dict], name: str) -> Path:
    """Writes ``rows`` to RESULTS_DIR/<name>.csv (benchmarks/results/ by default)."""
    columns = list(rows[0])
    path = RESULTS_DIR / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".csv.tmp")
    with partial.open("w", newline="") as f:  # written whole, then renamed into place
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(path)
    return path


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
