"""``make gpu-check``: everything that needs a real NVIDIA GPU, in one run of a few minutes.

1. environment: a Python with a CUDA build of torch. ``GPU_CHECK_PYTHON`` if set; else
   ``.venv-gpu`` if it exists; else ``python3`` itself when it has everything; else a new
   ``.venv-gpu`` made with ``--system-site-packages`` (so the machine's own torch and triton
   are used) into which pip installs only what is missing (torch itself only when absent or
   CPU-only, as ``GPU_CHECK_TORCH``, default ``torch``).
2. build: the extension in place with its CUDA kernels (``FASTALIGN_FORCE_CUDA=1``,
   ``TORCH_CUDA_ARCH_LIST`` = the device's compute capability).
3. gpu tests: every test marked ``gpu`` (JUnit XML).
4. benchmark: benchmarks/bench_cuda_backends.py, reference vs Triton vs CUDA at the training
   shapes, time and memory (CSV).

A failing step never stops the later ones. Everything lands in gpu-results/<UTC time>/:
report.md (what ran, what passed, the GPU, torch / triton / CUDA versions, the timings),
bench_cuda_backends.csv, junit.xml and one log per step. Steps share a budget of
``GPU_CHECK_BUDGET_S`` seconds (default 470, inside 8 minutes), each killed at its share.

Exit status: 0 when every step passed, 1 when one failed. On a machine without an NVIDIA GPU
it exits at once with 0, saying that nothing ran and writing nothing: so that `.ci/run` can
call it everywhere (through make any failure reads 2 anyway, so no third code would survive).
Standard library only: it runs before any environment exists.

    python3 benchmarks/gpu_check.py
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-gpu"
# import name -> what pip installs for it
REQUIRED = {
    "torch": os.environ.get("GPU_CHECK_TORCH", "torch"),
    "triton": "triton",
    "numpy": "numpy",
    "yaml": "pyyaml",
    "tqdm": "tqdm",
    "pytest": "pytest",
    "setuptools": "setuptools",
    "ninja": "ninja",  # without it the extension compiles one file at a time
}
BACKENDS = ("reference", "triton", "cuda")

PROBE = """
import importlib.util, json, sys
info = {"python": sys.version.split()[0],
        "missing": [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]}
if "torch" not in info["missing"]:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    from torch.utils.cpp_extension import CUDA_HOME
    info["cuda_home"] = CUDA_HOME
if "triton" not in info["missing"]:
    import triton
    info["triton"] = triton.__version__
try:
    import fastalign
    from fastalign._backends import extension_has_cuda, extension_loaded
    info["extension"] = extension_loaded()
    info["extension_cuda"] = extension_has_cuda()
    info["backends"] = fastalign.backends()
except Exception as exc:
    info["fastalign_error"] = repr(exc)
print(json.dumps(info))
"""


@dataclass
class Step:
    name: str
    status: str  # "passed", "failed", "timed out" or "skipped"
    seconds: float = 0.0
    log: str = ""
    detail: str = ""


def detect_gpu() -> str | None:
    """The first NVIDIA GPU's name according to nvidia-smi (or, in a container without it, to
    python3's torch), or None."""
    if shutil.which("nvidia-smi") is None:
        return probe(sys.executable).get("gpu")
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = out.stdout.strip().splitlines() if out.returncode == 0 else []
    return names[0].strip() if names else None


def run_step(name, cmd, log: Path, timeout: float, env=None) -> Step:
    """Runs ``cmd`` with its output in ``log``; on timeout kills its whole process group (nvcc,
    ninja, pytest workers) so that the next step starts on an idle machine."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log.open("w") as out:
        out.write("$ " + " ".join(str(c) for c in cmd) + "\n")
        out.flush()
        if timeout <= 0:
            return Step(name, "skipped", 0.0, log.name, "no time left in the budget")
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return Step(
                name, "timed out", time.monotonic() - start, log.name, f"after {timeout:.0f} s"
            )
    status = "passed" if rc == 0 else "failed"
    return Step(name, status, time.monotonic() - start, log.name, "" if rc == 0 else f"exit {rc}")


def probe(python: str, env=None) -> dict:
    """What ``python`` has: versions, the GPU, missing modules, fastalign's backends."""
    try:
        out = subprocess.run(
            [python, "-c", PROBE, *REQUIRED],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if out.returncode != 0:
            return {"error": out.stderr.strip()[-2000:]}
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, IndexError, ValueError) as exc:
        return {"error": repr(exc)}


