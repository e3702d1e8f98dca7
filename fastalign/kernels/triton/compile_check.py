"""Ahead-of-time compile check for the package's Triton kernels, no GPU needed.

Each kernel module in ``fastalign.kernels.triton`` exposes ``aot_specs()``; every spec is
compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` for
sm_80 and sm_90 (sm_90a, as Triton picks it), and the PTX is assembled again by Triton's own
ptxas with ``-v`` to read registers and spills.  Matrix kernels must show tensor-core
instructions (``mma.sync`` / ``wgmma.mma_async``) and no kernel may spill.

A spec is a dict::

    {
        "name": "region_word_fwd",        # label in reports
        "fn": kernel,                     # the @triton.jit function
        "signature": {"x_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr"},
        "constexprs": {"BLOCK": 128},     # values of the constexpr arguments
        "num_warps": 4,
        "expect_mma": True,               # the PTX must contain mma / wgmma
        # optional:
        "num_stages": 3,                  # default 3 (Triton's default)
        "divisibility": {"x_ptr": 16},    # tt.divisibility hints; default 16 on pointers
        "options": {"maxnreg": 128},      # any other triton.compile option
    }

Run ``python -m fastalign.kernels.triton.compile_check [--arch 80 90]`` for a table; the exit
status is non-zero when a kernel fails to compile, spills, or lacks an expected mma.

``TRITON_INTERPRET=1`` (set by test modules that run kernels on the CPU) does not change the
result: kernel modules are imported and compiled with it hidden, and when ``triton`` itself
was imported under the interpreter (its own ``tl.sum`` etc. are then interpreter objects and
cannot be lowered) the compile runs in one long-lived clean subprocess instead.  No CUDA
driver is touched: the target is given explicitly and ptxas only assembles.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import pickle
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastalign.kernels._ptxas import PtxasReport

PACKAGE = "fastalign.kernels.triton"
DEFAULT_ARCHS: tuple[int, ...] = (80, 90)
REQUIRED_KEYS = ("name", "fn", "signature", "constexprs", "num_warps", "expect_mma")

# Environment variables that would change what `triton.jit` / `triton.compile` produce here:
# the interpreter turns @triton.jit into a CPU-only object, and an arch override would
# silently compile for another GPU than the one asked for.
_SHADOWED_ENV = ("TRITON_INTERPRET", "TRITON_OVERRIDE_ARCH")
_SHADOWED_KNOBS = ("interpret", "override_arch")

# Tensor-core instructions: Ampere mma.sync (and its sparse form), Hopper wgmma, Blackwell
# tcgen05.  The look-behind keeps e.g. "wgmma.mma_async" from also matching as "mma.".
_MMA_RE = re.compile(r"(?<![\w.])(wgmma\.mma_async|mma(?:\.sp)?\.sync|tcgen05\.mma)")
_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_RE = re.compile(r"Used (\d+) registers")
_TARGET_RE = re.compile(r"^\s*\.target\s+(sm_\w+)", re.MULTILINE)


@dataclasses.dataclass
class KernelReport(PtxasReport):
    """What compiling one kernel spec for one architecture produced.

    ``registers`` / ``spill_*`` come from ``ptxas -v`` on the kernel's PTX (the
    ``CompiledKernel`` only learns them when loaded on a device); ``shared_bytes`` is the
    shared memory Triton allocates for the kernel.  ``error`` is set, and the numbers are
    zero, when the kernel did not compile.
    """

    has_mma: bool = False
    ptx_chars: int = 0
    mma_kind: str = ""
    gpu_name: str = ""
    cubin_bytes: int = 0
    compile_seconds: float = 0.0
    error: str | None = None
    ptxas_flags: tuple[str, ...] = ()
    ptxas_log: str = dataclasses.field(default="", repr=False)

    def problems(self) -> list[str]:
        """Reasons this kernel fails the check; empty when it passes."""
        if self.error is not None:
            first = self.error.strip().splitlines()[0] if self.error.strip() else "error"
            return [f"compile failed: {first}"]
        found = self.spill_problems()
        if self.expect_mma and not self.has_mma:
            found.append("no mma/wgmma in PTX")
        return found

    @property
    def ok(self) -> bool:
        """True when the kernel compiled, does not spill, and has mma where expected."""
        return not self.problems()


# --------------------------------------------------------------------------- environment
@contextlib.contextmanager
def interpreter_disabled() -> Iterator[None]:
    """Hide ``TRITON_INTERPRET`` (and ``TRITON_OVERRIDE_ARCH``) for the duration.

    Under the interpreter ``@triton.jit`` returns a CPU-only object and constexpr functions
    skip their wrapping, so both importing kernel modules and compiling them must happen
    with it off.  Values set through ``triton.knobs`` are hidden too, and everything is
    restored on exit, so test modules that run kernels under the interpreter are unaffected.
    """
    saved_env = {key: os.environ.pop(key) for key in _SHADOWED_ENV if key in os.environ}
    runtime = None
    saved_knobs: dict[str, Any] = {}
    try:
        from triton import knobs  # Triton >= 3.4

        runtime = knobs.runtime
        saved_knobs = {k: runtime.__dict__.pop(k) for k in _SHADOWED_KNOBS if k in vars(runtime)}
    except (ImportError, AttributeError):
        pass
    try:
        yield
    finally:
        for key in _SHADOWED_ENV:
            os.environ.pop(key, None)
        os.environ.update(saved_env)
        if runtime is not None:
            for key in _SHADOWED_KNOBS:
                runtime.__dict__.pop(key, None)
            runtime.__dict__.update(saved_knobs)


def _as_jit_function(fn: Any) -> Any:
    """The ``JITFunction`` behind ``fn`` (unwrapping autotune / heuristics wrappers).

    A kernel defined while ``TRITON_INTERPRET=1`` was set is an ``InterpretedFunction``; it
    is rebuilt as a ``JITFunction`` from the same Python function.  That suffices for a
    self-contained kernel; kernels calling other ``@triton.jit`` helpers need their module
    imported with the interpreter off, which :func:`discover_specs` does.
    """
    from triton.runtime.jit import JITFunction

    seen = 0
    while not isinstance(fn, JITFunction) and seen < 8:
        inner = getattr(fn, "fn", None)
        if inner is None:
            break
        if type(fn).__name__ == "InterpretedFunction" and not hasattr(inner, "fn"):
            kwargs = dict(getattr(fn, "kwargs", {}))
            try:
                return JITFunction(inner, **kwargs)
            except TypeError:
                return JITFunction(inner)
        fn = inner
        seen += 1
    if not isinstance(fn, JITFunction):
        raise TypeError(f"expected a @triton.jit function, got {type(fn).__name__}")
    return fn


# --------------------------------------------------------------------------- ptxas
def _ptxas_path(arch: int) -> str:
    """Path of the ptxas Triton itself uses for ``arch`` (3.2 through 3.9 spell it apart)."""
    from triton.backends.nvidia import compiler as nv

    get_ptxas = getattr(nv, "get_ptxas", None)
    if get_ptxas is not None:  # Triton >= 3.5: per-arch tool (ptxas / ptxas-blackwell)
        try:
            return get_ptxas(arch).path
        except TypeError:
            return get_ptxas().path
    try:  # Triton 3.4
        from triton import knobs

        return knobs.nvidia.ptxas.path
    except (ImportError, AttributeError):
        pass
    path_to_binary = getattr(nv, "_path_to_binary", None)
    if path_to_binary is not None:  # Triton 3.2 / 3.3
        return path_to_binary("ptxas")[0]
    return str(Path(nv.__file__).parent / "bin" / "ptxas")


@functools.cache
def _triton_passes_reg_alloc_opt() -> bool:
    """Whether this Triton adds ``--regAllocOptLevel=2`` when it runs ptxas (3.9 does)."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend

        return "--regAllocOptLevel=2" in inspect.getsource(CUDABackend.make_cubin)
    except (ImportError, AttributeError, OSError, TypeError):
        return False


