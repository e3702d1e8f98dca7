"""region_word_similarity: plain PyTorch (the 4-D einsum of CHAN / LAPS) versus fastalign.

Training shape: Ni = Nt = 128, R = 36, L = 32 padded, real word lengths uniform in 6..32,
D = 1024, float32; forward, and forward + backward (t2i, max, mean).  Evaluation shape:
1000 images x 5000 captions, a CHAN-style loop over 128 x 128 blocks (each cropped to its
longest caption, as CHAN does) versus one fastalign call, for the uniform 6..32 lengths
and for Flickr30K-like lengths (mean about 12.4 words, up to 40).  Also times a plain GEMM
of the training shape's real-length FLOP count: the machine's ceiling.

    python benchmarks/bench_region_word.py [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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

import fastalign  # noqa: E402

TRAIN = dict(n_images=128, n_captions=128, n_regions=36, dim=1024)
EVAL = dict(n_images=1000, n_captions=5000, n_regions=36, dim=1024)
QUICK_EVAL = dict(n_images=200, n_captions=1000, n_regions=36, dim=1024)
LENGTHS = {"uniform": "6..32", "flickr": "Flickr30K-like"}
CHAN_BLOCK = 128


def caption_lengths(n: int, kind: str, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """(lengths, padded size): uniform in 6..32, or log-normal like Flickr30K's captions."""
    if kind == "uniform":
        return torch.randint(6, 33, (n,), generator=g), 32
    lengths = torch.exp(torch.log(torch.tensor(11.5)) + 0.38 * torch.randn(n, generator=g))
    return lengths.round().long().clamp(4, 40), 40


def make_inputs(n_images, n_captions, n_regions, dim, lengths, device, seed=0):
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
    """``key`` = shape:impl:mode:size:device:lengths; returns a zero-argument callable."""
    shape, impl, mode, size, device, lengths = key.split(":")
    sizes = TRAIN if shape == "train" else (QUICK_EVAL if size == "quick" else EVAL)
    regions, words, word_lengths = make_inputs(**sizes, lengths=lengths, device=device)
    if impl == "gemm":  # one GEMM with the real-length FLOP count
        a = regions.reshape(-1, regions.shape[2])
        b = words.reshape(-1, words.shape[2])[: int(word_lengths.sum())]
        return lambda: a @ b.T
    if shape == "eval":
        evaluate = chan_style_evaluation if impl == "plain" else fastalign_similarity
        return lambda: _no_grad(evaluate, regions, words, word_lengths)
    similarity = {"plain": plain_similarity, "fastalign": fastalign_similarity}[impl]
    if mode == "forward":
        return lambda: _no_grad(similarity, regions, words, word_lengths)
    regions.requires_grad_()
    words.requires_grad_()
    upstream = torch.randn(regions.shape[0], words.shape[0], device=device)

    def forward_backward():
        scores = similarity(regions, words, word_lengths)
        return torch.autograd.grad((scores * upstream).sum(), (regions, words))

    return forward_backward


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


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 200 x 1000 evaluation shape")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    size = "quick" if args.quick else "full"
    rows = []

    def measure(key, shape_name, impl_name, mode, flops, repeat, plain):
        ms = time_ms(build_case(key), device, repeat, warmup=repeat > 1)
        memory = peak_memory_mib(key, build_case(key) if device.type == "cuda" else None, device)
        row = _row(shape_name, impl_name, mode, ms, flops, memory, plain)
        rows.append(row)
        return plain or (ms, memory)

    train_regions, _, train_lengths = make_inputs(**TRAIN, lengths="uniform", device=device)
    flops = real_flops(train_regions, train_lengths)
    gemm_key = f"train:gemm:forward:{size}:{device.type}:uniform"
    gemm_ms = time_ms(build_case(gemm_key), device, args.repeat)
    rows.append(_row("train", "plain GEMM (ceiling)", "forward", gemm_ms, flops))
    for mode in ("forward", "forward+backward"):
        plain = None
        for impl in ("plain", "fastalign"):
            key = f"train:{impl}:{mode}:{size}:{device.type}:uniform"
            plain = measure(key, "train", impl, mode, flops, args.repeat, plain)

    sizes = QUICK_EVAL if args.quick else EVAL
    for lengths in LENGTHS:
        regions, words, word_lengths = make_inputs(**sizes, lengths=lengths, device=device)
        gap = (
            (
                _no_grad(fastalign_similarity, regions, words, word_lengths)
                - _no_grad(chan_style_evaluation, regions, words, word_lengths)
            )
            .abs()
            .max()
        )
        print(f"evaluation ({LENGTHS[lengths]} lengths): max |fastalign - plain| = {gap:.2e}")
        flops = real_flops(regions, word_lengths)
        shape_name = f"eval {sizes['n_images']}x{sizes['n_captions']}, {LENGTHS[lengths]}"
        plain = None
        for impl in ("plain", "fastalign"):
            key = f"eval:{impl}:forward:{size}:{device.type}:{lengths}"
            impl_name = "CHAN 128-block loop" if impl == "plain" else impl
            plain = measure(key, shape_name, impl_name, "forward", flops, 1, plain)
    report(rows, "region_word", f"region_word_similarity on {machine_description(device)}")


def _row(shape, impl, mode, ms, flops, memory=None, plain=None):
    """One table row; working memory = peak rise minus the returned tensors."""
    plain_ms, plain_memory = plain or (ms, memory)
    row = {
        "shape": shape,
        "impl": impl,
        "mode": mode,
        "time_ms": ms,
        "real_GFLOP/s": flops / ms / 1e6 if mode == "forward" else "",
        "speedup": plain_ms / ms if memory is not None else "",
    }
    if memory is None:
        return row | {"peak_MiB": "", "outputs_MiB": "", "working_MiB": "", "working_vs_plain": ""}
    working = max(memory[0] - memory[1], 0.0)
    plain_working = max(plain_memory[0] - plain_memory[1], 1e-9)
    return row | {
        "peak_MiB": memory[0],
        "outputs_MiB": memory[1],
        "working_MiB": working,
        "working_vs_plain": f"{100 * working / plain_working:.1f}%",
    }


if __name__ == "__main__":
    if not serve_memory_request(build_case, lambda key: key.replace(":full:", ":quick:")):
        main()
