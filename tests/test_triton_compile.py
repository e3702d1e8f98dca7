"""Ahead-of-time compile checks of the Triton kernels for sm_80 / sm_90, no GPU.

The checker itself is tested on small kernels defined here (one that must pass, one that
spills, one without mma); then every kernel the package declares through ``aot_specs()``
is compiled for both architectures and must compile, not spill, and show mma / wgmma
where its spec expects tensor cores.
"""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from triton.compiler.errors import CompilationError  # noqa: E402

from fastalign.kernels.triton import compile_check as cc  # noqa: E402

ARCHS = (80, 90)


# --------------------------------------------------------------------------- test kernels
@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr):  # fmt: skip
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * N + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.float16))


@triton.jit
def _hungry_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    # BLOCK fp32 values per program, one warp: every value stays live until the sum is known.
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    scale = tl.rsqrt(tl.sum(x * x, axis=0) + 1e-6)
    tl.store(y_ptr + offs, x * scale)


@triton.jit
def _axpy_kernel(x_ptr, y_ptr, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(y_ptr + offs, alpha * x + tl.load(y_ptr + offs, mask=mask), mask=mask)


def _scale(x_ptr, n, BLOCK: tl.constexpr):  # jit-decorated inside a test, under the interpreter
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2.0, mask=offs < n)


@triton.jit
def _broken_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.dot(tl.load(x_ptr + offs), tl.load(x_ptr + offs)))


MATMUL_SPEC = {
    "name": "test_matmul_fp16",
    "fn": _matmul_kernel,
    "signature": {
        "a_ptr": "*fp16",
        "b_ptr": "*fp16",
        "c_ptr": "*fp16",
        "M": "i32",
        "N": "i32",
        "K": "i32",
    },  # fmt: skip
    "constexprs": {"BM": 64, "BN": 64, "BK": 32},
    "num_warps": 4,
    "expect_mma": True,
}
HUNGRY_SPEC = {
    "name": "test_register_hungry",
    "fn": _hungry_kernel,
    "signature": {"x_ptr": "*fp32", "y_ptr": "*fp32"},
    "constexprs": {"BLOCK": 16384},
    "num_warps": 1,
    "expect_mma": False,
}
AXPY_SPEC = {
    "name": "test_axpy_expecting_mma",
    "fn": _axpy_kernel,
    "signature": {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "alpha": "fp32"},
    "constexprs": {"BLOCK": 1024},
    "num_warps": 4,
    "expect_mma": True,  # wrong on purpose: an elementwise kernel has no mma
}


# --------------------------------------------------------------------------- the checker
@pytest.mark.parametrize("arch", ARCHS)
def test_matmul_compiles_with_tensor_cores_and_no_spills(arch):
    report = cc.compile_kernel(MATMUL_SPEC, arch)
    assert report.error is None
    assert report.has_mma, report
    assert report.mma_kind == ("wgmma" if arch == 90 else "mma")
    assert report.gpu_name == ("sm_90a" if arch == 90 else "sm_80")
    assert (report.spill_stores, report.spill_loads) == (0, 0), report.ptxas_log
    assert 0 < report.registers <= 255
    assert report.shared_bytes > 0 and report.ptx_chars > 0 and report.cubin_bytes > 0
    assert report.ok and report.problems() == []


def test_register_hungry_kernel_is_reported_as_spilling():
    report = cc.compile_kernel(HUNGRY_SPEC, 80)
    assert report.spills and report.spill_stores > 0 and report.spill_loads > 0, report.ptxas_log
    assert not report.ok
    assert any("spills" in p for p in report.problems())


def test_elementwise_kernel_is_reported_as_lacking_mma():
    report = cc.compile_kernel(AXPY_SPEC, 90)
    assert report.error is None and not report.spills
    assert not report.has_mma and report.mma_kind == ""
    assert report.problems() == ["no mma/wgmma in PTX"]
    assert cc.compile_kernel({**AXPY_SPEC, "expect_mma": False}, 90).ok


def test_compile_failure_becomes_a_failing_report():
    spec = {"name": "broken", "fn": _broken_kernel, "signature": {"x_ptr": "*fp32"},
            "constexprs": {"BLOCK": 64}, "num_warps": 4, "expect_mma": False}  # fmt: skip
    with pytest.raises((CompilationError, cc.AOTWorkerError)):
        cc.compile_kernel(spec, 80)
    (report,) = cc.check_all(archs=(80,), specs=[spec])
    assert report.error and not report.ok
    assert report.problems()[0].startswith("compile failed")
    assert "FAIL" in cc.format_table([report])