def _ptxas_flags(metadata: Any) -> list[str]:
    """The ptxas options Triton used for this kernel that can change register allocation."""
    flags = []
    if not getattr(metadata, "enable_fp_fusion", True):
        flags.append("--fmad=false")
    if _triton_passes_reg_alloc_opt():
        flags.append("--regAllocOptLevel=2")
    extra = getattr(metadata, "ptx_options", None)
    if extra:
        flags += extra.split()
    return flags


_PTXAS_CACHE: dict[str, str] = {}


def run_ptxas_verbose(ptx: str, gpu_name: str, ptxas: str, flags: Sequence[str] = ()) -> str:
    """Assemble ``ptx`` with ``ptxas -v --gpu-name gpu_name`` and return its log (cached)."""
    key = hashlib.sha256("\0".join([ptx, gpu_name, ptxas, *flags]).encode()).hexdigest()
    if key in _PTXAS_CACHE:
        return _PTXAS_CACHE[key]
    with tempfile.TemporaryDirectory(prefix="fastalign_aot_") as tmp:
        src, obj = Path(tmp) / "kernel.ptx", Path(tmp) / "kernel.cubin"
        src.write_text(ptx)
        cmd = [ptxas, "-v", *flags, f"--gpu-name={gpu_name}", str(src), "-o", str(obj)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}): {' '.join(cmd)}\n{log}")
    _PTXAS_CACHE[key] = log
    return log


