"""Every operator benchmark, then one table of fastalign's speed-up and working memory over
each case's plain-PyTorch baseline, headed by the machine (CPU model, vector ISA, caches,
threads).

    python benchmarks/bench_all.py [--quick] [--device cpu|cuda] [--repeat N]
    fastalign bench all --quick        # the same (7 minutes on 2 cores shared at load 3 to 6)

Runs benchmarks/bench_NAME.py of every operator (``_runner.OPERATOR_BENCHMARKS``) in a
process of its own, with --quick, --device and --repeat passed on, its output and its CSV
in benchmarks/results/all[_quick]/NAME/ (log.txt, NAME*.csv), one line of progress each.
Then reads each CSV (rows of ``_runner.compare_cases``): the columns before ``impl`` name a
case; its first implementation with a working memory is the baseline, and its ``fastalign``
row is compared with it. Prints the summary and writes it to
benchmarks/results/all[_quick]/summary.csv. A benchmark that fails is reported with the end
of its log; the others still make the table, and the exit status is then 1.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _runner  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parent
LOG_TAIL = 20  # lines of a failed benchmark's log that are printed


def run_benchmark(script: Path, options: list[str], folder: Path) -> list[dict[str, str]]:
    """Runs ``script`` with ``options``, its CSV written to ``folder`` (its older CSVs removed
    first) and its output to folder/log.txt; returns the rows of the CSV it wrote.

    Raises:
        RuntimeError: the script failed or wrote no CSV; the message ends with its log's end.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.csv"):
        old.unlink()
    log = folder / "log.txt"
    with log.open("w") as out:
        status = subprocess.call(
            [sys.executable, str(script), *options],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, FASTALIGN_BENCH_RESULTS=str(folder)),
        )
    written = sorted(folder.glob("*.csv"))
    if status == 0 and written:
        rows = []
        for path in written:
            with path.open(newline="") as f:
                rows += list(csv.DictReader(f))
        return rows
    problem = f"exit status {status}" if status else "no CSV written"
    tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
    raise RuntimeError(f"{script.name}: {problem}; end of {log}:\n" + "\n".join(tail))


def summary_rows(operator: str, rows: list[dict[str, str]]) -> list[dict]:
    """One row per case of an operator benchmark's CSV ``rows``: its ``fastalign`` row versus
    the case's baseline (the first row with a working memory), times in ms, memory in MiB.
    Cases without both are left out (one whose rows have no memory probe: a GEMM ceiling)."""
    cases: dict[tuple, list[dict[str, str]]] = {}
    for row in rows:
        columns = list(row)
        labels = {c: row[c] for c in columns[: columns.index("impl")]}
        cases.setdefault(tuple(labels.items()), []).append(row)
    summary = []
    for labels, found in cases.items():
        measured = [row for row in found if row["working_MiB"] != ""]
        fast = [row for row in measured if row["impl"] == "fastalign"]
        if not fast or measured[0] is fast[0]:
            continue
        base, fast = measured[0], fast[0]
        base_working, fast_working = float(base["working_MiB"]), float(fast["working_MiB"])
        summary.append(
            {
                "operator": operator,
                "case": ", ".join(_label(k, v) for k, v in labels if k != "mode"),
                "mode": dict(labels).get("mode", ""),
                "baseline": base["impl"],
                "baseline_ms": float(base["time_ms"]),
                "fastalign_ms": float(fast["time_ms"]),
                "speedup": float(base["time_ms"]) / float(fast["time_ms"]),
                "baseline_working_MiB": base_working,
                "fastalign_working_MiB": fast_working,
                "working_ratio": f"{100 * fast_working / max(base_working, 1e-9):.1f}%",
            }
        )
    return summary


def _label(name: str, value: str) -> str:
    """A case label as shown: numbers with their column's name (``N=128``), words alone."""
    return f"{name}={value}" if value.replace(".", "", 1).isdigit() else value


def main(argv: list[str] | None = None, scripts: Mapping[str, Path] | None = None) -> int:
    """Runs the benchmarks (``scripts``: operator -> script, by default every operator's),
    prints and writes the summary; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each benchmark's --quick cases")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, help="timed calls per case (default: each's own)")
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    device = torch.device(args.device)
    if scripts is None:
        scripts = {name: BENCHMARKS / f"bench_{name}.py" for name in _runner.OPERATOR_BENCHMARKS}
    options = ["--quick"] * args.quick + ["--device", args.device]
    options += ["--repeat", str(args.repeat)] if args.repeat is not None else []
    run_name = "all_quick" if args.quick else "all"
    load = f"; load average {os.getloadavg()[0]:.1f} at the start" if device.type == "cpu" else ""
    rows, failed = [], []
    for operator, script in scripts.items():
        folder = _runner.RESULTS_DIR / run_name / operator
        print(f"{operator}: running {script.name} {' '.join(options)} (log: {folder})", flush=True)
        start = time.perf_counter()
        try:
            found = run_benchmark(script, options, folder)
        except RuntimeError as error:
            print(f"{operator}: FAILED, {error}", flush=True)
            failed.append(operator)
            continue
        rows += summary_rows(operator, found)
        print(f"{operator}: done in {time.perf_counter() - start:.0f} s", flush=True)
    if rows:
        title = (
            f"fastalign versus plain PyTorch ({'quick cases' if args.quick else 'all cases'}) "
            f"on {_runner.machine_description(device)}{load}"
        )
        _runner.report(rows, f"{run_name}/summary", title)
    elif not failed:
        print("no case compares fastalign with a baseline", file=sys.stderr)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    raise SystemExit(main())
