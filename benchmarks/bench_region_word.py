"""region_word_similarity: plain PyTorch (the 4-D tensor of CHAN / LAPS) versus fastalign.

Training shape: Ni = Nt = 128, R = 36, D = 1024, float32; forward, and forward + backward.
Two scores on it: t2i / max / mean with L = 32 padded and real word lengths uniform in
6..32 (the 4-D einsum versus fastalign); and CHAN's own, t2i / max / log-sum-exp (0.1)
with Flickr30K-like lengths (mean about 12.4 words, up to 40), the way CHAN's code scores
a training batch (:func:`chan_style_similarity`) versus fastalign. Evaluation shape: 1000
images x 5000 captions, a CHAN-style loop over 128 x 128 blocks (each cropped to its
longest caption, as CHAN does) versus one fastalign call, for Flickr30K-like lengths and
for the uniform 6..32 ones. Also times a plain GEMM of the training shape's real-length
FLOP count: the machine's ceiling. --quick: a 200 x 1000 evaluation, Flickr30K-like only.

    python benchmarks/bench_region_word.py [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import (  # noqa: E402
    compare_cases,
    machine_description,
    report,
    serve_memory_request,
    time_ms,
)

import fastalign  # noqa: E402

TRAIN = dict(n_images=128, n_captions=128, n_regions=36, dim=1024)
EVAL = dict(n_images=1000, n_captions=5000, n_regions=36, dim=1024)
QUICK_EVAL = dict(n_images=200, n_captions=1000, n_regions=36, dim=1024)
LENGTHS = {"uniform": "6..32", "flickr": "Flickr30K-like"}
MODES = ("forward", "forward+backward")
CHAN_BLOCK = 128
# CHAN's score of a batch (its scripts for Flickr30K and COCO: --coding_type VHACoding
# --pooling_type LSEPooling --belta 0.1): the LSE pooling's temperature, and the value its
# coding writes into masked scores.
CHAN_TAU = 0.1
CHAN_MASKED = -1.0


def caption_lengths(n: int, kind: str, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """(lengths, padded size): uniform in 6..32, or log-normal like Flickr30K's captions."""
    if kind == "uniform":
        return torch.randint(6, 33, (n,), generator=g), 32
    lengths = torch.exp(torch.log(torch.tensor(11.5)) + 0.38 * torch.randn(n, generator=g))
    return lengths.round().long().clamp(4, 40), 40


def make_inputs(n_images, n_captions, n_regions, dim, lengths, device, seed=0):
    """(regions, words, word_lengths): unit-norm embeddings, every region valid."""
    g = torch.Generator().manual_seed(seed)
    word_lengths, n_words = caption_lengths(n_captions, lengths, g)
    regions = F.normalize(torch.randn(n_images, n_regions, dim, generator=g), dim=-1)
    words = F.normalize(torch.randn(n_captions, n_words, dim, generator=g), dim=-1)
    return regions.to(device), words.to(device), word_lengths.to(device)


def plain_similarity(regions, words, word_lengths):
    """What CHAN / LAPS do: the (Ni, Nt, R, L) tensor cropped to the longest caption, max
    over regions, mean over the valid words."""
    words = words[:, : int(word_lengths.max())]
    scores = torch.einsum("ird,twd->itrw", regions, words)
    aligned = scores.max(dim=2).values
    mask = torch.arange(words.shape[1], device=words.device) < word_lengths[:, None]
    return (aligned * mask).sum(-1) / word_lengths


def fastalign_similarity(regions, words, word_lengths):
    return fastalign.region_word_similarity(regions, words, None, word_lengths)


