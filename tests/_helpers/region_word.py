"""Inputs and options shared by the region-word similarity tests (CPU, CUDA, emulation)."""

import itertools

import torch

from fastalign.ops.region_word import AGGREGATES, ALIGNS, DIRECTIONS

COMBOS = list(itertools.product(DIRECTIONS, ALIGNS, AGGREGATES, (None, "leaky_relu")))


def make_inputs(
    n_images, n_captions, n_regions, n_words, dim, dtype=torch.float64, seed=0, padding_value=None
):
    """Random inputs with random lengths that include 1 and the full padded size."""
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(n_images, n_regions, dim, generator=g, dtype=dtype)
    words = torch.randn(n_captions, n_words, dim, generator=g, dtype=dtype)
    region_lengths = torch.randint(1, n_regions + 1, (n_images,), generator=g)
    word_lengths = torch.randint(1, n_words + 1, (n_captions,), generator=g)
    region_lengths[0], word_lengths[0] = n_regions, 1
    region_lengths[-1], word_lengths[-1] = 1, n_words
    if padding_value is not None:  # padding must not matter: fill it with something loud
        regions[torch.arange(n_regions) >= region_lengths[:, None]] = padding_value
        words[torch.arange(n_words) >= word_lengths[:, None]] = padding_value
    return regions, words, region_lengths, word_lengths


def options(direction, align, aggregate, activation):
    return dict(
        direction=direction,
        align=align,
        aggregate=aggregate,
        align_tau=0.2,
        aggregate_tau=0.3,
        score_activation=activation,
    )
