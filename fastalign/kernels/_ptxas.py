"""What both ahead-of-time compile checks (fastalign.kernels.triton.compile_check for the Triton
kernels, fastalign.kernels.cuda_compile_check for csrc/cuda) read off ``ptxas -v``: one kernel's
resources and the spill verdict, so that the two report and judge spills alike."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class PtxasReport:
    """ptxas's report on one kernel compiled for sm_<arch>; ``expect_mma``: the kernel must
    hold a tensor-core instruction (each check looks for it in its own PTX)."""

    name: str
    arch: int
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared_bytes: int = 0
    expect_mma: bool = False

    @property
    def spills(self) -> bool:
        """True when ptxas reported any spill store or load."""
        return self.spill_stores > 0 or self.spill_loads > 0

    def spill_problems(self) -> list[str]:
        """The spill failure as both checks print it; empty when nothing spills."""
        if not self.spills:
            return []
        return [f"spills {self.spill_stores} B stores / {self.spill_loads} B loads"]
