"""region_word_similarity: plain PyTorch (the 4-D einsum of CHAN / LAPS) versus fastalign.

Training shape: Ni = Nt = 128, R = 36, L = 32 padded, real word lengths uniform in 6..32,
D = 1024, float32; forward, and forward + backward (t2i, max, mean).  Evaluation shape:
1000 images x 5000 captions, CHAN-style 128 x 128 block loop versus one fastalign call.
Also times a plain GEMM of the same (real-length) FLOP count: the machine's ceiling.

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

TRAIN = dict(n_images=128, n_captions=128, n_regions=36, n_words=32, dim=1024)
EVAL = dict(n_images=1000, n_captions=5000, n_regions=36, n_words=32, dim=1024)
QUICK_EVAL = dict(n_images=200, n_captions=1000, n_regions=36, n_words=32, dim=1024)
CHAN_BLOCK = 128


def make_inputs(n_images, n_captions, n_regions, n_words, dim, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    regions = F.normalize(torch.randn(n_images, n_regions, dim, generator=g), dim=-1)
    words = F.normalize(torch.randn(n_captions, n_words, dim, generator=g), dim=-1)
    word_lengths = torch.randint(6, n_words + 1, (n_captions,), generator=g)
    return regions.to(device), words.to(device), word_lengths.to(device)


def plain_similarity(regions, words, word_lengths):
    """What CHAN / LAPS do: the whole (Ni, Nt, R, L) tensor, max over regions, masked mean."""
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


def build_case(key: str, device: torch.device | None = None):
    """``key`` = shape:impl:mode[:quick]; returns a zero-argument callable to measure."""
    shape, impl, mode, *flags = key.split(":")
    device = device or torch.device(flags[1] if len(flags) > 1 else "cpu")
    sizes = TRAIN if shape == "train" else (QUICK_EVAL if "quick" in flags else EVAL)
    regions, words, word_lengths = make_inputs(**sizes, device=device)
    if impl == "gemm":  # the same real-length FLOP count as one plain GEMM
        a = regions.reshape(-1, regions.shape[2])
        b = words[: int(word_lengths.sum()) // words.shape[1]].reshape(-1, words.shape[2])
        b = torch.cat([b, words.reshape(-1, words.shape[2])[: int(word_lengths.sum()) - len(b)]])
        return lambda: a @ b.T
    similarity = {"plain": plain_similarity, "fastalign": fastalign_similarity}[impl]
    if shape == "eval":
        evaluate = chan_style_evaluation if impl == "plain" else fastalign_similarity
        return lambda: _no_grad(evaluate, regions, words, word_lengths)
    if mode == "forward":
        return lambda: _no_grad(similarity, regions, words, word_lengths)
    regions.requires_grad_()
    words.requires_grad_()
    upstream = torch.randn(regions.shape[0], words.shape[0], device=device)

    def forward_backward():
        scores = similarity(regions, words, word_lengths)
        return torch.autograd.grad((scores * upstream).sum(), (regions, words))

    return forward_backward


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
    flags = (":quick" if args.quick else ":full") + f":{device.type}"
    rows = []
    train_regions, _, train_lengths = make_inputs(**TRAIN, device=device)
    flops = real_flops(train_regions, train_lengths)
    gemm_ms = time_ms(build_case("train:gemm:forward" + flags, device), device, args.repeat)
    rows.append(_row("train", "plain GEMM (ceiling)", "forward", gemm_ms, flops))
    for mode in ("forward", "forward+backward"):
        plain_ms = plain_memory = None
        for impl in ("plain", "fastalign"):
            key = f"train:{impl}:{mode}{flags}"
            ms = time_ms(build_case(key, device), device, args.repeat)
            memory = peak_memory_mib(key, build_case(key, device), device)
            plain_ms, plain_memory = plain_ms or ms, plain_memory or memory
            rows.append(_row("train", impl, mode, ms, flops, memory, plain_ms, plain_memory))
    sizes = QUICK_EVAL if args.quick else EVAL
    eval_regions, eval_words, eval_lengths = make_inputs(**sizes, device=device)
    want = _no_grad(chan_style_evaluation, eval_regions, eval_words, eval_lengths)
    got = _no_grad(fastalign_similarity, eval_regions, eval_words, eval_lengths)
    print(f"evaluation: max |fastalign - plain| = {(got - want).abs().max():.2e}")
    del want, got
    plain_ms = plain_memory = None
    for impl in ("plain", "fastalign"):
        key = f"eval:{impl}:forward{flags}"
        ms = time_ms(build_case(key, device), device, repeat=1)
        memory = peak_memory_mib(key, build_case(key, device), device)
        plain_ms, plain_memory = plain_ms or ms, plain_memory or memory
        rows.append(
            _row(
                f"eval {sizes['n_images']}x{sizes['n_captions']}",
                "CHAN 128-block loop" if impl == "plain" else impl,
                "forward",
                ms,
                real_flops(eval_regions, eval_lengths),
                memory,
                plain_ms,
                plain_memory,
            )
        )
    report(rows, "region_word", f"region_word_similarity on {machine_description(device)}")


def _row(shape, impl, mode, ms, flops, memory=None, plain_ms=None, plain_memory=None):
    """One table row; working memory = peak rise minus the returned tensors."""
    row = {
        "shape": shape,
        "impl": impl,
        "mode": mode,
        "time_ms": ms,
        "real_GFLOP/s": flops / ms / 1e6 if mode == "forward" else "",
        "speedup": plain_ms / ms if plain_ms else "",
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
    if not serve_memory_request(build_case):
        main()
