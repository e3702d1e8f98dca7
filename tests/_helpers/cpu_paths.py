"""The CPU kernels' paths, for tests that run every one on this machine: the x86-64 level of
their hot loops (FASTALIGN_CPU_ISA lowers it below the CPU's) and the L2 size their block
widths come from (FASTALIGN_L2_BYTES stands in for the CPU's report)."""

import pytest

# (isa, l2 bytes), None = this CPU's own: its level and L2, the smallest blocks at the AVX2
# level, the largest at the baseline (SSE2) level, the largest at the CPU's level.
CPU_PATHS = [(None, None), ("avx2", 1), ("baseline", 1 << 30), (None, 1 << 30)]


@pytest.fixture(params=CPU_PATHS, ids=lambda p: f"isa={p[0] or 'cpu'}-l2={p[1] or 'cpu'}")
def cpu_path(request, monkeypatch):
    """Runs a test under one CPU path (the kernels read both variables at every call)."""
    isa, l2_bytes = request.param
    if isa is not None:
        monkeypatch.setenv("FASTALIGN_CPU_ISA", isa)
    if l2_bytes is not None:
        monkeypatch.setenv("FASTALIGN_L2_BYTES", str(l2_bytes))
    return request.param
