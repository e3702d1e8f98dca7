"""``fastalign compare``: several configs trained on the same data, seeds and budget.

Each (config, seed) run trains in a fresh process (so that its peak memory is its own),
then its final model is evaluated on the test split. The summary gives every recall's mean,
rSum's mean and standard deviation over the seeds, the training time per epoch and the peak
memory; ``runs.csv`` holds every run, ``summary.csv`` the table and ``val_rsum.png`` (when
matplotlib is installed) the validation rSum per epoch of every config.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fastalign.evaluation import RESULT_KEYS

RECALL_COLUMNS = ("r1_i2t", "r5_i2t", "r10_i2t", "r1_t2i", "r5_t2i", "r10_t2i")


def _train_one(config_path: str, overrides: list[str], result_path: str) -> None:
    """One run, in its own process: train, test, write the result as JSON."""
    _die_with_parent()
    import torch

    from fastalign.config import load_config
    from fastalign.training import train_and_test

    config = load_config(config_path, overrides)
    results, trainer, _ = train_and_test(config, progress=False, overwrite=True)
    val_rows = [row for row in trainer.history if "val_rsum" in row]
    # A training-free run (epochs 0) has no epoch: its "epoch" time is 0.
    epoch_seconds = [row["epoch_seconds"] for row in val_rows if "epoch_seconds" in row]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    if trainer.device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(trainer.device) / 2**20
    record = {
        "results": results,
        "val_rsum": [row["val_rsum"] for row in val_rows],
        "val_epochs": [row["epoch"] for row in val_rows],
        "epoch_seconds": statistics.mean(epoch_seconds) if epoch_seconds else 0.0,
        "peak_mib": peak_mib,
        "peak_kind": "cuda" if trainer.device.type == "cuda" else "rss",
        "method": config.method,
    }
    partial = Path(result_path + ".partial")
    partial.write_text(json.dumps(record))
    os.replace(partial, result_path)


def _die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent dies, so that a killed
    ``fastalign compare`` leaves no training running (elsewhere: nothing to do)."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the request
        os.kill(os.getpid(), signal.SIGTERM)


def _run(config_path: str, overrides: list[str], result_path: Path) -> dict:
    process = multiprocessing.get_context("spawn").Process(
        target=_train_one, args=(config_path, overrides, str(result_path))
    )
    process.start()
    try:
        process.join()
    finally:  # interrupted (Ctrl-C, an exception): the run stops with compare
        if process.is_alive():
            process.terminate()
            process.join()
    if process.exitcode != 0 or not result_path.is_file():
        raise RuntimeError(
            f"training {config_path} with {' '.join(overrides)} failed (exit code "
            f"{process.exitcode}); its output is above"
        )
    return json.loads(result_path.read_text())


def compare(
    configs: Sequence[str],
    seeds: int = 3,
    preset: str | None = None,
    overrides: Sequence[str] = (),
    output_dir: str | os.PathLike = "runs/compare",
    overwrite: bool = False,
) -> list[dict]:
    """Trains every config with training seeds 0 .. seeds-1 on the same data.

    Args:
        configs: config names or paths (see :func:`fastalign.config.find_config`).
        seeds: runs per config.
        preset: train on the synthetic dataset of this preset (``easy``, ``hard``) whatever
            the configs' data; None keeps each config's data.
        overrides: ``key=value`` overrides applied to every config (the shared budget).
        output_dir: each run writes ``output_dir/<config>/seed<k>``; the tables go here.
        overwrite: replace the runs of an earlier comparison in ``output_dir`` (without it,
            FileExistsError when there are any).

    Returns:
        One row per config (see :func:`summarise`), after writing ``runs.csv``,
        ``summary.csv`` and, with matplotlib, ``val_rsum.png`` into ``output_dir``.
    """
    from fastalign.config import find_config, load_config

    if not configs:
        raise ValueError("compare needs at least one config")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    output_dir = Path(output_dir)
    shared = list(overrides)
    if preset is not None:
        shared += ["data_root=synthetic", f"synthetic_preset={preset}"]
    paths = {str(find_config(name)): Path(name).stem for name in configs}
    for path in paths:  # every config and override is checked before hours of training
        load_config(path, shared)
    earlier = [output_dir / label for label in paths.values() if (output_dir / label).exists()]
    if earlier and not overwrite:
        raise FileExistsError(
            f"{output_dir} holds earlier runs ({', '.join(p.name for p in earlier)}): pass "
            f"--overwrite to replace them or choose another --output"
        )
    runs = []
    total = len(paths) * seeds
    for path, label in paths.items():
        for seed in range(seeds):
            out = output_dir / label / f"seed{seed}"
            print(
                f"[{len(runs) + 1}/{total}] {label} seed {seed} -> {out}",
                file=sys.stderr,
                flush=True,
            )
            start = time.perf_counter()
            record = _run(path, [*shared, f"seed={seed}", f"output_dir={out}"], out / "run.json")
            record |= {"config": label, "seed": seed, "wall_seconds": time.perf_counter() - start}
            print(
                f"    rSum {record['results']['rsum']:.1f} in {record['wall_seconds']:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            runs.append(record)
    summary = summarise(runs)
    _write_csv(
        output_dir / "runs.csv",
        [
            {"config": r["config"], "method": r["method"], "seed": r["seed"]}
            | {k: r["results"][k] for k in RESULT_KEYS}
            | {"epoch_seconds": r["epoch_seconds"], "peak_mib": r["peak_mib"]}
            for r in runs
        ],
    )
    _write_csv(output_dir / "summary.csv", summary)
    plot_validation(runs, output_dir / "val_rsum.png")
    return summary


def summarise(runs: list[dict]) -> list[dict]:
    """Per config: the mean of every recall, rSum's mean and standard deviation over the
    seeds (sample std; 0 for one seed), mean seconds per epoch and the largest peak."""
    rows = []
    for label in dict.fromkeys(r["config"] for r in runs):
        mine = [r for r in runs if r["config"] == label]
        rsums = [r["results"]["rsum"] for r in mine]
        row = {"config": label, "method": mine[0]["method"], "seeds": len(mine)}
        row |= {k: statistics.mean(r["results"][k] for r in mine) for k in RECALL_COLUMNS}
        row |= {
            "rsum_mean": statistics.mean(rsums),
            "rsum_std": statistics.stdev(rsums) if len(rsums) > 1 else 0.0,
            "epoch_seconds": statistics.mean(r["epoch_seconds"] for r in mine),
            "peak_mib": max(r["peak_mib"] for r in mine),
        }
        rows.append(row)
    return rows


def format_summary(rows: list[dict]) -> str:
    """The summary as an aligned text table."""
    header = ["config", "method", "R@1", "R@5", "R@10", "R@1", "R@5", "R@10", "rSum", "s/epoch"]
    header.append("peak MiB")
    lines = [
        ["", "", "i2t", "", "", "t2i", "", "", "mean ± std", "", ""],
        header,
    ]
    for row in rows:
        lines.append(
            [row["config"], row["method"]]
            + [f"{row[k]:.1f}" for k in RECALL_COLUMNS]
            + [f"{row['rsum_mean']:.1f} ± {row['rsum_std']:.1f}"]
            + [f"{row['epoch_seconds']:.1f}", f"{row['peak_mib']:.0f}"]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths))
        )
        for line in lines
    )


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, path)


def plot_validation(runs: list[dict], path: Path) -> Path | None:
    """Validation rSum per epoch, mean over seeds with a min-max band, one line per config;
    None (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(r["config"] for r in runs):
        mine = [r for r in runs if r["config"] == label]
        epochs = mine[0]["val_epochs"]
        per_epoch = list(zip(*(r["val_rsum"] for r in mine)))
        means = [statistics.mean(v) for v in per_epoch]
        axes.plot(epochs, means, marker="o", label=f"{label} ({len(mine)} seeds)")
        axes.fill_between(
            epochs, [min(v) for v in per_epoch], [max(v) for v in per_epoch], alpha=0.2
        )
    axes.set_xlabel("epoch")
    axes.set_ylabel("validation rSum (of 600)")
    axes.set_ylim(0, max(600 * 0.1, math.ceil(max(max(r["val_rsum"]) for r in runs) / 50) * 50))
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    partial = path.with_name(path.stem + ".partial.png")
    figure.savefig(partial, dpi=120)
    plt.close(figure)
    os.replace(partial, path)
    return path
