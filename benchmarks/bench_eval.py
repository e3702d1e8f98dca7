"""Retrieval evaluation: a CHAN / SCAN-style loop versus fastalign, end to end.

Flickr30K test size: 1000 images x 5000 captions (5 per image), R = 36 regions, D = 1024,
caption lengths like Flickr30K's (log-normal, median 11.5 words, sigma 0.38, clamped to
4..40, padded to 40). Captions' words are noisy copies of their image's regions, so the
recalls are neither 0 nor 100. Scores: t2i / max over regions / mean over words.

- CHAN-style: features stored as float64 numpy arrays, captions padded to the longest
  caption of the whole test set (as SCAN / CHAN's encode_data does); 128 x 128 blocks, each
  converted to float32 and forming the (128, 128, R, L) tensor over that padded width,
  cropped to the block's longest caption afterwards (CHAN's ``get_fgsims(...)[:, :, :, :max_w]``),
  max over regions, masked mean over words, into a float64 numpy matrix; then ranks by
  one numpy argsort per image and per caption.
- CHAN-style, cropped first: the same, but each block's captions are cropped to its
  longest caption before the product: a baseline kinder than CHAN's own code.
- fastalign: features stored as float32 tensors; ``similarity_matrix`` (the fused operator,
  in blocks sized to a memory budget) + ``evaluate`` (ranks by counting).

Both must report identical recalls. Peak memory is the rise during the whole evaluation
(the stored features are not counted: their size is the features_MiB column).

    python benchmarks/bench_eval.py [--quick] [--device cpu|cuda] [--repeat N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import (  # noqa: E402
    machine_description,
    peak_memory_mib,
    report,
    serve_memory_request,
    time_ms,
)

from fastalign.evaluation import (  # noqa: E402
    RESULT_KEYS,
    evaluate,
    format_results,
    similarity_matrix,
)
from fastalign.tokens import Tokens  # noqa: E402

FULL = dict(n_images=1000, n_regions=36, dim=1024)
QUICK = dict(n_images=200, n_regions=36, dim=1024)
CAPTIONS_PER_IMAGE = 5
PADDED_WORDS = 40
SIGNAL = 0.065  # weight of the source region in a word embedding (sets the recalls)
CHAN_BLOCK = 128
IMPLS = {
    "chan": "CHAN-style 128-block loop + argsort",
    "chan_cropped": "the same, cropped first",
    "fastalign": "fastalign",
}
_LAST_SIMS: dict[str, object] = {}  # the last score matrix of each impl, for the check


# --------------------------------------------------------------------------- data
def caption_lengths(
    n: int, g: torch.Generator, shortest: int = 4, longest: int = PADDED_WORDS
) -> torch.Tensor:
    """Flickr30K-like caption lengths: log-normal around 11.5 words, clamped to
    shortest..longest (4..40 by default)."""
    log_length = torch.log(torch.tensor(11.5)) + 0.38 * torch.randn(n, generator=g)
    return log_length.exp().round().long().clamp(shortest, longest)


def make_features(
    n_images: int,
    n_regions: int,
    dim: int,
    seed: int = 0,
    shortest: int = 4,
    padded: int = PADDED_WORDS,
    signal: float = SIGNAL,
):
    """(regions (Ni, R, D), words (5 Ni, padded, D), word_lengths (5 Ni,)), float32, unit
    rows; caption lengths :func:`caption_lengths` in shortest..padded.

    Every word of caption j is a noisy copy of a random region of image j // 5 (``signal``:
    the region's weight, which sets the recalls).
    """
    g = torch.Generator().manual_seed(seed)
    n_captions = n_images * CAPTIONS_PER_IMAGE
    word_lengths = caption_lengths(n_captions, g, shortest, padded)
    regions = F.normalize(torch.randn(n_images, n_regions, dim, generator=g), dim=-1)
    words = torch.empty(n_captions, padded, dim)
    for start in range(0, n_captions, 500):  # in chunks: no second full-size temporary
        stop = min(start + 500, n_captions)
        owner = (torch.arange(start, stop) // CAPTIONS_PER_IMAGE)[:, None]
        source = torch.randint(0, n_regions, (stop - start, padded), generator=g)
        noise = torch.randn(stop - start, padded, dim, generator=g) / dim**0.5
        words[start:stop] = F.normalize(signal * regions[owner, source] + noise, dim=-1)
    return regions, words, word_lengths


# --------------------------------------------------------------------------- CHAN-style
def block_similarity(
    images: torch.Tensor,
    captions: torch.Tensor,
    lengths: torch.Tensor,
    aggregate: str = "mean",
    tau: float = 0.1,
):
    """The 4-D (images, captions, R, L) tensor, cropped to the longest caption of the block,
    max over regions, then over valid words the mean (``aggregate="mean"``) or ``tau *
    logsumexp(x / tau)`` (``"lse"``)."""
    longest = int(lengths.max())
    scores = torch.einsum("ird,twd->itrw", images, captions)[..., :longest]
    aligned = scores.max(dim=2).values  # (images, captions, longest)
    valid = torch.arange(longest, device=captions.device) < lengths[:, None]
    if aggregate == "lse":
        return tau * torch.logsumexp(aligned.masked_fill(~valid, float("-inf")) / tau, dim=-1)
    return (aligned * valid).sum(-1) / lengths


def chan_style_similarity(
    img_embs: np.ndarray,
    cap_embs: np.ndarray,
    cap_lens: np.ndarray,
    device,
    crop_first: bool,
    aggregate: str = "mean",
):
    """Score matrix as CHAN / SCAN build it: float64 storage, a block pair at a time
    (``aggregate``: see :func:`block_similarity`)."""
    n_images, n_captions = len(img_embs), len(cap_embs)
    sims = np.zeros((n_images, n_captions))  # float64, like theirs
    for i0 in range(0, n_images, CHAN_BLOCK):
        for t0 in range(0, n_captions, CHAN_BLOCK):
            lengths = cap_lens[t0 : t0 + CHAN_BLOCK]
            width = int(lengths.max()) if crop_first else cap_embs.shape[1]
            images = torch.from_numpy(img_embs[i0 : i0 + CHAN_BLOCK]).float().to(device)
            captions = torch.from_numpy(cap_embs[t0 : t0 + CHAN_BLOCK, :width]).float()
            block = block_similarity(
                images, captions.to(device), torch.from_numpy(lengths).to(device), aggregate
            )
            sims[i0 : i0 + CHAN_BLOCK, t0 : t0 + CHAN_BLOCK] = block.cpu().numpy()
    return sims


def argsort_ranks(sims: np.ndarray, per_image: int) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks as SCAN's i2t / t2i find them: a full argsort of every query's row."""
    n_images, n_captions = sims.shape
    ranks_i2t = np.zeros(n_images)
    for i in range(n_images):
        order = np.argsort(sims[i])[::-1]  # captions, best first
        ranks_i2t[i] = min(
            np.where(order == j)[0][0] for j in range(i * per_image, (i + 1) * per_image)
        )
    ranks_t2i = np.zeros(n_captions)
    by_caption = sims.T
    for j in range(n_captions):
        order = np.argsort(by_caption[j])[::-1]  # images, best first
        ranks_t2i[j] = np.where(order == j // per_image)[0][0]
    return ranks_i2t + 1, ranks_t2i + 1


def numpy_metrics(ranks_i2t: np.ndarray, ranks_t2i: np.ndarray) -> dict[str, float]:
    results = {}
    for name, ranks in (("i2t", ranks_i2t), ("t2i", ranks_t2i)):
        for k in (1, 5, 10):
            results[f"r{k}_{name}"] = 100.0 * float(np.mean(ranks <= k))
        results[f"medr_{name}"] = float(np.floor(np.median(ranks)))
        results[f"meanr_{name}"] = float(ranks.mean())
    results["rsum"] = sum(results[f"r{k}_{d}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return {key: results[key] for key in RESULT_KEYS}


def chan_style_evaluation(img_embs, cap_embs, cap_lens, device, impl) -> dict[str, float]:
    sims = chan_style_similarity(img_embs, cap_embs, cap_lens, device, impl == "chan_cropped")
    _LAST_SIMS[impl] = sims
    return numpy_metrics(*argsort_ranks(sims, CAPTIONS_PER_IMAGE))


# --------------------------------------------------------------------------- fastalign
def fastalign_evaluation(regions, words, word_lengths) -> dict[str, float]:
    sims = similarity_matrix(regions, Tokens(words, word_lengths))  # every region valid
    _LAST_SIMS["fastalign"] = sims
    return evaluate(sims, CAPTIONS_PER_IMAGE)


# --------------------------------------------------------------------------- cases
def build_case(key: str):
    """``key`` = impl:size:device; returns a zero-argument callable (inputs built here)."""
    impl, size, device = key.split(":")
    device = torch.device(device)
    regions, words, word_lengths = make_features(**(QUICK if size == "quick" else FULL))
    if impl.startswith("chan"):
        img_embs, cap_embs = regions.double().numpy(), words.double().numpy()
        cap_lens = word_lengths.numpy()
        del regions, words
        return lambda: chan_style_evaluation(img_embs, cap_embs, cap_lens, device, impl)
    regions, words, word_lengths = regions.to(device), words.to(device), word_lengths.to(device)
    return lambda: fastalign_evaluation(regions, words, word_lengths)


def features_mib(sizes: dict, itemsize: int) -> float:
    n_captions = sizes["n_images"] * CAPTIONS_PER_IMAGE
    elements = sizes["n_images"] * sizes["n_regions"] + n_captions * PADDED_WORDS
    return elements * sizes["dim"] * itemsize / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 images x 1000 captions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=None, help="default: 3 quick, 1 full")
    args = parser.parse_args()
    device = torch.device(args.device)
    size = "quick" if args.quick else "full"
    sizes = QUICK if args.quick else FULL
    repeat = args.repeat or (3 if args.quick else 1)
    shape = f"{sizes['n_images']}x{sizes['n_images'] * CAPTIONS_PER_IMAGE}, Flickr30K-like"

    rows, results, baseline = [], {}, None
    for impl in IMPLS:
        itemsize = 8 if impl.startswith("chan") else 4
        key = f"{impl}:{size}:{device.type}"
        case = build_case(key)

        def run(case=case, impl=impl):
            results[impl] = case()
            return results[impl]

        ms = time_ms(run, device, repeat, warmup=repeat > 1)
        del case
        peak, _ = peak_memory_mib(key, build_case(key) if device.type == "cuda" else None, device)
        baseline = baseline or (ms, peak)
        rows.append(
            {
                "shape": shape,
                "impl": IMPLS[impl],
                "features": "float64 numpy" if itemsize == 8 else "float32 tensor",
                "features_MiB": features_mib(sizes, itemsize),
                "time_ms": ms,
                "speedup": baseline[0] / ms,
                "peak_MiB": peak,
                "peak_vs_chan": f"{100 * peak / max(baseline[1], 1e-9):.1f}%",
                "r1_i2t": results[impl]["r1_i2t"],
                "r1_t2i": results[impl]["r1_t2i"],
                "rsum": results[impl]["rsum"],
            }
        )

    fast = _LAST_SIMS["fastalign"].cpu().numpy()
    gap = max(np.abs(fast - _LAST_SIMS[impl]).max() for impl in ("chan", "chan_cropped"))
    differing = [
        key
        for impl in ("chan", "chan_cropped")
        for key in RESULT_KEYS
        if abs(results[impl][key] - results["fastalign"][key]) > 1e-9
    ]
    print(f"max |fastalign - CHAN-style score| = {gap:.2e}")
    print("fastalign results:\n" + format_results(results["fastalign"]))
    print(
        f"recalls and ranks identical: {not differing}"
        + (f" (differ: {differing})" if differing else "")
    )
    report(rows, "eval", f"retrieval evaluation on {machine_description(device)}")
    if differing:
        raise SystemExit(f"fastalign and the CHAN-style evaluation differ in {differing}")


if __name__ == "__main__":
    if not serve_memory_request(build_case, lambda key: key.replace(":full:", ":quick:")):
        main()