def chan_style_similarity(
    regions: torch.Tensor,
    words: torch.Tensor,
    region_lengths: torch.Tensor,
    word_lengths: torch.Tensor,
) -> torch.Tensor:
    """(Ni, Nt) scores the way CHAN's code scores a training batch (VHA coding, then LSE
    pooling; ppanzx/CHAN lib/coding.py and lib/modules.py), the baseline of fastalign's
    :func:`fastalign_chan_similarity`.

    CHAN's batches are padded to their longest image and caption, so the inputs are cut to
    those first. Then: one GEMM of all regions by all words into (Ni, R, Nt, L), seen as
    (Ni, Nt, R, L); a float mask of that size, the product of the region and word masks;
    masked scores set to -1; the max over regions; words whose max is -1 (padding) set to
    -inf; log-sum-exp over words at temperature 0.1, not scaled back by it. Exact for
    unit-norm embeddings, whose scores are >= -1. The benchmark gives it every region valid:
    CHAN's training drops a fifth of them at random, padding that fastalign would skip.
    """
    regions = regions[:, : int(region_lengths.max())]
    words = words[:, : int(word_lengths.max())]
    (n_images, n_regions, dim), (n_captions, n_words, _) = regions.shape, words.shape
    scores = regions.reshape(-1, dim) @ words.reshape(-1, dim).T
    scores = scores.view(n_images, n_regions, n_captions, n_words).permute(0, 2, 1, 3)
    region_mask = torch.arange(n_regions, device=regions.device) < region_lengths[:, None]
    word_mask = torch.arange(n_words, device=words.device) < word_lengths[:, None]
    mask = region_mask.float().view(-1, 1) @ word_mask.float().view(1, -1)
    mask = mask.view(n_images, n_regions, n_captions, n_words).permute(0, 2, 1, 3)
    aligned = scores.masked_fill(mask == 0, CHAN_MASKED).max(dim=2).values  # (Ni, Nt, L)
    aligned[aligned == CHAN_MASKED] = float("-inf")
    return torch.logsumexp(aligned / CHAN_TAU, dim=-1)


