"""pytest-benchmark set-up of the kernel suite (test_kernels.py).

Every run is saved (autosave) under benchmarks/results/pytest-benchmark/, whatever the working
folder, unless ``--benchmark-storage`` names another place; the peak-memory probe of each case
is printed after pytest-benchmark's timing table and written to
benchmarks/results/suite_memory.csv.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import RESULTS_DIR, table_lines, write_csv  # noqa: E402

PLUGIN_DEFAULT_STORAGE = "file://./.benchmarks"
MEMORY_ROWS = pytest.StashKey[list]()


def pytest_configure(config):
    # pytest-benchmark reads these options in its own pytest_configure, which runs last.
    if getattr(config.option, "benchmark_storage", None) == PLUGIN_DEFAULT_STORAGE:
        config.option.benchmark_storage = f"file://{RESULTS_DIR / 'pytest-benchmark'}"
    if hasattr(config.option, "benchmark_autosave") and not config.option.benchmark_save:
        from pytest_benchmark.utils import get_tag

        config.option.benchmark_autosave = get_tag()  # the name --benchmark-autosave gives


@pytest.fixture
def memory_rows(request) -> list[dict]:
    """The run's table of peak memory, one row per case."""
    return request.config.stash.setdefault(MEMORY_ROWS, [])


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    rows = config.stash.get(MEMORY_ROWS, [])
    if not rows:
        return
    terminalreporter.section("peak memory per call (MiB; working = peak - outputs)")
    for line in table_lines(rows):
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"written to {write_csv(rows, 'suite_memory')}")