def parse_ptxas_log(log: str) -> tuple[int, int, int]:
    """``(registers, spill_store_bytes, spill_load_bytes)`` from a ``ptxas -v`` log.

    Registers are the maximum over the functions in the module, spills the sum (a
    non-inlined helper that spills counts as much as the kernel itself).
    """
    regs = [int(m) for m in _REGS_RE.findall(log)]
    if not regs:
        raise RuntimeError(f"could not find 'Used N registers' in the ptxas log:\n{log}")
    spills = _SPILL_RE.findall(log)
    return max(regs), sum(int(s) for s, _ in spills), sum(int(ld) for _, ld in spills)


# --------------------------------------------------------------------------- compile
def _validate(spec: dict) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in spec]
    if missing:
        raise ValueError(f"kernel spec {spec.get('name', '?')!r} lacks keys {missing}")


def _full_signature(spec: dict, arg_names: list[str]) -> dict[str, str]:
    """Signature over all arguments, in order, with every constexpr typed ``"constexpr"``."""
    signature, constexprs = spec["signature"], spec["constexprs"]
    unknown = sorted((set(signature) | set(constexprs)) - set(arg_names))
    if unknown:
        raise ValueError(
            f"kernel spec {spec['name']!r}: {unknown} are not arguments of "
            f"{spec['fn'].__name__}{tuple(arg_names)}"
        )
    full = {}
    for arg in arg_names:
        if arg in constexprs:
            full[arg] = "constexpr"
        elif arg in signature and signature[arg] != "constexpr":
            full[arg] = signature[arg]
        else:
            raise ValueError(
                f"kernel spec {spec['name']!r}: argument {arg!r} has "
                + ("no value in 'constexprs'" if arg in signature else "no type in 'signature'")
            )
    return full


def _make_source(fn: Any, spec: dict, signature: dict[str, str]) -> ASTSource:
    """An ``ASTSource`` for this Triton (``constexprs=`` since 3.3, ``constants=`` in 3.2)."""
    arg_names = list(signature)
    hints = {a: 16 for a, ty in signature.items() if ty.startswith("*")}
    hints.update(spec.get("divisibility", {}))
    hints = {a: v for a, v in hints.items() if v and v > 1}
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        attrs = {(arg_names.index(a),): [["tt.divisibility", v]] for a, v in hints.items()}
        return ASTSource(fn, signature, constexprs=dict(spec["constexprs"]), attrs=attrs)
    attrs = None  # Triton 3.2: hints go through an AttrsDescriptor (best effort)
    try:
        from triton.backends.compiler import AttrsDescriptor

        attrs = AttrsDescriptor.from_hints({arg_names.index(a): v for a, v in hints.items()})
    except (ImportError, AttributeError, TypeError):
        pass
    return ASTSource(fn, signature, constants=dict(spec["constexprs"]), attrs=attrs)


def triton_imported_under_interpreter() -> bool:
    """True when ``triton`` was imported with ``TRITON_INTERPRET=1`` in this process.

    Triton's own ``@jit`` library functions (``tl.sum``, ``tl.cdiv``, ...) are then
    interpreter objects that the compiler cannot lower, so nothing can be compiled in this
    process any more; :func:`compile_kernel` hands such work to a clean subprocess.
    """
    import triton.language.standard as standard
    from triton.runtime.jit import JITFunction

    for value in vars(standard).values():
        if type(value).__name__ == "InterpretedFunction":
            return True
        if isinstance(value, JITFunction):
            return False
    return False