def fastalign_chan_similarity(
    regions: torch.Tensor,
    words: torch.Tensor,
    region_lengths: torch.Tensor,
    word_lengths: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`chan_style_similarity` in one fastalign call: t2i / max / lse at CHAN's
    temperature, whose ``aggregate_tau * logsumexp(x / aggregate_tau)`` is divided by it."""
    scores = fastalign.region_word_similarity(
        regions,
        words,
        region_lengths,
        word_lengths,
        direction="t2i",
        align="max",
        aggregate="lse",
        aggregate_tau=CHAN_TAU,
        backend=backend,
    )
    return scores / CHAN_TAU


def chan_style_evaluation(regions, words, word_lengths):
    sims = torch.empty(regions.shape[0], words.shape[0], device=regions.device)
    for i in range(0, regions.shape[0], CHAN_BLOCK):
        for t in range(0, words.shape[0], CHAN_BLOCK):
            sims[i : i + CHAN_BLOCK, t : t + CHAN_BLOCK] = plain_similarity(
                regions[i : i + CHAN_BLOCK],
                words[t : t + CHAN_BLOCK],
                word_lengths[t : t + CHAN_BLOCK],
            )
    return sims


def real_flops(regions, word_lengths):
    return 2.0 * regions.shape[0] * regions.shape[1] * float(word_lengths.sum()) * regions.shape[2]


def build_case(key: str):
    """``key`` = shape:impl:mode:size:device:lengths; returns a zero-argument callable.

    impl: ``plain`` / ``fastalign`` (t2i / max / mean), ``chan`` / ``fastalign_chan``
    (CHAN's score, every region valid), or ``gemm`` (the ceiling)."""
    shape, impl, mode, size, device, lengths = key.split(":")
    regions, words, word_lengths = make_inputs(
        **_sizes(shape, size), lengths=lengths, device=device
    )
    if impl == "gemm":  # one GEMM with the real-length FLOP count
        a = regions.reshape(-1, regions.shape[2])
        b = words.reshape(-1, words.shape[2])[: int(word_lengths.sum())]
        return lambda: a @ b.T
    if shape == "eval":
        evaluate = chan_style_evaluation if impl == "plain" else fastalign_similarity
        return lambda: _no_grad(evaluate, regions, words, word_lengths)
    similarity = {
        "plain": plain_similarity,
        "fastalign": fastalign_similarity,
        "chan": partial(chan_style_similarity, region_lengths=_all_regions(regions)),
        "fastalign_chan": partial(fastalign_chan_similarity, region_lengths=_all_regions(regions)),
    }[impl]
    if mode == "forward":
        return lambda: _no_grad(similarity, regions, words, word_lengths=word_lengths)
    regions.requires_grad_()
    words.requires_grad_()
    upstream = torch.randn(regions.shape[0], words.shape[0], device=device)

    def forward_backward():
        scores = similarity(regions, words, word_lengths=word_lengths)
        return torch.autograd.grad((scores * upstream).sum(), (regions, words))

    return forward_backward


def _sizes(shape: str, size: str) -> dict[str, int]:
    return TRAIN if shape == "train" else QUICK_EVAL if size == "quick" else EVAL


def _all_regions(regions: torch.Tensor) -> torch.Tensor:
    return torch.full((regions.shape[0],), regions.shape[1], device=regions.device)


def suite(device: str) -> list[str]:
    """The case keys of the pytest-benchmark suite (benchmarks/test_kernels.py): fastalign at the
    training shape both ways and on the 200 x 1000 evaluation; the plain forward (BLAS-bound)
    as the suite's control of the machine's speed."""
    return [
        f"train:plain:forward:quick:{device}:uniform",
        f"train:fastalign:forward:quick:{device}:uniform",
        f"train:fastalign:forward+backward:quick:{device}:uniform",
        f"eval:fastalign:forward:quick:{device}:flickr",
    ]


def _no_grad(fn, *args, **kwargs):
    with torch.no_grad():
        return fn(*args, **kwargs)


def compare(
    labels: dict[str, str],
    impls: dict[str, str],
    case: tuple[str, str, str],
    device: torch.device,
    modes: tuple[str, ...],
    repeat: int,
) -> list[dict]:
    """Rows of :func:`compare_cases` for each mode (``impls``: table name -> impl of the case
    keys, the first the baseline), the real-length GFLOP/s added to forward rows, after
    printing the largest gap between the two implementations' forward scores.

    ``case`` = (shape, size, lengths) of the keys. ``repeat`` 1: one call each, no warm-up.
    """
    shape, size, lengths = case

    def key(impl: str, mode: str) -> str:
        return f"{shape}:{impl}:{mode}:{size}:{device.type}:{lengths}"

    (first, base), (second, fast) = (
        (name, build_case(key(impl, "forward"))()) for name, impl in impls.items()
    )
    label = ", ".join(labels.values())
    print(f"{label}: max |{second} - {first}| = {(fast - base).abs().max():.2e}", flush=True)
    regions, _, word_lengths = make_inputs(**_sizes(shape, size), lengths=lengths, device=device)
    flops = real_flops(regions, word_lengths)
    del base, fast, regions
    rows = []
    for mode in modes:
        keys = {name: key(impl, mode) for name, impl in impls.items()}
        found = compare_cases(
            {**labels, "mode": mode}, keys, build_case, device, repeat, repeat > 1
        )
        for row in found:
            row["real_GFLOP/s"] = flops / row["time_ms"] / 1e6 if mode == "forward" else ""
        rows += found
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a 200 x 1000 evaluation, Flickr30K-like only"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    size = "quick" if args.quick else "full"
    train = "train 128x128"

    rows = compare(
        {"shape": train, "lengths": LENGTHS["uniform"], "score": "max/mean"},
        {"plain": "plain", "fastalign": "fastalign"},
        ("train", size, "uniform"),
        device,
        MODES,
        args.repeat,
    )
    gemm = build_case(f"train:gemm:forward:{size}:{device.type}:uniform")
    gemm_ms = time_ms(gemm, device, args.repeat)
    regions, _, word_lengths = make_inputs(**TRAIN, lengths="uniform", device=device)
    ceiling = {
        **dict.fromkeys(rows[0], ""),  # no memory probe: blank
        **{k: rows[0][k] for k in ("shape", "lengths", "score", "mode")},
        "impl": "plain GEMM (ceiling)",
        "time_ms": gemm_ms,
        "real_GFLOP/s": real_flops(regions, word_lengths) / gemm_ms / 1e6,
    }
    rows.insert(0, ceiling)
    rows += compare(
        {"shape": train, "lengths": LENGTHS["flickr"], "score": f"CHAN max/LSE {CHAN_TAU}"},
        {"CHAN-style": "chan", "fastalign": "fastalign_chan"},
        ("train", size, "flickr"),
        device,
        MODES,
        args.repeat,
    )
    sizes = _sizes("eval", size)
    for lengths in ("flickr",) if args.quick else ("flickr", "uniform"):
        rows += compare(  # about a minute a call at full size: one call each
            {
                "shape": f"eval {sizes['n_images']}x{sizes['n_captions']}",
                "lengths": LENGTHS[lengths],
                "score": "max/mean",
            },
            {"CHAN 128-block loop": "plain", "fastalign": "fastalign"},
            ("eval", size, lengths),
            device,
            ("forward",),
            repeat=1,
        )
    report(rows, "region_word", f"region_word_similarity on {machine_description(device)}")


if __name__ == "__main__":
    if not serve_memory_request(build_case, lambda key: key.replace(":full:", ":quick:")):
        main()
