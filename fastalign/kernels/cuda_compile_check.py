"""Ahead-of-time compile check for the CUDA kernels of csrc/cuda, no GPU needed.

The kernels live in torch-free ``.cuh`` headers; ``csrc/cuda/compile_check_driver.cu``
instantiates all of them. For each architecture (sm_80 and sm_90 by default) nvcc writes the
PTX, and ptxas assembles it with ``-v``: registers, shared memory, stack and spills per kernel
come from its report. Matrix kernels (``MMA_KERNELS``) must show tensor-core instructions
(``mma.sync`` / ``wmma.mma.sync`` / ``wgmma``) in their PTX, and no kernel may spill.

Run ``python -m fastalign.kernels.cuda_compile_check [--arch 80 90]``: a table, and a non-zero
exit status when a kernel fails to compile, spills or lacks an expected tensor-core
instruction. nvcc is taken from ``$CUDA_HOME/bin`` (default /usr/local/cuda).
The ``.cu`` files that register the kernels with torch are compiled by the extension build
(``make cuda-link-check``), not here: they need torch's headers and a minute each.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from fastalign.kernels._ptxas import PtxasReport

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
DRIVER = CUDA_DIR / "compile_check_driver.cu"
DEFAULT_ARCHS: tuple[int, ...] = (80, 90)
# Kernels (by a substring of their mangled name) whose inner product must use tensor cores.
MMA_KERNELS = (
    "strided_gemm_kernel",
    "prototype_topk_scan_kernel",
    "region_word_forward_kernel",
    "region_word_backward_kernel",
)

_ENTRY_RE = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
_SPILL_RE = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_USED_RE = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_PTX_ENTRY_RE = re.compile(r"\.entry\s+(\w+)\s*\(")
_MMA_RE = re.compile(r"(?<![\w.])(wgmma\.mma_async|wmma\.mma\.sync|mma(?:\.sp)?\.sync)")


@dataclasses.dataclass
class KernelReport(PtxasReport):
    """What ptxas reported for one kernel on one architecture, with its stack frame and the
    tensor-core instruction found in its PTX ("" when none)."""

    stack_bytes: int = 0
    mma: str = ""

    def problems(self) -> list[str]:
        found = self.spill_problems()
        if self.expect_mma and not self.mma:
            found.append("no tensor-core instruction in the PTX")
        return found


def _nvcc() -> Path:
    home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    nvcc = home / "bin" / "nvcc"
    if not nvcc.exists():
        raise FileNotFoundError(f"nvcc not found at {nvcc}: set CUDA_HOME to the CUDA toolkit")
    return nvcc


def _demangle(name: str) -> str:
    """A readable kernel label: fastalign_cuda::<kernel><template argument>."""
    match = re.match(r"_ZN14fastalign_cuda(\d+)(\w+)", name)
    if not match:
        return name
    length = int(match.group(1))
    base = match.group(2)[:length]
    rest = match.group(2)[length:]
    for mangled, readable in (("13__nv_bfloat16", "bf16"), ("6__half", "f16"), ("If", "f32")):
        if rest.startswith("I" + mangled) or (mangled == "If" and rest.startswith("If")):
            return f"{base}<{readable}>"
    return base


def _split_ptx(ptx: str) -> dict[str, str]:
    """PTX text of each .entry (from its header to the next one)."""
    starts = [(m.start(), m.group(1)) for m in _PTX_ENTRY_RE.finditer(ptx)]
    bodies = {}
    for i, (start, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(ptx)
        bodies[name] = ptx[start:end]
    return bodies


def check_arch(arch: int, workdir: Path) -> list[KernelReport]:
    nvcc = _nvcc()
    ptx_path = workdir / f"kernels_sm{arch}.ptx"
    common = ["-std=c++17", "-O3", f"-I{CUDA_DIR}"]
    subprocess.run(
        [str(nvcc), "--ptx", f"-arch=sm_{arch}", *common, str(DRIVER), "-o", str(ptx_path)],
        check=True,
        capture_output=True,
        text=True,
    )
    ptxas = nvcc.parent / "ptxas"
    assembled = subprocess.run(
        [str(ptxas), f"-arch=sm_{arch}", "-v", str(ptx_path), "-o", str(workdir / "k.cubin")],
        check=True,
        capture_output=True,
        text=True,
    )
    bodies = _split_ptx(ptx_path.read_text())
    reports: list[KernelReport] = []
    current: KernelReport | None = None
    for line in (assembled.stdout + assembled.stderr).splitlines():
        if m := _ENTRY_RE.search(line):
            mangled = m.group(1)
            mma = _MMA_RE.search(bodies.get(mangled, ""))
            current = KernelReport(
                name=_demangle(mangled),
                arch=arch,
                mma=mma.group(1) if mma else "",
                expect_mma=any(k in mangled for k in MMA_KERNELS),
            )
            reports.append(current)
        elif current is not None and (m := _SPILL_RE.search(line)):
            current.stack_bytes, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif current is not None and (m := _USED_RE.search(line)):
            current.registers = int(m.group(1))
            current.shared_bytes = int(m.group(2) or 0)
    if not reports:
        raise RuntimeError(f"ptxas reported no kernel for sm_{arch}")
    return reports


def format_table(reports: Sequence[KernelReport]) -> str:
    width = max([len("kernel"), *(len(r.name) for r in reports)])
    header = (
        f"{'kernel':{width}} {'arch':>6} {'regs':>5} {'smem B':>7} {'stack':>5} {'spill st/ld':>11}"
    )
    lines = [header + "  tensor cores   status", "-" * (len(header) + 24)]
    for r in reports:
        problems = r.problems()
        mma = r.mma or ("MISSING" if r.expect_mma else "-")
        lines.append(
            f"{r.name:{width}} {'sm_' + str(r.arch):>6} {r.registers:5d} {r.shared_bytes:7d} "
            f"{r.stack_bytes:5d} {f'{r.spill_stores}/{r.spill_loads}':>11}  {mma:14} "
            f"{'ok' if not problems else 'FAIL: ' + '; '.join(problems)}"
        )
    return "\n".join(lines)


def run(archs: Sequence[int] = DEFAULT_ARCHS) -> list[KernelReport]:
    with tempfile.TemporaryDirectory(prefix="fastalign_cuda_check_") as tmp:
        reports = []
        for arch in archs:
            reports += check_arch(arch, Path(tmp))
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS))
    args = parser.parse_args(argv)
    try:
        reports = run(args.arch)
    except subprocess.CalledProcessError as exc:
        print(f"nvcc/ptxas failed:\n{exc.stderr}", file=sys.stderr)
        return 1
    print(format_table(reports))
    failed = [r for r in reports if r.problems()]
    print(f"\n{len(reports)} kernel builds, {len(failed)} failing")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
