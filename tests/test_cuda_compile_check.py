"""The nvcc compile check of the CUDA kernels (fastalign.kernels.cuda_compile_check)."""

import os
import shutil
from pathlib import Path

import pytest

from fastalign.kernels import cuda_compile_check as check

CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
pytestmark = pytest.mark.skipif(
    not (CUDA_HOME / "bin" / "nvcc").exists() or shutil.which("g++") is None,
    reason=f"needs nvcc under CUDA_HOME ({CUDA_HOME})",
)


@pytest.fixture(scope="module")
def reports():
    return check.run()


def test_every_kernel_compiles_for_both_archs_without_spills(reports):
    names = {r.name for r in reports}
    for arch in check.DEFAULT_ARCHS:
        assert {r.name for r in reports if r.arch == arch} == names
    assert "strided_gemm_kernel" in names and "column_stats_kernel<bf16>" in names
    for r in reports:
        assert r.problems() == [], (r.name, r.arch, r.problems())
        assert r.registers > 0


def test_matrix_kernels_use_tensor_cores(reports):
    gemm = [r for r in reports if r.expect_mma]
    for kernel in check.MMA_KERNELS:  # every matrix kernel is checked on every architecture
        assert {r.arch for r in gemm if r.name.startswith(kernel)} == set(check.DEFAULT_ARCHS)
    assert all(r.mma.endswith("mma.sync") for r in gemm)
    assert all(r.shared_bytes > 0 for r in gemm)


def test_a_spill_or_missing_mma_fails():
    spilled = check.KernelReport("k", 80, spill_stores=4)
    assert spilled.problems() == ["spills 4 B stores / 0 B loads"]
    assert check.KernelReport("k", 90, expect_mma=True).problems() == [
        "no tensor-core instruction in the PTX"
    ]
