"""Retrieval evaluation at scale: streaming (no score matrix) versus the full matrix.

Embeddings are given (no encoders): R = 36 regions per image, captions of Flickr30K-like
lengths (log-normal around 11.5 words, clamped to 8..30, padded to 30), every word a noisy
copy of a region of its image (see bench_eval.make_features), unit rows, float32. The score
is CHAN's: t2i, max over regions, log-sum-exp over words (tau 0.1).

Part ``f30k`` (Flickr30K size: 1000 images x 5000 captions, D = 1024):
- CHAN-style: float64 features, 128 x 128 blocks, each converted to float32, forming the
  (128, 128, R, L) tensor over the block's longest caption (cropped first: kinder than
  CHAN's own code), max over regions, LSE over valid words, into a float64 numpy
  (n_images, n_captions) matrix; then SCAN's ranking, a numpy argsort of every image's and
  every caption's row in a Python loop (bench_eval's chan_style_similarity / argsort_ranks).
- CHAN-style, fused score: the same blocks, matrix and ranking, each block scored by
  ``fastalign.region_word_similarity``: what the fused operator alone changes.
- full matrix: ``similarity_matrix`` (the streaming pass's blocks) + ``evaluate``.
- streaming: ``fastalign.evaluate_streaming``.

Part ``coco5k`` (COCO 5K size: 5000 images x 25000 captions, D = 256): COCO 5K and COCO 1K
(5 folds of 1000 images) by ``similarity_matrix`` + ``evaluate`` + ``evaluate_folds``
versus ``fastalign.evaluate_streaming_folds`` (one pass). The CHAN-style evaluation is not
run at this size; its float64 matrix alone (953.7 MiB), a lower bound of its peak, is the
reference of the peak_vs_chan column.

Every case runs once, in a fresh process that measures its peak memory (the rise of the
resident set during the call; the stored features are not counted) and its time, after a
warm-up on the --quick size. The script fails unless every evaluation of a part reports the
same recalls and ranks.

    python benchmarks/bench_retrieval.py [--quick] [--part f30k|coco5k|all]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import machine_description, measure_once, report, serve_memory_request  # noqa: E402
from bench_eval import (  # noqa: E402
    CAPTIONS_PER_IMAGE,
    argsort_ranks,
    chan_style_similarity,
    make_features,
    numpy_metrics,
)

import fastalign  # noqa: E402
from fastalign.evaluation import (  # noqa: E402
    RESULT_KEYS,
    BlockScorer,
    evaluate,
    evaluate_folds,
    format_results,
    similarity_matrix,
)
from fastalign.tokens import Tokens  # noqa: E402

SCORE = dict(direction="t2i", align="max", aggregate="lse")  # aggregate_tau 0.1
SHORTEST, PADDED = 8, 30
CHAN_BLOCK = 128
PARTS = {
    # part: (label, {size: (n_images, D)}, signal, implementations, the first the baseline)
    "f30k": (
        "Flickr30K",
        dict(full=(1000, 1024), quick=(200, 1024), warmup=(20, 1024)),
        0.065,
        ("chan", "chan_fused", "matrix", "streaming"),
    ),
    "coco5k": (
        "COCO",
        dict(full=(5000, 256), quick=(500, 256), warmup=(20, 256)),
        0.14,
        ("matrix", "streaming"),
    ),
}
# The metrics every evaluation must share. SCAN's argsort ranking breaks exact score ties
# (they occur among millions of float32 scores) in the sort's order, evaluate counts them
# against the positive: a mean or median rank can differ by such a tie, the recalls did not.
RECALLS = tuple(key for key in RESULT_KEYS if not key.startswith(("medr", "meanr")))
IMPLS = {
    "chan": "CHAN-style: 128-block 4-D tensor, float64 matrix, argsort",
    "chan_fused": "the same, blocks scored by the fused operator",
    "matrix": "full matrix: similarity_matrix + evaluate",
    "streaming": "streaming: evaluate_streaming",
}
COCO_IMPLS = {
    "matrix": "full matrix: similarity_matrix + evaluate + evaluate_folds",
    "streaming": "streaming: evaluate_streaming_folds (5K and 1K, one pass)",
}


# --------------------------------------------------------------------------- cases
def features(part: str, size: str):
    _, sizes, signal, _ = PARTS[part]
    n_images, dim = sizes[size]
    return make_features(n_images, 36, dim, shortest=SHORTEST, padded=PADDED, signal=signal)


def chan_style(img_embs, cap_embs, cap_lens, fused: bool) -> dict[str, float]:
    if fused:
        sims = np.zeros((len(img_embs), len(cap_embs)))  # float64, like CHAN's
        for i0 in range(0, len(img_embs), CHAN_BLOCK):
            images = torch.from_numpy(img_embs[i0 : i0 + CHAN_BLOCK]).float()
            for t0 in range(0, len(cap_embs), CHAN_BLOCK):
                lengths = torch.from_numpy(cap_lens[t0 : t0 + CHAN_BLOCK])
                captions = torch.from_numpy(cap_embs[t0 : t0 + CHAN_BLOCK]).float()
                block = fastalign.region_word_similarity(images, captions, None, lengths, **SCORE)
                sims[i0 : i0 + CHAN_BLOCK, t0 : t0 + CHAN_BLOCK] = block.numpy()
    else:
        sims = chan_style_similarity(
            img_embs, cap_embs, cap_lens, torch.device("cpu"), True, SCORE["aggregate"]
        )
    return numpy_metrics(*argsort_ranks(sims, CAPTIONS_PER_IMAGE))


def flat(prefix: str, results: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}{key}": value for key, value in results.items()}


def build_case(key: str):
    """``key`` = part:impl:size; returns a zero-argument callable (inputs built here)."""
    part, impl, size = key.split(":")
    regions, words, word_lengths = features(part, size)
    if impl.startswith("chan"):
        img_embs, cap_embs = regions.double().numpy(), words.double().numpy()
        cap_lens = word_lengths.numpy()
        del regions, words
        return lambda: chan_style(img_embs, cap_embs, cap_lens, fused=impl == "chan_fused")
    images, captions = Tokens.dense(regions), Tokens(words, word_lengths)
    if impl == "streaming" and part == "f30k":
        return lambda: fastalign.evaluate_streaming(images, captions, **SCORE)
    if impl == "streaming":

        def streaming_folds():
            folds = fastalign.evaluate_streaming_folds(images, captions, n_folds=5, **SCORE)
            return flat("5k_", folds.whole) | flat("1k_", folds.mean)

        return streaming_folds
    # The streaming pass's blocks: the same scores, so the same ranks to the last tie.
    blocks = BlockScorer(images, captions).plan(None, None, CAPTIONS_PER_IMAGE)

    def full_matrix():
        sims = similarity_matrix(
            images, captions, block_images=blocks[0], block_captions=blocks[1], **SCORE
        )
        if part == "f30k":
            return evaluate(sims)
        return flat("5k_", evaluate(sims)) | flat("1k_", evaluate_folds(sims, n_folds=5)[0])

    return full_matrix


def warmup_key(key: str) -> str:
    """The case run before a measured one (thread pools, BLAS buffers): the same, tiny."""
    return f"{key.rsplit(':', 1)[0]}:warmup"


# --------------------------------------------------------------------------- main
def run_part(part: str, size: str, device: torch.device) -> tuple[list[dict], list[str]]:
    label, sizes, _, impls = PARTS[part]
    n_images, dim = sizes[size]
    n_captions = n_images * CAPTIONS_PER_IMAGE
    shape = f"{label} {n_images}x{n_captions}, D {dim}"
    names = IMPLS if part == "f30k" else COCO_IMPLS
    rows, results = [], {}
    chan_matrix_mib = n_images * n_captions * 8 / 2**20
    chan_peak = None
    prefix = "" if part == "f30k" else "5k_"
    if part == "coco5k":
        rows.append(
            {
                "case": shape,
                "impl": "CHAN-style (not run): its float64 matrix alone",
                "time_s": "",
                "speedup": "",
                "peak_MiB": chan_matrix_mib,
                "peak_vs_chan": "100.0%",
                "rsum": "",
                "rsum_1k": "",
                "recalls": "",
                "ranks": "",
            }
        )
        chan_peak = chan_matrix_mib
    first_time = None
    for impl in impls:
        key = f"{part}:{impl}:{size}"
        measured = measure_once(key, build_case(key) if device.type == "cuda" else None, device)
        print(
            f"{key}: {measured['time_ms'] / 1e3:.1f} s, {measured['peak_MiB']:.1f} MiB", flush=True
        )
        results[impl] = measured["result"]
        first_time = first_time or measured["time_ms"]
        chan_peak = chan_peak or measured["peak_MiB"]
        rows.append(
            {
                "case": shape,
                "impl": names[impl],
                "time_s": measured["time_ms"] / 1e3,
                "speedup": f"{first_time / measured['time_ms']:.2f}x",
                "peak_MiB": measured["peak_MiB"],
                "peak_vs_chan": f"{100 * measured['peak_MiB'] / chan_peak:.1f}%",
                "rsum": results[impl][f"{prefix}rsum"],
                "rsum_1k": results[impl].get("1k_rsum", ""),
                "recalls": "",
                "ranks": "",
            }
        )
    reference = results["streaming"]
    differing = []
    for impl, row in zip(impls, rows[-len(impls) :]):
        keys = [k for k in reference if abs(results[impl][k] - reference[k]) > 1e-9]
        recalls = [k for k in keys if k.removeprefix("5k_").removeprefix("1k_") in RECALLS]
        row["recalls"] = "identical" if not recalls else f"{len(recalls)} differ"
        row["ranks"] = "identical" if not keys else ", ".join(k for k in keys if k not in recalls)
        # The fastalign paths share every number; the argsort ranking shares the recalls.
        differing += [f"{part}:{impl}:{k}" for k in (recalls if impl.startswith("chan") else keys)]
        if impl.startswith("chan") and len(keys) > len(recalls):
            print(f"{part}:{impl}: {row['ranks']} differ: exact score ties, see RECALLS")
    whole = {key: reference[f"{prefix}{key}"] for key in RESULT_KEYS}
    print(f"{shape}, streaming:\n{format_results(whole)}")
    if part == "coco5k":
        fold_mean = {key: reference[f"1k_{key}"] for key in RESULT_KEYS}
        print(f"COCO 1K (5-fold mean), streaming:\n{format_results(fold_mean)}")
    return rows, differing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 x 1000 and 500 x 2500")
    parser.add_argument("--part", choices=("f30k", "coco5k", "all"), default="all")
    args = parser.parse_args()
    device = torch.device("cpu")  # the CHAN-style loop and SCAN's ranking are numpy's
    size = "quick" if args.quick else "full"
    rows, differing = [], []
    for part in PARTS if args.part == "all" else (args.part,):
        part_rows, part_differing = run_part(part, size, device)
        rows += part_rows
        differing += part_differing
    suffix = "" if args.part == "all" else f"_{args.part}"
    name = f"retrieval{'_quick' if args.quick else ''}{suffix}"
    report(rows, name, f"retrieval evaluation on {machine_description(device)}")
    print(f"recalls and ranks identical in every part: {not differing}")
    if differing:
        raise SystemExit(f"the evaluations differ in {differing}")


if __name__ == "__main__":
    if not serve_memory_request(build_case, warmup_key):
        main()
