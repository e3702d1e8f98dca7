"""Builds and loads the host emulation of the CUDA kernels (csrc/emulation/*.cpp, one file per
operator): the kernels of csrc/cuda compiled by g++ against csrc/cuda/host_emulation.h,
registered as ``torch.ops.fastalign_emulated.<op>`` on CPU tensors."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "csrc" / "emulation").glob("*.cpp"))
BUILD_DIR = ROOT / "build" / "cuda_emulation"


@functools.cache
def ops():
    """torch.ops.fastalign_emulated, built on first use (about a minute) and cached on disk."""
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", "2")
    cpp_extension.load(
        name="fastalign_emulated",
        sources=[str(s) for s in SOURCES],
        extra_cflags=["-O2", "-DFA_USE_MMA=0"],
        extra_include_paths=[str(ROOT / "csrc" / "cuda")],
        build_directory=str(BUILD_DIR),
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.fastalign_emulated