def compile_kernel(spec: dict, arch: int) -> KernelReport:
    """Compile one kernel spec for ``sm_<arch>`` without a GPU and report on the result.

    The compile ignores ``TRITON_INTERPRET``: kernels defined under the interpreter are
    rebuilt as ``JITFunction``s, and if ``triton`` itself was imported under the
    interpreter the work runs in a subprocess with a clean environment (the kernel must then
    be reachable as a module-level name).

    Args:
        spec: a kernel spec as described in the module docstring.
        arch: compute capability as an integer, e.g. 80 or 90.

    Returns:
        A :class:`KernelReport` with registers and spills from ``ptxas -v``.

    Raises:
        Whatever Triton or ptxas raise when the kernel does not compile (``AOTWorkerError``
        when it ran in the subprocess), and ``ValueError`` for a malformed spec.
        (:func:`check_all` turns those into failing reports.)
    """
    _validate(spec)
    with interpreter_disabled():
        fn = _as_jit_function(spec["fn"])
    signature = _full_signature(spec, list(fn.arg_names))
    if triton_imported_under_interpreter():
        return _compile_in_worker(fn, spec, int(arch))
    return _compile_here(fn, spec, signature, int(arch))


def _compile_here(fn: Any, spec: dict, signature: dict[str, str], arch: int) -> KernelReport:
    start = time.perf_counter()
    with interpreter_disabled():
        source = _make_source(fn, spec, signature)
        options = {
            "num_warps": int(spec["num_warps"]),
            "num_stages": int(spec.get("num_stages", 3)),
            # Explicit, as at launch on the users' Triton versions (also silences 3.9's
            # warning about the default changing in 3.10).
            "enable_fp_fusion": True,
            **spec.get("options", {}),
        }
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = kernel.asm["ptx"]
    cubin = kernel.asm.get("cubin", b"")
    target = _TARGET_RE.search(ptx)
    gpu_name = target.group(1) if target else f"sm_{arch}"
    flags = _ptxas_flags(kernel.metadata)
    log = run_ptxas_verbose(ptx, gpu_name, _ptxas_path(arch), flags)
    registers, spill_stores, spill_loads = parse_ptxas_log(log)
    kinds = sorted({m.split(".")[0] for m in _MMA_RE.findall(ptx)})
    return KernelReport(
        name=str(spec["name"]),
        arch=arch,
        registers=registers,
        spill_stores=spill_stores,
        spill_loads=spill_loads,
        shared_bytes=int(getattr(kernel.metadata, "shared", 0) or 0),
        has_mma=bool(kinds),
        ptx_chars=len(ptx),
        expect_mma=bool(spec["expect_mma"]),
        mma_kind="+".join(kinds),
        gpu_name=gpu_name,
        cubin_bytes=len(cubin),
        compile_seconds=time.perf_counter() - start,
        ptxas_flags=tuple(flags),
        ptxas_log=log,
    )


# --------------------------------------------------------------------------- clean worker
class AOTWorkerError(RuntimeError):
    """A compile that ran in the clean subprocess failed there."""


