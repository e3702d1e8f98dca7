"""Knowledge word prototypes: fastalign.data.word_prototypes (streamed) versus the plain way.

Writes a knowledge folder (SPEC section 3) into a temporary folder, removed at the end:
``regions.npy`` N x 2048 float16, written through a memmap (default N = 1,000,000 rows,
3.8 GiB; ``--quick``: 50,000 rows, 195 MiB), ``words.txt`` naming K = 12385 words (the
MASK vocabulary; every word >= 1 row, the others uniform) and a 300-d word-vector file.
Then the (K, 2048) per-word mean of the regions:

- fastalign: ``word_prototypes(open_knowledge(...), chunk_rows=c)``: the memmap read in
  file order, c rows at a time, float64 ``index_add_``; for several c.
- plain (``--quick`` only: at 1M rows it needs 8 GB): ``np.load`` of the whole file into
  RAM, ``astype(float32)``, one float32 ``index_add_`` over all rows, divided by the counts.

Time: median of ``--repeat`` calls after a warm-up call, page cache warm (the file was just
written and fits in RAM); ``GB_per_s`` = file bytes / time.

Memory (``peak_anon_MiB``): the peak rise of *anonymous* resident memory (``RssAnon`` of
/proc/self/status) during one call, in a fresh process (so the writing of the file does not
count) that has opened the knowledge (its (N,) int64 concept index and word vectors exist
before and are not counted) and made a small warm-up call. The pages of the memmap that the
call touches are file-backed page cache (``RssFile``): the kernel can drop them at any time,
and they are not counted. Linux keeps no high-water mark of RssAnon alone (``VmHWM`` is that
of RssAnon + RssFile + RssShmem), so a thread samples RssAnon every 0.5 ms during the call;
a spike shorter than that could be missed (the buffers here live for tens of ms or more).
``hwm_rise_MiB`` is the rise of VmHWM, mapped file pages included, for comparison; for the
plain way (no memmap) it equals the anonymous peak. ``outputs_MiB`` is the returned (K, F)
float32 tensor, part of the peak. Target: peak_anon <= 10% of the file at N = 1M (the
peak is one chunk plus the (K, F) float64 accumulator and the float32 result, independent
of N, so at --quick sizes it is a larger share of a smaller file).

    python benchmarks/bench_knowledge.py [--quick] [--rows N] [--repeat R] [--tmpdir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import (  # noqa: E402
    _rss_kib,
    machine_description,
    measuring_env,
    report,
    time_ms,
)

from fastalign.data import Knowledge, open_knowledge, word_prototypes  # noqa: E402

FEATURE_DIM = 2048
N_WORDS = 12385
WORD_DIM = 300
FULL_ROWS = 1_000_000
QUICK_ROWS = 50_000
CHUNK_ROWS = (1024, 4096, 16384)
WRITE_ROWS = 16384
SAMPLE_SECONDS = 0.0005
_MEMORY_FLAG = "--measure-anon-memory-of"
GLOVE = "glove.txt"


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------


def write_knowledge(root: Path, n_rows: int, n_words: int, seed: int = 0) -> Path:
    """``root/knowledge/{regions.npy, words.txt}`` and ``root/glove.txt``, written in
    blocks (memory O(WRITE_ROWS * F) beyond the words)."""
    rng = np.random.default_rng(seed)
    folder = root / "knowledge"
    folder.mkdir(parents=True)
    regions = np.lib.format.open_memmap(
        folder / "regions.npy", mode="w+", dtype=np.float16, shape=(n_rows, FEATURE_DIM)
    )
    for start in range(0, n_rows, WRITE_ROWS):
        stop = min(start + WRITE_ROWS, n_rows)
        regions[start:stop] = rng.standard_normal((stop - start, FEATURE_DIM), np.float32)
    regions.flush()
    del regions
    names = np.array([f"word{k:05d}" for k in range(n_words)])
    concepts = np.concatenate(
        [rng.permutation(n_words), rng.integers(0, n_words, n_rows - n_words)]
    )
    with open(folder / "words.txt", "w", encoding="utf-8") as f:
        for start in range(0, n_rows, 65536):
            f.write("\n".join(names[concepts[start : start + 65536]]) + "\n")
    vectors = rng.standard_normal((n_words, WORD_DIM)).astype(np.float32)
    with open(root / GLOVE, "w", encoding="utf-8") as f:
        for name, vector in zip(names, vectors):
            f.write(name + " " + " ".join(f"{x:.4f}" for x in vector) + "\n")
    return folder


# ---------------------------------------------------------------------------------------
# the two ways
# ---------------------------------------------------------------------------------------


def plain_prototypes(knowledge: Knowledge) -> torch.Tensor:
    """The whole file in RAM as float32, then one per-word mean."""
    regions = np.load(knowledge.folder / "regions.npy").astype(np.float32)
    x = torch.from_numpy(regions)
    concepts = torch.from_numpy(knowledge.row_concepts)
    sums = torch.zeros(knowledge.n_concepts, x.shape[1]).index_add_(0, concepts, x)
    return sums / torch.from_numpy(knowledge.counts).float()[:, None]


def case(impl: str, knowledge: Knowledge):
    """``impl`` = "plain" or "fastalign:<chunk_rows>"; a zero-argument call."""
    if impl == "plain":
        return lambda: plain_prototypes(knowledge)
    chunk_rows = int(impl.split(":")[1])
    return lambda: word_prototypes(knowledge, chunk_rows=chunk_rows)


def small(knowledge: Knowledge, rows: int) -> Knowledge:
    """The first ``rows`` rows of ``knowledge`` (for warm-up calls)."""
    concepts = knowledge.row_concepts[:rows]
    counts = np.maximum(np.bincount(concepts, minlength=knowledge.n_concepts), 1)
    return dataclasses.replace(
        knowledge, regions=knowledge.regions[:rows], row_concepts=concepts, counts=counts
    )


# ---------------------------------------------------------------------------------------
# anonymous memory, in a fresh process
# ---------------------------------------------------------------------------------------


class AnonSampler:
    """Samples RssAnon (KiB) in a thread until stopped; ``peak`` is the highest seen."""

    def __init__(self) -> None:
        self.peak = _rss_kib("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_kib("RssAnon"))
            time.sleep(SAMPLE_SECONDS)

    def __enter__(self) -> AnonSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_kib("RssAnon"))


def serve_anon_memory_request() -> bool:
    """In the child: open the knowledge, warm up, measure one call, print MiB figures."""
    if _MEMORY_FLAG not in sys.argv:
        return False
    impl, root = sys.argv[sys.argv.index(_MEMORY_FLAG) + 1 :][:2]
    root = Path(root)
    knowledge = open_knowledge(root / "knowledge", root / GLOVE)
    if impl == "plain":  # the same operations on a few rows
        x = torch.from_numpy(np.array(knowledge.regions[:2048], dtype=np.float32))
        torch.zeros(knowledge.n_concepts, x.shape[1]).index_add_(0, x[:, 0].long().abs(), x)
    else:
        word_prototypes(small(knowledge, 2048), chunk_rows=512)
    fn = case(impl, knowledge)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    rss, anon, file = (_rss_kib(f) for f in ("VmRSS", "RssAnon", "RssFile"))
    with AnonSampler() as sampler:
        result = fn()
    outputs = result.numel() * result.element_size() / 2**20
    hwm, file_after = _rss_kib("VmHWM"), _rss_kib("RssFile")
    print((sampler.peak - anon) / 1024, (hwm - rss) / 1024, (file_after - file) / 1024, outputs)
    return True


def anon_memory_mib(impl: str, root: Path) -> tuple[float, float, float, float]:
    """(peak RssAnon rise, VmHWM rise, RssFile rise, outputs) of one call, MiB."""
    out = subprocess.run(
        [sys.executable, __file__, _MEMORY_FLAG, impl, str(root)],
        env=measuring_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    anon, hwm, file, outputs = map(float, out.stdout.strip().splitlines()[-1].split())
    return anon, hwm, file, outputs


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROWS:,} rows, plus plain")
    parser.add_argument("--rows", type=int, default=None, help="N (default 1M; quick 50k)")
    parser.add_argument("--words", type=int, default=N_WORDS, help="K (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=None, help="calls timed (5 quick, 2 full)")
    parser.add_argument("--tmpdir", default=None, help="where the temporary folder goes")
    args = parser.parse_args()
    n_rows = args.rows or (QUICK_ROWS if args.quick else FULL_ROWS)
    repeat = args.repeat or (5 if args.quick else 2)
    device = torch.device("cpu")
    root = Path(tempfile.mkdtemp(prefix="bench_knowledge-", dir=args.tmpdir))
    try:
        start = time.perf_counter()
        folder = write_knowledge(root, n_rows, args.words)
        file_mib = (folder / "regions.npy").stat().st_size / 2**20
        print(f"wrote {file_mib:.0f} MiB in {time.perf_counter() - start:.0f} s to {root}")
        knowledge = open_knowledge(folder, root / GLOVE)
        impls = [f"fastalign:{c}" for c in CHUNK_ROWS] + (["plain"] if args.quick else [])
        if args.quick:
            want = plain_prototypes(knowledge).double()
            for impl in impls[:-1]:
                gap = (case(impl, knowledge)().double() - want).abs().max().item()
                print(f"{impl} vs plain: largest absolute gap {gap:.1e}")
        rows = []
        for impl in impls:
            seconds = time_ms(case(impl, knowledge), device, repeat=repeat) / 1e3
            anon, hwm, file_rise, outputs = anon_memory_mib(impl, root)
            name, _, chunk = impl.partition(":")
            rows.append(
                {
                    "impl": name,
                    "chunk_rows": chunk or "-",
                    "N": n_rows,
                    "K": knowledge.n_concepts,
                    "F": FEATURE_DIM,
                    "file_MiB": file_mib,
                    "time_s": seconds,
                    "GB_per_s": file_mib * 2**20 / 1e9 / seconds,
                    "peak_anon_MiB": anon,
                    "vs_file": f"{100 * anon / file_mib:.1f}%",
                    "outputs_MiB": outputs,
                    "hwm_rise_MiB": hwm,
                    "file_pages_MiB": file_rise,
                }
            )
            print(f"{impl}: {seconds:.2f} s, anonymous peak {anon:.0f} MiB", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(
        rows,
        "knowledge" + ("_quick" if args.quick else ""),
        f"word_prototypes of a {n_rows:,} x {FEATURE_DIM} float16 knowledge file, "
        f"K = {args.words}, on {machine_description(device)}",
    )


if __name__ == "__main__":
    if not serve_anon_memory_request():
        main()
