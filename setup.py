"""Builds fastalign._C: C++ kernels always, CUDA kernels when CUDA is available or
FASTALIGN_FORCE_CUDA=1 (architectures from TORCH_CUDA_ARCH_LIST)."""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _want_cuda() -> bool:
    import torch

    forced = os.environ.get("FASTALIGN_FORCE_CUDA", "0") == "1"
    return (forced or torch.cuda.is_available()) and CUDA_HOME is not None


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard: the one torch asks for (C++20 from 2.14)
    link_flags = ["-fopenmp"]
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
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )
    return CppExtension(
        "fastalign._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
    )


setup(
    ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)}
)
