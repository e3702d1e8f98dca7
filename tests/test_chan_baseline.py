"""The CHAN-style baseline of benchmarks/bench_region_word.py against fastalign's call with
the same options, so that the speed-up the benchmark reports compares the same scores."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _helpers.region_word import make_inputs

from fastalign._backends import extension_loaded

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "bench_region_word", ROOT / "benchmarks" / "bench_region_word.py"
)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)

BACKENDS = [
    "reference",
    pytest.param(
        "cpu", marks=pytest.mark.skipif(not extension_loaded(), reason="fastalign._C not built")
    ),
]


def scores_and_grads(fn, regions, words, region_lengths, word_lengths, upstream, **kw):
    regions = regions.detach().clone().requires_grad_()
    words = words.detach().clone().requires_grad_()
    scores = fn(regions, words, region_lengths, word_lengths, **kw)
    return (scores, *torch.autograd.grad((scores * upstream).sum(), (regions, words)))


# Odd sizes, lengths 1 and the padded size included; "short": every length below the padded
# size, so the baseline's cut to the longest image and caption (CHAN's batch padding) matters.
@pytest.mark.parametrize("shape", [(5, 7, 9, 11, 13), (1, 3, 36, 40, 17), (6, 1, 2, 3, 31)])
@pytest.mark.parametrize("short", [False, True], ids=["full", "short"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_chan_style_baseline_matches_fastalign(shape, short, backend):
    regions, words, region_lengths, word_lengths = make_inputs(*shape, seed=sum(shape))
    # CHAN's embeddings are L2-normalised: the -1 its coding writes into masked scores is
    # then below (or at) every real score.
    regions, words = F.normalize(regions, dim=-1), F.normalize(words, dim=-1)
    if short:
        region_lengths = region_lengths.clamp(max=max(shape[2] - 1, 1))
        word_lengths = word_lengths.clamp(max=max(shape[3] - 1, 1))
    # Padding holds garbage that neither may read: CHAN's GEMM multiplies it, then masks it.
    regions[torch.arange(shape[2]) >= region_lengths[:, None]] = 1e3
    words[torch.arange(shape[3]) >= word_lengths[:, None]] = -1e3
    upstream = torch.randn(shape[0], shape[1], dtype=regions.dtype)
    inputs = (regions, words, region_lengths, word_lengths, upstream)
    want = scores_and_grads(bench.chan_style_similarity, *inputs)
    got = scores_and_grads(bench.fastalign_chan_similarity, *inputs, backend=backend)
    for name, g, w in zip(("scores", "grad regions", "grad words"), got, want):
        torch.testing.assert_close(g, w, msg=lambda m, name=name: f"{name}: {m}")


def test_chan_style_baseline_is_chans_score():
    """The baseline against CHAN's score written pair by pair: the max over an image's valid
    regions for each valid word, log-sum-exp over the words at temperature 0.1, unscaled."""
    regions, words, region_lengths, word_lengths = make_inputs(3, 4, 5, 6, 7, seed=2)
    regions, words = F.normalize(regions, dim=-1), F.normalize(words, dim=-1)
    got = bench.chan_style_similarity(regions, words, region_lengths, word_lengths)
    for i in range(3):
        for t in range(4):
            s = regions[i, : region_lengths[i]] @ words[t, : word_lengths[t]].T
            want = torch.log(torch.exp(s.max(0).values / 0.1).sum())
            torch.testing.assert_close(got[i, t], want)
