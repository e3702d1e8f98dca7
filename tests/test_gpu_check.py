"""benchmarks/gpu_check.py (``make gpu-check``) without a GPU: the no-GPU exit, the step runner,
and the whole run with injected step results down to its report."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gpu_check  # dataclasses look their module up there
_spec.loader.exec_module(gpu_check)

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_cuda_gpu" name="test_a[float32]" time="0.1"/>
<testcase classname="tests.test_cuda_gpu" name="test_b" time="0.2">
<failure message="AssertionError: Tensor-likes are not close!&#10;Mismatched elements: 3">trace
</failure></testcase>
<testcase classname="tests.test_cuda_gpu" name="test_c"><skipped message="needs x"/></testcase>
<testcase classname="tests.test_prototypes" name="test_d"><error message="fixture failed"/>
</testcase>
</testsuite></testsuites>
"""
BENCH_CSV = """op,N,D,mode,backend,time_ms,peak_MiB,error
dimension_correlation_loss,256,512,barlow,reference,1.0,2.0,
dimension_correlation_loss,256,512,barlow,triton,,,RuntimeError: boom
"""
PROBED = {
    "python": "3.11.7",
    "torch": "2.99.0",
    "torch_cuda": "12.8",
    "triton": "3.9.0",
    "gpu": "NVIDIA Fake 141GB",
    "capability": "9.0",
    "extension_cuda": True,
}


def test_no_gpu_exits_at_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)
    monkeypatch.setattr(gpu_check, "detect_gpu", lambda: None)
    assert gpu_check.main() == 0
    assert "no NVIDIA GPU" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_run_step_logs_and_kills_on_timeout(tmp_path):
    ok = gpu_check.run_step("ok", [sys.executable, "-c", "print('hi')"], tmp_path / "ok.log", 60)
    assert (ok.status, ok.log) == ("passed", "ok.log")
    assert "hi" in (tmp_path / "ok.log").read_text()
    failed = gpu_check.run_step("bad", [sys.executable, "-c", "exit(3)"], tmp_path / "b.log", 60)
    assert (failed.status, failed.detail) == ("failed", "exit 3")
    slow = [sys.executable, "-c", "import time; time.sleep(60)"]
    late = gpu_check.run_step("slow", slow, tmp_path / "slow.log", 0.5)
    assert late.status == "timed out" and late.seconds < 30


def test_a_failing_test_step_still_runs_the_benchmark_and_reports(monkeypatch, tmp_path):
    ran = []

    def fake_run_step(name, cmd, log, timeout, env=None):
        ran.append(name)
        cmd = [str(c) for c in cmd]
        if name == "gpu tests":
            junit = next(c for c in cmd if c.startswith("--junitxml="))
            Path(junit.split("=", 1)[1]).write_text(JUNIT)
            assert "TRITON_INTERPRET" not in env and env["PYTHONPATH"].startswith(str(tmp_path))
            return gpu_check.Step(name, "failed", 12.0, log.name, "exit 1")
        if name == "benchmark":
            Path(cmd[cmd.index("--csv") + 1]).write_text(BENCH_CSV)
        if name == "build":
            assert env["TORCH_CUDA_ARCH_LIST"] == "9.0" and env["FASTALIGN_FORCE_CUDA"] == "1"
        return gpu_check.Step(name, "passed", 3.0, log.name)

    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)
    monkeypatch.setattr(gpu_check, "detect_gpu", lambda: "NVIDIA Fake 141GB")
    monkeypatch.setattr(
        gpu_check,
        "prepare_python",
        lambda logs, timeout: (sys.executable, gpu_check.Step("environment", "passed")),
    )
    monkeypatch.setattr(gpu_check, "probe", lambda python, env=None: PROBED)
    monkeypatch.setattr(gpu_check, "run_step", fake_run_step)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gpu_check.main() == 1
    assert ran == ["build", "gpu tests", "benchmark"]
    (report,) = tmp_path.glob("gpu-results/*/report.md")
    text = report.read_text()
    assert "- GPU: NVIDIA Fake 141GB (compute capability 9.0" in text
    assert "- torch 2.99.0 (CUDA 12.8), triton 3.9.0" in text
    assert "| gpu tests | failed | 12 s | tests.log | exit 1 |" in text
    assert "## GPU tests: 1 passed, 1 failed, 1 errors, 1 skipped" in text
    failed = "- FAILED tests.test_cuda_gpu::test_b: AssertionError: Tensor-likes are not close!"
    assert failed in text
    assert "- FAILED tests.test_prototypes::test_d: fixture failed" in text
    assert (
        "| dimension_correlation_loss | 256 | 512 | barlow | 1.000 ms, 2.0 MiB "
        "| error: RuntimeError: boom | - |"
    ) in text