class _Worker:
    """One long-lived ``python -m ...compile_check --worker`` without TRITON_INTERPRET.

    Jobs and replies are length-prefixed pickles on the worker's stdin and on a copy of its
    original stdout (the worker points fd 1 at stderr, so stray prints cannot corrupt them).
    """

    proc: subprocess.Popen | None = None

    @classmethod
    def call(cls, job: dict) -> dict:
        payload = pickle.dumps(job)
        if cls.proc is None or cls.proc.poll() is not None:
            cls._start()
        assert cls.proc is not None and cls.proc.stdin is not None and cls.proc.stdout
        try:
            cls.proc.stdin.write(len(payload).to_bytes(8, "little") + payload)
            cls.proc.stdin.flush()
            header = cls.proc.stdout.read(8)
            if len(header) < 8:
                raise EOFError
            return pickle.loads(cls.proc.stdout.read(int.from_bytes(header, "little")))
        except (EOFError, BrokenPipeError, OSError) as exc:
            cls.stop()
            raise AOTWorkerError(f"the compile worker died ({exc!r}); see its stderr") from exc

    @classmethod
    def _start(cls) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _SHADOWED_ENV}
        root = str(Path(__file__).resolve().parents[3])  # the folder holding fastalign/
        paths = [root, *(p or os.getcwd() for p in sys.path)]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        cls.proc = subprocess.Popen(
            [sys.executable, "-m", "fastalign.kernels.triton.compile_check", "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        atexit.register(cls.stop)

    @classmethod
    def stop(cls) -> None:
        proc, cls.proc = cls.proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.stdin.close()  # the worker exits at end of input
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            proc.stdout.close()


def _compile_in_worker(fn: Any, spec: dict, arch: int) -> KernelReport:
    raw = fn.fn
    qualname = raw.__qualname__
    if "<locals>" in qualname:
        raise AOTWorkerError(
            f"{spec['name']}: triton was imported with TRITON_INTERPRET=1, so the kernel is "
            f"compiled in a subprocess, which cannot reach {raw.__module__}.{qualname}; "
            "define the kernel at module level"
        )
    try:
        source_file = inspect.getsourcefile(raw)
    except TypeError:
        source_file = None
    job = {
        "module": raw.__module__,
        "qualname": qualname,
        "file": source_file,
        "sys_path": [p or os.getcwd() for p in sys.path],
        "spec": {k: v for k, v in spec.items() if k != "fn"},
        "arch": arch,
    }
    reply = _Worker.call(job)
    if "error" in reply:
        raise AOTWorkerError(f"{reply['error']}\n(in the compile worker)\n{reply['traceback']}")
    return KernelReport(**reply["report"])


def _worker_import(module_name: str, file: str | None) -> Any:
    """Import ``module_name`` in the worker; again if its file moved or changed since."""
    name = module_name
    if module_name == "__main__":  # a script's kernels: load the script under another name
        name = "_aot_main_" + hashlib.sha256(str(file).encode()).hexdigest()[:12]
    module = sys.modules.get(name)
    if module is not None:
        if file is None:
            return module
        if os.path.realpath(getattr(module, "__file__", "") or "") != os.path.realpath(file):
            top = name.split(".")[0]  # same name, other folder: drop the whole old package
            stale = [n for n in sys.modules if _in_package(n, top)]
        elif os.path.getmtime(file) > getattr(module, "__aot_loaded_at__", float("inf")):
            stale = [name]  # edited since it was imported here
        else:
            return module
        for stale_name in stale:
            if stale_name != "__main__":
                del sys.modules[stale_name]
        importlib.invalidate_caches()
    try:
        if name != module_name:
            raise ImportError("__main__ is loaded from its file")
        module = importlib.import_module(name)
    except ImportError:
        if file is None:
            raise
        spec = importlib.util.spec_from_file_location(name, file)
        if spec is None or spec.loader is None:
            raise
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    with contextlib.suppress(AttributeError, TypeError):
        module.__aot_loaded_at__ = time.time()
    return module


def _worker_job(job: dict) -> KernelReport:
    for path in reversed(job["sys_path"]):
        if path not in sys.path:
            sys.path.insert(0, path)
    obj = _worker_import(job["module"], job["file"])
    for part in job["qualname"].split("."):
        obj = getattr(obj, part)
    with interpreter_disabled():
        fn = _as_jit_function(obj) if hasattr(obj, "fn") or hasattr(obj, "arg_names") else None
        if fn is None:  # a plain function that the parent had wrapped with triton.jit
            fn = triton.jit(obj)
    spec = {**job["spec"], "fn": fn}
    return _compile_here(fn, spec, _full_signature(spec, list(fn.arg_names)), job["arch"])


def _worker_main() -> int:
    """Serve compile jobs from stdin until it closes (see :class:`_Worker`)."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    jobs = sys.stdin.buffer
    while True:
        header = jobs.read(8)
        if len(header) < 8:
            return 0
        job = pickle.loads(jobs.read(int.from_bytes(header, "little")))
        try:
            reply: dict = {"report": dataclasses.asdict(_worker_job(job))}
        except BaseException as exc:  # sent back and raised in the parent
            reply = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        data = pickle.dumps(reply)
        replies.write(len(data).to_bytes(8, "little") + data)
        replies.flush()


# --------------------------------------------------------------------------- discovery
def _in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@contextlib.contextmanager
def _isolated_import(package: str) -> Iterator[None]:
    """Import ``package`` afresh and leave ``sys.modules`` exactly as it was afterwards.

    Modules already imported may hold interpreter objects (imported with
    ``TRITON_INTERPRET=1``), and modules imported here must not leak JIT objects to tests
    that import them later under the interpreter.
    """
    saved = {n: m for n, m in sys.modules.items() if _in_package(n, package)}
    parent_name, _, child = package.rpartition(".")
    parent = sys.modules.get(parent_name) if parent_name else None
    had_child = parent is not None and child in vars(parent)
    old_child = vars(parent).get(child) if parent is not None else None
    for name in saved:
        del sys.modules[name]
    try:
        yield
    finally:
        for name in [n for n in sys.modules if _in_package(n, package)]:
            del sys.modules[name]
        sys.modules.update(saved)
        if parent is not None:
            if had_child:
                setattr(parent, child, old_child)
            elif child in vars(parent):
                delattr(parent, child)


def discover_specs(package: str = PACKAGE) -> list[dict]:
    """Collect ``aot_specs()`` from every module of ``package`` (this module excluded).

    Modules are imported afresh with the interpreter off (see :func:`interpreter_disabled`),
    so the specs hold real ``JITFunction`` objects whatever ``TRITON_INTERPRET`` says, and
    ``sys.modules`` is left as it was.  Each returned spec gains a ``"module"`` key.

    Raises:
        ImportError / any exception from a module that fails to import or whose
        ``aot_specs()`` fails, with the module named in the message.
    """
    specs: list[dict] = []
    with interpreter_disabled(), _isolated_import(package):
        pkg = importlib.import_module(package)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=package + "."):
            if info.name == __name__ or info.name.rpartition(".")[2] == "compile_check":
                continue
            try:
                module = importlib.import_module(info.name)
            except Exception as exc:
                raise ImportError(f"{info.name}: import failed: {exc!r}") from exc
            aot_specs = getattr(module, "aot_specs", None)
            if not callable(aot_specs):
                continue
            try:
                found = list(aot_specs())
            except Exception as exc:
                raise RuntimeError(f"{info.name}.aot_specs() failed: {exc!r}") from exc
            for spec in found:
                _validate(spec)
                specs.append({**spec, "module": info.name})
    return specs


def check_all(
    archs: Iterable[int] = DEFAULT_ARCHS, specs: list[dict] | None = None
) -> list[KernelReport]:
    """Compile every spec (default: :func:`discover_specs`) for every arch in ``archs``.

    Compile errors do not propagate: they come back as reports with ``error`` set, so
    ``all(r.ok for r in check_all())`` is the pass/fail verdict.
    """
    if specs is None:
        specs = discover_specs()
    reports = []
    for spec in specs:
        for arch in archs:
            try:
                reports.append(compile_kernel(spec, arch))
            except Exception as exc:  # reported, not raised: the table shows every kernel
                reports.append(
                    KernelReport(
                        name=str(spec.get("name", "?")),
                        arch=int(arch),
                        expect_mma=bool(spec.get("expect_mma", False)),
                        error=f"{type(exc).__name__}: {exc}",
                    )
                )
    return reports


def format_table(reports: Sequence[KernelReport]) -> str:
    """A plain-text table: kernel, arch, regs, spills, smem, mma, verdict."""
    header = ("kernel", "arch", "regs", "spills (st/ld B)", "smem B", "mma", "verdict")
    rows = [header]
    for r in reports:
        compiled = r.error is None
        mma = ("yes" + (f" ({r.mma_kind})" if r.mma_kind else "")) if r.has_mma else "no"
        rows.append(
            (
                r.name,
                r.gpu_name or f"sm_{r.arch}",
                str(r.registers) if compiled else "-",
                f"{r.spill_stores}/{r.spill_loads}" if compiled else "-",
                str(r.shared_bytes) if compiled else "-",
                (mma if compiled else "-") + (" (expected)" if r.expect_mma else ""),
                "ok" if r.ok else "FAIL: " + "; ".join(r.problems()),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths)]
        lines.append("  ".join([*cells, row[-1]]))
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 7)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m fastalign.kernels.triton.compile_check",
        description="Compile every Triton kernel ahead of time and check regs/spills/mma.",
    )
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS))
    parser.add_argument("--package", default=PACKAGE, help="package to scan for aot_specs()")
    parser.add_argument("-k", dest="keyword", default="", help="only kernels whose name has this")
    parser.add_argument("-v", "--verbose", action="store_true", help="print errors in full")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker_main()

    try:
        specs = discover_specs(args.package)
    except Exception as exc:
        print(f"discovery failed: {exc}", file=sys.stderr)
        return 2
    specs = [s for s in specs if args.keyword in str(s["name"])]
    if not specs:
        print(f"no kernels with aot_specs() found in {args.package}")
        return 0
    start = time.perf_counter()
    reports = check_all(args.arch, specs)
    print(format_table(reports))
    failed = [r for r in reports if not r.ok]
    print(
        f"\n{len(reports) - len(failed)}/{len(reports)} passed "
        f"(triton {triton.__version__}, {time.perf_counter() - start:.1f} s)"
    )
    if args.verbose:
        for r in failed:
            if r.error:
                print(f"\n--- {r.name} sm_{r.arch} ---\n{r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