def fits(info: dict) -> bool:
    """A CUDA torch and every module but ninja (without it the build is only slower)."""
    missing = set(info.get("missing", ["torch"])) - {"ninja"}
    return not missing and bool(info.get("torch_cuda"))


def prepare_python(logs: Path, timeout: float) -> tuple[str, Step]:
    """The Python the other steps run, and the environment step's result."""
    log = logs / "environment.log"
    if os.environ.get("GPU_CHECK_PYTHON"):
        return os.environ["GPU_CHECK_PYTHON"], Step("environment", "passed", 0.0, log.name)
    venv_python = VENV / "bin" / "python"
    if not venv_python.exists():
        if fits(probe(sys.executable)):
            return sys.executable, Step("environment", "passed", 0.0, log.name, "python3 as is")
        made = run_step(
            "environment",
            [sys.executable, "-m", "venv", "--system-site-packages", VENV],
            log,
            timeout,
        )
        if made.status != "passed":
            return sys.executable, made
    info = probe(str(venv_python))
    wanted = [REQUIRED[m] for m in info.get("missing", list(REQUIRED))]
    if "torch" not in info.get("missing", []) and not info.get("torch_cuda"):
        wanted.append(REQUIRED["torch"])  # a CPU-only torch: a CUDA build shadows it
    if not wanted:
        return str(venv_python), Step("environment", "passed", 0.0, log.name, VENV.name)
    step = run_step(
        "environment",
        [venv_python, "-m", "pip", "install", "-q", *wanted],
        log,
        timeout,
    )
    step.detail = f"pip install {' '.join(wanted)} into {VENV.name}: {step.detail or 'ok'}"
    return str(venv_python), step


