"""``fastalign bench all`` (benchmarks/bench_all.py) without the long benchmarks: its
arguments, the summary of a CSV, and a run of two fake operator benchmarks (one comparing
two tiny cases through the shared runner, one failing) down to the table and its CSV."""

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

from fastalign.cli import main

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_all", ROOT / "benchmarks" / "bench_all.py")
bench_all = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench_all
_spec.loader.exec_module(bench_all)

# An operator benchmark in miniature: the shared runner's comparison (memory probe in a fresh
# process included) and report; its case label records the options it was given.
FAKE = """
import sys
sys.path.insert(0, {benchmarks!r})
import torch
from _runner import compare_cases, report, serve_memory_request


def build_case(key):
    x = torch.randn(512, 512)
    if key == "plain":
        return lambda: (x @ x).exp().sum(1)
    return lambda: x.sum(1)


if not serve_memory_request(build_case):
    labels = {{"N": 512, "options": " ".join(sys.argv[1:]), "mode": "forward"}}
    keys = {{"plain": "plain", "fastalign": "fastalign"}}
    report(compare_cases(labels, keys, build_case, torch.device("cpu"), 1), "fake", "fake")
"""
BROKEN = "print('boom')\nraise SystemExit(3)\n"


def test_summary_pairs_fastalign_with_the_first_measured_row_of_each_case():
    def row(shape, mode, impl, ms, working):
        return {"shape": shape, "mode": mode, "impl": impl, "time_ms": ms, "working_MiB": working}

    rows = [
        row("train", "forward", "plain GEMM (ceiling)", "1.0", ""),  # no memory: not the baseline
        row("train", "forward", "plain", "8.0", "100.0"),
        row("train", "forward", "fastalign", "2.0", "4.0"),
        row("train", "forward+backward", "plain", "9.0", "50.0"),  # no fastalign: left out
        row("eval 128", "forward", "CHAN 128-block loop", "30.0", "10.0"),
        row("eval 128", "forward", "fastalign", "10.0", "1.0"),
    ]
    summary = bench_all.summary_rows("region_word", rows)
    assert [(s["case"], s["mode"], s["baseline"]) for s in summary] == [
        ("train", "forward", "plain"),
        ("eval 128", "forward", "CHAN 128-block loop"),
    ]
    assert summary[0]["speedup"] == 4.0 and summary[0]["working_ratio"] == "4.0%"
    assert summary[1]["speedup"] == 3.0 and summary[1]["working_ratio"] == "10.0%"


def test_bench_all_runs_each_benchmark_and_prints_one_summary(tmp_path, monkeypatch, capsys):
    fake, broken = tmp_path / "bench_fake.py", tmp_path / "bench_broken.py"
    fake.write_text(FAKE.format(benchmarks=str(ROOT / "benchmarks")))
    broken.write_text(BROKEN)
    monkeypatch.setattr(bench_all._runner, "RESULTS_DIR", tmp_path / "results")
    status = bench_all.main(
        ["--quick", "--device", "cpu"], scripts={"broken": broken, "fake": fake}
    )
    assert status == 1  # one benchmark failed; the other still makes the table
    out = capsys.readouterr().out
    assert "broken: FAILED, bench_broken.py: exit status 3" in out and "boom" in out
    assert "quick cases" in out and "threads of" in out  # the machine heads the table
    run = tmp_path / "results" / "all_quick"
    with (run / "summary.csv").open() as f:
        (summary,) = csv.DictReader(f)
    assert summary["operator"] == "fake" and summary["baseline"] == "plain"
    assert summary["case"] == "N=512, --quick --device cpu" and summary["mode"] == "forward"
    assert float(summary["baseline_working_MiB"]) > float(summary["fastalign_working_MiB"])
    assert (run / "fake" / "fake.csv").is_file() and (run / "broken" / "log.txt").is_file()


def test_bench_all_argument_errors_exit_2(capsys):
    for argv in (["--repeat", "0"], ["--no-such-option"]):
        with pytest.raises(SystemExit) as exit_info:
            bench_all.main(argv)  # what fastalign bench all runs, in this process
        assert exit_info.value.code == 2
    assert "--repeat must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "no_such_benchmark"])
    assert exit_info.value.code == 2
    assert "available: all, " in capsys.readouterr().err
