"""Two-stage search versus the exact fine-grained search, on a 100,000-image gallery.

The gallery: 100,000 images of R = 36 region embeddings, D = 256, float16 (1.8 GB), in 2000
scenes of 50 images. A region is ``normalize(u + 0.5 s)``, u Gaussian of norm about 1 and
s its image's scene (a unit vector): the regions of one image share a component, as those
of a real image do, and the scene's 50 images are the hard negatives of its queries. Each
query is a caption of Flickr30K-like length (8..30 words) describing the objects of one
scene's 5 planted images: word l is ``normalize(o_l + 0.5 s + 2 e)``, o_l the object (a unit
vector) and e Gaussian noise of norm about 1, and each planted image holds the caption's
objects, one a region, in the same way with its own noise (at random places among its 36
regions). The noise makes the planted images hard to tell from the scene's other 45: the
exact search finds most of them in its top 10, not all.

The score is CHAN's: t2i, max over regions, log-sum-exp over words (tau 0.1). The cases,
the same queries and gallery in one run:

- exact: :func:`fastalign.streaming_topk`, every image scored for every query (the plain way).
- two-stage, shortlist S: :func:`fastalign.search.two_stage_search`, the S images of the
  highest global inner product (exact blocked top-S of the mean-pooled, normalised
  embeddings; faiss's flat index as well when faiss is installed), then their exact score.
  The gallery's global embeddings are computed once, as ``fastalign index`` stores them
  (their time is printed, not counted per query).

Every case runs on ``--threads`` torch threads, one by default: on a shared machine, two
threads waiting at each other's OpenMP barriers made a query's small calls up to 7x slower.
Columns: time per query (all queries searched in one call), speed-up over the exact search,
peak memory (the rise of the resident set during a second call, made after every timing with
freed memory handed back to the system; the gallery not counted),
recall@10: the fraction of the queries' planted images in their top 10, that recall as a
share of the exact search's, and the fraction of the exact search's top 10 found.

    python benchmarks/bench_search.py [--quick] [--queries N]
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import _rss_kib, machine_description, report  # noqa: E402
from bench_eval import caption_lengths  # noqa: E402

from fastalign.retrieval import streaming_topk  # noqa: E402
from fastalign.search import global_embeddings, topk_recall, two_stage_search  # noqa: E402
from fastalign.tokens import Tokens  # noqa: E402

SCORE = dict(direction="t2i", align="max", aggregate="lse")  # aggregate_tau 0.1
SIZES = {"full": 100_000, "quick": 10_000}
REGIONS, DIM, SCENE_SIZE, PLANTED = 36, 256, 50, 5
SCENE, NOISE = 0.5, 2.0  # the scene's weight in a token, the noise's
SHORTEST, LONGEST = 8, 30
K = 10
SHORTLISTS = (50, 200, 1000)
TARGET_SHORTLIST = 200


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def make_search(n_images: int, n_queries: int, seed: int = 0):
    """(gallery Tokens (n_images, 36, 256) float16, query Tokens (n_queries, 30, 256) float32,
    planted (n_queries, 5) int64 image indices)."""
    g = torch.Generator().manual_seed(seed)
    n_scenes = n_images // SCENE_SIZE
    scenes = unit(torch.randn(n_scenes, DIM, generator=g))
    regions = torch.empty(n_images, REGIONS, DIM, dtype=torch.float16)
    for start in range(0, n_images, 2000):  # in chunks: no float32 copy of the gallery
        stop = min(start + 2000, n_images)
        scene = scenes[torch.arange(start, stop) // SCENE_SIZE][:, None]
        noise = torch.randn(stop - start, REGIONS, DIM, generator=g) / DIM**0.5
        regions[start:stop] = unit(noise + SCENE * scene).half()
    # Query q describes scene q * (n_scenes // n_queries), and 5 of its images at random.
    query_scenes = torch.arange(n_queries) * (n_scenes // n_queries)
    lengths = caption_lengths(n_queries, g, SHORTEST, LONGEST)
    objects = unit(torch.randn(n_queries, LONGEST, DIM, generator=g))

    def noisy(count: int, q: int) -> torch.Tensor:
        noise = torch.randn(count, LONGEST, DIM, generator=g) / DIM**0.5
        return unit(objects[q] + SCENE * scenes[query_scenes[q]] + NOISE * noise)

    words = torch.zeros(n_queries, LONGEST, DIM)
    planted = torch.empty(n_queries, PLANTED, dtype=torch.int64)
    for q in range(n_queries):
        length = int(lengths[q])
        words[q, :length] = noisy(1, q)[0, :length]
        first = int(query_scenes[q]) * SCENE_SIZE
        planted[q] = first + torch.randperm(SCENE_SIZE, generator=g)[:PLANTED]
        copies = noisy(PLANTED, q)
        for p, image in enumerate(planted[q].tolist()):
            places = torch.randperm(REGIONS, generator=g)[:length]
            regions[image, places] = copies[p, :length].half()
    return Tokens(regions, None), Tokens(words, lengths), planted


def timed(fn):
    """(result, seconds) of one call of ``fn``."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def peak_mib(fn) -> float:
    """The rise of the resident set during one call of ``fn``, in MiB."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - before) / 1024


def hand_back_freed_memory() -> None:
    """glibc told to return every freed block of 64 KiB or more to the system, as
    _runner.measuring_env does for a fresh process: a freed buffer leaves the resident set,
    so the next call's peak counts its own allocations. Set after the timings (each
    allocation then costs fresh pages)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD


