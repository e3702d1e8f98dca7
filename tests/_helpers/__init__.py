"""Helpers shared by several test modules (tests/ is on sys.path: the rootdir conftest).

Fixtures live in conftest.py; plain functions and constants that more than one test module
needs live here, one module per subject.
"""

import zlib


def seed_of(*parts) -> int:
    """A stable seed for a test case, from its parameters."""
    return zlib.crc32(repr(parts).encode())
