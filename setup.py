"""Builds fastalign._C: C++ kernels always, CUDA kernels when CUDA is available or
FASTALIGN_FORCE_CUDA=1 (architectures from TORCH_CUDA_ARCH_LIST). FASTALIGN_LINK_ONLY=1
(make cuda-link-check): every compiler at -O0, for a build that only has to compile and link."""

import glob
import os
import sys
import sysconfig

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _want_cuda() -> bool:
    import torch

    forced = os.environ.get("FASTALIGN_FORCE_CUDA", "0") == "1"
    return (forced or torch.cuda.is_available()) and CUDA_HOME is not None


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # The C++ standard: the one torch asks for (C++20 from 2.14). -g0: no debug information
    # (Python's CFLAGS ask for -g, which makes each file's compile half as long again).
    cxx_flags = ["-O3", "-g0", "-fopenmp"]
    nvcc_flags = ["-O3"]
    link_flags = ["-fopenmp"]
    if os.environ.get("FASTALIGN_LINK_ONLY", "0") == "1":  # make cuda-link-check
        # Host and device code unoptimized: the link check proves the torch-side code compiles
        # and links; the kernels' code generation is make cuda-compile-check's (at -O3).
        cxx_flags = ["-O0", "-g0", "-fopenmp"]
        nvcc_flags = ["-O0", "-Xptxas", "-O0"]
    if os.environ.get("FASTALIGN_SANITIZE", "0") == "1":  # make sanitize: ASan and UBSan
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
        cxx_flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fopenmp", *sanitize]
        link_flags += sanitize
    if _want_cuda():
        # compile_check_driver.cu only instantiates the kernels for the nvcc check (no torch).
        sources += sorted(
            p for p in glob.glob("csrc/cuda/*.cu") if not p.endswith("compile_check_driver.cu")
        )
        return CUDAExtension(
            "fastalign._C",
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    return CppExtension(
        "fastalign._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
    )


class _BuildExt(BuildExtension.with_options(use_ninja=True)):
    """The objects in one folder, the one a wheel build uses, for editable installs too (pip
    install -e compiles in a temporary folder otherwise): ninja then recompiles only what
    changed, and a wheel built after `make install` (make wheel-check) compiles nothing."""

    def finalize_options(self):
        if self.build_temp is None:  # --build-temp not given
            tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
            self.build_temp = os.path.join("build", f"temp.{tag}")
        super().finalize_options()


setup(ext_modules=[_extension()], cmdclass={"build_ext": _BuildExt})