def cases(gallery, queries, gallery_global) -> dict:
    """The searches by name, the exact one first."""
    searches = {"exact: streaming_topk": functools.partial(streaming_topk, gallery, queries)}
    indexes = ["exact"]
    try:
        import faiss  # noqa: F401

        indexes.append("faiss")
    except ImportError:
        print("faiss is not installed (pip install faiss-cpu): its row is left out")
    for index in indexes:
        for shortlist in SHORTLISTS if index == "exact" else (TARGET_SHORTLIST,):
            searches[f"two-stage: {index} shortlist {shortlist}"] = functools.partial(
                two_stage_search,
                gallery,
                queries,
                shortlist=shortlist,
                shortlist_index=index,
                gallery_global=gallery_global,
            )
    return {name: functools.partial(search, k=K, **SCORE) for name, search in searches.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 images")
    parser.add_argument("--queries", type=int, default=64, help="queries (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_images = SIZES["quick" if args.quick else "full"]
    (gallery, queries, planted), seconds = timed(lambda: make_search(n_images, args.queries))
    print(f"gallery of {n_images} images generated in {seconds:.1f} s")
    warm_queries = Tokens(queries.embs[:2], queries.lengths[:2])
    two_stage_search(gallery, warm_queries, k=K, shortlist=20, **SCORE)  # thread pools
    gallery_global, seconds = timed(lambda: global_embeddings(gallery))
    print(f"the gallery's global embeddings (once, as an index stores them): {seconds:.1f} s")
    searches = cases(gallery, queries, gallery_global)
    rows, exact, exact_ms, exact_recall = [], None, None, None
    for name, search in searches.items():
        (_, found), seconds = timed(search)
        ms = seconds * 1e3 / args.queries
        recall = topk_recall(found, planted)
        if exact is None:
            exact, exact_ms, exact_recall = found, ms, recall
        rows.append(
            {
                "impl": name,
                "per_query_ms": ms,
                "speedup": f"{exact_ms / ms:.1f}x",
                "peak_MiB": None,
                "recall@10": recall,
                "vs_exact": f"{100 * recall / exact_recall:.1f}%",
                "exact_top10_found": topk_recall(found, exact),
            }
        )
        print(f"{name}: {ms:.1f} ms a query, recall@10 {recall:.4f}", flush=True)
    hand_back_freed_memory()
    for row, search in zip(rows, searches.values()):
        row["peak_MiB"] = peak_mib(search)
        print(f"{row['impl']}: peak {row['peak_MiB']:.1f} MiB", flush=True)
    title = (
        f"search of {args.queries} queries over {n_images} images (36 x 256 float16, "
        f"{PLANTED} planted each), top {K}, on {machine_description(torch.device('cpu'))}"
    )
    report(rows, f"search{'_quick' if args.quick else ''}", title)
    target = next(r for r in rows if r["impl"] == f"two-stage: exact shortlist {TARGET_SHORTLIST}")
    met = target["recall@10"] >= 0.99 * exact_recall and exact_ms / target["per_query_ms"] >= 20
    print(f"target (shortlist 200: >= 99% of the exact recall@10, >= 20x faster): {met}")


if __name__ == "__main__":
    main()