def summarize_junit(path: Path) -> dict:
    """Counts and failed tests (name, first line of the message) of a JUnit XML file."""
    summary = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    if not path.exists():
        return summary
    for case in ET.parse(path).getroot().iter("testcase"):
        summary["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = next((child for child in case if child.tag in ("failure", "error")), None)
        if outcome is not None:
            summary["failed" if outcome.tag == "failure" else "errors"] += 1
            message = (outcome.get("message") or outcome.text or "").strip().splitlines()
            summary["failures"].append((name, message[0] if message else outcome.tag))
        elif case.find("skipped") is not None:
            summary["skipped"] += 1
        else:
            summary["passed"] += 1
    return summary


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def benchmark_table(rows: list[dict]) -> list[str]:
    """One markdown row per (op, N, D, mode): each backend's median time and peak memory."""
    cases: dict[tuple, dict] = {}
    for row in rows:
        key = (row["op"], row["N"], row["D"], row["mode"])
        if row.get("error"):
            cell = f"error: {row['error'][:80]}"
        else:
            cell = f"{float(row['time_ms']):.3f} ms, {float(row['peak_MiB']):.1f} MiB"
        cases.setdefault(key, {})[row["backend"]] = cell
    lines = ["| op | N | D | mode | " + " | ".join(BACKENDS) + " |", "|---" * 7 + "|"]
    for (op, n, d, mode), cells in cases.items():
        backends = " | ".join(cells.get(b, "-") for b in BACKENDS)
        lines.append(f"| {op} | {n} | {d} | {mode} | {backends} |")
    return lines


def write_report(out: Path, env: dict, steps: list[Step], junit: dict, bench: list[dict]) -> Path:
    """out/report.md from what the steps left; returns its path."""
    yes_no = {True: "yes", False: "no", None: "unknown"}
    lines = [
        f"# fastalign GPU check, {env.get('date', '?')}",
        "",
        f"- commit: {env.get('commit', 'unknown')}",
        f"- GPU: {env.get('gpu', 'unknown')} (compute capability {env.get('capability', '?')}, "
        f"driver {env.get('driver', '?')})",
        f"- torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda', '?')}), triton "
        f"{env.get('triton', '?')}, nvcc {env.get('nvcc', '?')}, Python {env.get('python', '?')}",
        f"- fastalign._C with CUDA kernels: {yes_no[env.get('extension_cuda')]}",
        "",
        "## Steps",
        "",
        "| step | status | time | log | detail |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {s.name} | {s.status} | {s.seconds:.0f} s | {s.log} | {s.detail} |" for s in steps
    ]
    lines += [
        "",
        f"## GPU tests: {junit['passed']} passed, {junit['failed']} failed, {junit['errors']} "
        f"errors, {junit['skipped']} skipped (junit.xml)",
        "",
    ]
    lines += [f"- FAILED {name}: {message}" for name, message in junit["failures"]]
    lines += ["", "## Benchmark (bench_cuda_backends.csv): median time, peak memory", ""]
    lines += benchmark_table(bench) if bench else ["no benchmark results"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _command_output(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def describe(info: dict) -> dict:
    """The report's header fields from a probe and the machine's tools."""
    env = {k: info.get(k) for k in ("python", "torch", "torch_cuda", "triton", "gpu", "capability")}
    env["extension_cuda"] = info.get("extension_cuda")
    driver = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    env["driver"] = driver.splitlines()[0] if driver else "unknown"
    nvcc = Path(info.get("cuda_home") or "/nonexistent") / "bin" / "nvcc"
    release = _command_output([str(nvcc), "--version"]).splitlines()
    env["nvcc"] = release[-1] if release else "unknown"
    commit = _command_output(["git", "rev-parse", "--short", "HEAD"])
    dirty = _command_output(["git", "status", "--porcelain", "--untracked-files=no"])
    env["commit"] = commit + (" (with uncommitted changes)" if dirty not in ("", "unknown") else "")
    return env


def main() -> int:
    gpu = detect_gpu()
    if gpu is None:
        print("gpu-check: no NVIDIA GPU here (nvidia-smi and torch see none); nothing ran.")
        return 0
    started = time.monotonic()
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S", "470"))

    def left(reserve: float = 0.0) -> float:
        return budget - (time.monotonic() - started) - reserve

    now = datetime.datetime.now(datetime.timezone.utc)
    out = ROOT / "gpu-results" / now.strftime("%Y-%m-%dT%H%M%SZ")
    out.mkdir(parents=True)
    print(f"gpu-check on {gpu}: results in {out}", flush=True)
    python, env_step = prepare_python(out, min(120.0, left(300)))
    steps = [env_step]
    run_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled Triton
    run_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), run_env.get("PYTHONPATH")]))
    info = probe(python, run_env)
    arch = info.get("capability") or os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    build_env = dict(run_env, FASTALIGN_FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=arch)
    build_env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    build_cmd = [python, "setup.py", "build_ext", "--inplace", "--build-temp", "build/gpu-check"]
    steps.append(run_step("build", build_cmd, out / "build.log", min(240.0, left(180)), build_env))
    info = probe(python, run_env)  # again: now with the extension
    if steps[-1].status == "passed" and not info.get("extension_cuda"):
        backends = info.get("backends", {})
        why = backends.get("cpu") if backends.get("cpu") != "available" else backends.get("cuda")
        steps[-1].status, steps[-1].detail = "failed", f"no CUDA kernels: {why} (CUDA_HOME?)"
    print(f"{steps[-1].name}: {steps[-1].status}", flush=True)
    junit = out / "junit.xml"
    test_cmd = [python, "-m", "pytest", "tests", "-m", "gpu", "-q", "-rfE", f"--junitxml={junit}"]
    steps.append(run_step("gpu tests", test_cmd, out / "tests.log", left(100), run_env))
    print(f"{steps[-1].name}: {steps[-1].status}", flush=True)
    csv_path = out / "bench_cuda_backends.csv"
    bench_cmd = [python, "benchmarks/bench_cuda_backends.py", "--csv", csv_path]
    steps.append(run_step("benchmark", bench_cmd, out / "bench.log", left(5), run_env))
    env = describe(info)
    env["date"] = now.strftime("%Y-%m-%d %H:%M UTC")
    env["gpu"] = info.get("gpu") or gpu
    report = write_report(out, env, steps, summarize_junit(junit), read_rows(csv_path))
    print(report.read_text())
    print(f"written to {report}")
    return 0 if all(step.status == "passed" for step in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