def test_malformed_specs_are_rejected():
    with pytest.raises(ValueError, match="lacks keys"):
        cc.compile_kernel({"name": "x", "fn": _axpy_kernel}, 80)
    with pytest.raises(ValueError, match="no type in 'signature'"):
        cc.compile_kernel({**AXPY_SPEC, "signature": {"x_ptr": "*fp32"}}, 80)
    with pytest.raises(ValueError, match="not arguments"):
        cc.compile_kernel({**AXPY_SPEC, "constexprs": {"BLOCK": 8, "NOPE": 1}}, 80)


def test_parse_ptxas_log():
    log = textwrap.dedent(
        """\
        ptxas info    : Compiling entry function 'k' for 'sm_90a'
        ptxas info    : Function properties for k
            336 bytes stack frame, 344 bytes spill stores, 336 bytes spill loads
        ptxas info    : Used 254 registers, used 1 barriers, 336 bytes cumulative stack size
        ptxas info    : Function properties for helper
            0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
        ptxas info    : Used 40 registers
        """
    )
    assert cc.parse_ptxas_log(log) == (254, 352, 340)
    with pytest.raises(RuntimeError):
        cc.parse_ptxas_log("nothing here")


def test_kernel_defined_under_the_interpreter_still_compiles(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreted = triton.jit(_scale)
    assert not isinstance(interpreted, triton.runtime.jit.JITFunction)
    spec = {"name": "interp", "fn": interpreted, "signature": {"x_ptr": "*fp32", "n": "i32"},
            "constexprs": {"BLOCK": 128}, "num_warps": 4, "expect_mma": False}  # fmt: skip
    assert cc.compile_kernel(spec, 80).ok
    assert os.environ["TRITON_INTERPRET"] == "1"  # restored after compiling


KERNEL_MODULE = """
import triton
import triton.language as tl


@triton.jit
def _twice(x):
    return x * 2


@triton.jit
def double_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, _twice(tl.load(x_ptr + offs)))


def aot_specs():
    return [{"name": "double", "fn": double_kernel, "signature": {"x_ptr": "*fp32"},
             "constexprs": {"BLOCK": 256}, "num_warps": 4, "expect_mma": EXPECT_MMA}]
"""


@pytest.fixture
def kernel_package(tmp_path, monkeypatch):
    """A throw-away package ``aotpkg`` with one kernel module calling a jit helper."""

    def make(expect_mma: bool) -> str:
        pkg = tmp_path / "aotpkg"
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        (pkg / "double.py").write_text(KERNEL_MODULE.replace("EXPECT_MMA", str(expect_mma)))
        (pkg / "no_specs.py").write_text("VALUE = 1\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        return "aotpkg"

    yield make
    for name in [n for n in sys.modules if n == "aotpkg" or n.startswith("aotpkg.")]:
        del sys.modules[name]


def test_discovery_ignores_the_interpreter_and_leaves_modules_alone(kernel_package, monkeypatch):
    import importlib

    package = kernel_package(expect_mma=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreted_module = importlib.import_module(package + ".double")
    assert not isinstance(interpreted_module.double_kernel, triton.runtime.jit.JITFunction)

    (spec,) = cc.discover_specs(package)
    assert spec["module"] == "aotpkg.double"
    assert isinstance(spec["fn"], triton.runtime.jit.JITFunction)
    assert sys.modules[package + ".double"] is interpreted_module
    assert sys.modules[package].double is interpreted_module
    assert cc.compile_kernel(spec, 90).ok  # the jit helper resolves to a JITFunction too
    assert os.environ["TRITON_INTERPRET"] == "1"


@pytest.mark.parametrize("expect_mma, status", [(False, 0), (True, 1)])
def test_command_line(kernel_package, capsys, expect_mma, status):
    package = kernel_package(expect_mma=expect_mma)
    assert cc.main(["--package", package, "--arch", "80"]) == status
    out = capsys.readouterr().out
    assert "double" in out and "sm_80" in out
    assert ("FAIL" in out) == bool(status)


# --------------------------------------------------------------------------- the package
def _discover() -> tuple[list[dict], str | None]:
    try:
        return cc.discover_specs(), None
    except Exception as exc:  # reported by test_package_kernels_import, not at collection
        return [], f"{type(exc).__name__}: {exc}"


PACKAGE_SPECS, DISCOVERY_ERROR = _discover()


def test_package_kernels_import():
    assert DISCOVERY_ERROR is None, DISCOVERY_ERROR


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", PACKAGE_SPECS, ids=[s["name"] for s in PACKAGE_SPECS])
def test_package_kernel_compiles(spec, arch):
    report = cc.compile_kernel(spec, arch)
    assert (report.spill_stores, report.spill_loads) == (0, 0), (
        f"{spec['module']}:{spec['name']} spills on {report.gpu_name}\n{report.ptxas_log}"
    )
    if spec["expect_mma"]:
        assert report.has_mma, f"{spec['name']}: no mma/wgmma in the {report.gpu_name} PTX"
    assert report.ok, report.problems()
