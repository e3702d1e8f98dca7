"""Helpers shared by several test modules (tests/ is on sys.path: the rootdir conftest).

Fixtures live in conftest.py; plain functions and constants that more than one test module
needs live here, one module per subject.
"""

import zlib

import torch


def seed_of(*parts) -> int:
    """A stable seed for a test case, from its parameters."""
    return zlib.crc32(repr(parts).encode())


def assert_close_with_nans(got, want, rtol, what=""):
    """got is NaN exactly where the reference ``want`` (float64) is, and elsewhere within rtol of
    want's largest finite magnitude (at least 1e-3)."""
    got = got.double()
    assert got.shape == want.shape, what
    assert torch.equal(got.isnan(), want.isnan()), (
        f"{what}: NaN at {got.isnan().nonzero().tolist()[:6]}, "
        f"the reference's at {want.isnan().nonzero().tolist()[:6]}"
    )
    finite = want[want.isfinite()]
    scale = (finite.abs().max().item() if finite.numel() else 0.0) + 1e-3
    torch.testing.assert_close(
        got, want, rtol=rtol, atol=rtol * scale, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )
