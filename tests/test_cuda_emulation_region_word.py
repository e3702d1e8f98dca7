"""The CUDA region-word kernels (csrc/cuda/region_word.cuh) run on the CPU through the host
emulation, against the plain-PyTorch reference: scores, aligned values and arg-max indices,
and the gradients of the backward op (through the same Python autograd formula as
backend="cuda"), on fresh random inputs with odd sizes that cross the 2 x 2 pair tiles, the
32-token chunks of the forward, the 64-token / 64-feature tiles of the backward and the 16-wide
feature steps."""

import functools
import shutil

import pytest
import torch
from _helpers import cuda_emulation, seed_of
from _helpers.region_word import COMBOS, make_inputs, options

from fastalign.ops.region_word import (
    AGGREGATES,
    ALIGNS,
    DIRECTIONS,
    _make_backward,
    _setup_context,
    region_word_similarity_reference,
)

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

# (Ni, Nt, R, L, D): one pair and 2 x 2 pair tiles with odd edges; token counts across 32 and
# 64; D below 16, across 16 and across the 64-feature chunks of the backward.
SHAPES = [(1, 1, 1, 1, 1), (3, 5, 7, 9, 20), (4, 3, 70, 37, 70), (5, 2, 33, 65, 17)]


@functools.cache
def emulated_ops():
    return cuda_emulation.ops()


class EmulatedForward(torch.autograd.Function):
    """The emulated forward op with the autograd formula of fastalign::region_word_forward
    (fastalign/ops/region_word.py), whose backward calls the emulated backward op."""

    @staticmethod
    def forward(*args):
        return emulated_ops().region_word_forward(*args)

    setup_context = staticmethod(_setup_context)

    @staticmethod
    def backward(ctx, *grads):
        return _make_backward(emulated_ops().region_word_backward)(ctx, *grads)


def emulated_similarity(regions, words, region_lengths, word_lengths, **kw):
    """region_word_similarity's call of the compiled forward, on the emulated ops."""
    leaky = kw["score_activation"] == "leaky_relu"
    need_grad = regions.requires_grad or words.requires_grad
    scores, *_ = EmulatedForward.apply(
        regions,
        words,
        region_lengths,
        word_lengths,
        DIRECTIONS.index(kw["direction"]),
        ALIGNS.index(kw["align"]),
        AGGREGATES.index(kw["aggregate"]),
        kw["align_tau"],
        kw["aggregate_tau"],
        leaky,
        need_grad and kw["align"] == "max",
        need_grad and (kw["align"] == "lse" or kw["aggregate"] in ("max", "lse") or leaky),
    )
    return scores


def scores_and_grads(fn, regions, words, region_lengths, word_lengths, upstream, **kw):
    regions = regions.detach().clone().requires_grad_()
    words = words.detach().clone().requires_grad_()
    scores = fn(regions, words, region_lengths, word_lengths, **kw)
    grad_regions, grad_words = torch.autograd.grad((scores * upstream).sum(), (regions, words))
    return scores.detach(), grad_regions, grad_words


def check_against_reference(inputs, kw, seed, tol):
    regions, words, region_lengths, word_lengths = inputs
    upstream = torch.randn(
        regions.shape[0], words.shape[0], generator=torch.Generator().manual_seed(seed)
    )
    got = scores_and_grads(emulated_similarity, *inputs, upstream, **kw)
    want = scores_and_grads(
        region_word_similarity_reference,
        regions.double(),
        words.double(),
        region_lengths,
        word_lengths,
        upstream.double(),
        **kw,
    )
    assert got[0].dtype == regions.dtype and got[1].dtype == regions.dtype
    for g, w in zip(got, want):
        scale = max(w.abs().max().item(), 1.0)
        torch.testing.assert_close(g.double() / scale, w / scale, rtol=0, atol=tol)


@pytest.mark.parametrize("direction,align,aggregate,activation", COMBOS)
def test_every_mode_matches_reference(direction, align, aggregate, activation):
    seed = seed_of(direction, align, aggregate, activation)
    inputs = make_inputs(3, 5, 7, 9, 20, dtype=torch.float32, seed=seed)
    check_against_reference(inputs, options(direction, align, aggregate, activation), seed, 2e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "direction,align,aggregate,activation",
    [
        ("t2i", "max", "lse", None),
        ("both", "max", "mean", "leaky_relu"),
        ("both", "lse", "max", None),
    ],
)
def test_tile_boundaries_match_reference(shape, direction, align, aggregate, activation):
    seed = seed_of(shape, direction, align, aggregate)
    inputs = make_inputs(*shape, dtype=torch.float32, seed=seed)
    check_against_reference(inputs, options(direction, align, aggregate, activation), seed, 2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("align", ALIGNS)
def test_half_inputs(dtype, align):
    seed = seed_of(str(dtype), align)
    regions, words, rl, wl = make_inputs(3, 4, 11, 6, 24, dtype=torch.float32, seed=seed)
    inputs = (regions.to(dtype), words.to(dtype), rl, wl)  # the reference sees the same values
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3  # the scores are rounded to the dtype
    check_against_reference(inputs, options("both", align, "lse", "leaky_relu"), seed, tol)


@pytest.mark.parametrize("align", ALIGNS)
def test_aligned_values_and_indices(align):
    """need_values / need_indices: the aligned value and first arg-max key of every query
    token, 0 at padded tokens, empty when not asked for or (indices) under align lse."""
    regions, words, rl, wl = make_inputs(5, 3, 37, 9, 19, dtype=torch.float32, seed=3)
    tau = 0.2
    out = emulated_ops().region_word_forward(
        regions, words, rl, wl, 2, ALIGNS.index(align), 0, tau, 0.3, False, True, True
    )
    _, a_t2i, idx_t2i, a_i2t, idx_i2t = out
    s = torch.einsum("ird,twd->itrw", regions.double(), words.double())
    region_mask = torch.arange(37) < rl[:, None]
    word_mask = torch.arange(9) < wl[:, None]
    for scores_qk, key_mask, query_mask, values, indices in (
        (s.transpose(2, 3), region_mask[:, None, None, :], word_mask[None, :, :], a_t2i, idx_t2i),
        (s, word_mask[None, :, None, :], region_mask[:, None, :], a_i2t, idx_i2t),
    ):
        masked = scores_qk.masked_fill(~key_mask, float("-inf"))
        if align == "max":
            want = masked.max(-1)
            torch.testing.assert_close(indices, want.indices.int().where(query_mask, 0))
            want_values = want.values
        else:
            assert indices.numel() == 0
            want_values = tau * torch.logsumexp(masked / tau, -1)
        assert values.dtype == torch.float32
        torch.testing.assert_close(
            values.double(), want_values.where(query_mask, 0.0), rtol=1e-5, atol=1e-5
        )
    no_aux = emulated_ops().region_word_forward(
        regions, words, rl, wl, 0, 0, 0, tau, 0.3, False, False, False
    )
    assert all(x.numel() == 0 for x in no_aux[1:])


def test_padding_never_matters_and_gets_no_gradient():
    kw = options("both", "lse", "lse", "leaky_relu")
    regions, words, rl, wl = make_inputs(3, 4, 40, 70, 9, dtype=torch.float32, seed=5)
    loud_regions, loud_words, _, _ = make_inputs(
        3, 4, 40, 70, 9, dtype=torch.float32, seed=5, padding_value=float("nan")
    )
    upstream = torch.randn(3, 4)
    clean = scores_and_grads(emulated_similarity, regions, words, rl, wl, upstream, **kw)
    loud = scores_and_grads(emulated_similarity, loud_regions, loud_words, rl, wl, upstream, **kw)
    for a, b in zip(clean, loud):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (loud[1][torch.arange(40) >= rl[:, None]] == 0).all()
    assert (loud[2][torch.arange(70) >= wl[:, None]] == 0).all()


def test_ties_send_the_gradient_to_the_first_arg_max():
    regions, words, rl, wl = make_inputs(2, 3, 6, 5, 8, dtype=torch.float32, seed=9)
    rl[:], wl[:] = 6, 5
    regions[:, 4] = regions[:, 1]  # every word ties between regions 1 and 4
    words[:, 3] = words[:, 0]  # every region ties between words 0 and 3
    kw = options("both", "max", "sum", None)
    check_against_reference((regions, words, rl, wl), kw, 9, 2e-5)
    _, _, idx_t2i, _, idx_i2t = emulated_ops().region_word_forward(
        regions, words, rl, wl, 2, 0, 1, 0.2, 0.3, False, True, False
    )
    assert not (idx_t2i == 4).any() and not (idx_i2t == 3).any()


def test_broadcast_coefficients_are_read_through_their_strides():
    """The mean / sum coefficients arrive as stride-0 views; the backward must read them as
    they are, not as contiguous memory."""
    regions, words, rl, wl = make_inputs(3, 4, 7, 5, 6, dtype=torch.float32, seed=11)
    fwd = emulated_ops().region_word_forward(
        regions, words, rl, wl, 2, 0, 1, 0.2, 0.3, False, True, False
    )
    per_pair = torch.randn(3, 4)
    views = (per_pair[..., None].expand(3, 4, 5), per_pair[..., None].expand(3, 4, 7))
    got = emulated_ops().region_word_backward(
        views[0], fwd[2], views[1], fwd[4], regions, words, rl, wl, 0, 0.2, False
    )
    want = emulated_ops().region_word_backward(
        views[0].contiguous(),
        fwd[2],
        views[1].contiguous(),
        fwd[4],
        regions,
        words,
        rl,
        wl,
        0,
        0.2,
        False,
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def _forward_args(regions, words, rl, wl, direction=0, align=0, aggregate=0):
    return (regions, words, rl, wl, direction, align, aggregate, 0.1, 0.1, False, False, False)


@pytest.mark.parametrize(
    "change,error,message",
    [
        (lambda a: (a[0].double(), a[1].double(), *a[2:]), TypeError,
         "CUDA kernels take float16, bfloat16 or float32 .*float64 is refused"),
        (lambda a: (a[0], a[1][..., :-1], *a[2:]), ValueError, "must share the feature size D"),
        (lambda a: (a[0], a[1].half(), *a[2:]), TypeError, "must share a dtype"),
        (lambda a: (a[0][0], *a[1:]), ValueError, "must be 3-D"),
        (lambda a: (*a[:2], a[2][:-1], *a[3:]), ValueError,
         r"region_lengths must have shape \(3,\)"),
        (lambda a: (*a[:2], a[2].float(), *a[3:]), TypeError, "must hold integers"),
        (lambda a: (*a[:2], a[2] + 10, *a[3:]), ValueError, r"region_lengths\[0\] = 1\d"),
        (lambda a: (*a[:4], 3, *a[5:]), ValueError, "direction = 3, expected one of"),
        (lambda a: (*a[:5], 2, *a[6:]), ValueError, "align = 2, expected one of"),
        (lambda a: (*a[:6], 4, *a[7:]), ValueError, "aggregate = 4, expected one of"),
    ],
)  # fmt: skip
def test_forward_rejects_bad_inputs(change, error, message):
    args = _forward_args(*make_inputs(3, 4, 5, 6, 7, dtype=torch.float32))
    with pytest.raises(error, match=f"^region_word_forward: .*{message}"):
        emulated_ops().region_word_forward(*change(args))


def test_backward_rejects_mismatched_coefficients():
    regions, words, rl, wl = make_inputs(3, 4, 5, 6, 7, dtype=torch.float32)
    coef, idx = torch.zeros(3, 4, 6), torch.zeros(3, 4, 6, dtype=torch.int32)
    empty = torch.empty(0)
    backward = emulated_ops().region_word_backward
    with pytest.raises(ValueError, match=r"coef_t2i must have shape \(Ni, Nt, L\) = \[3, 4, 6\]"):
        backward(coef[..., :5], idx, empty, empty, regions, words, rl, wl, 0, 0.1, False)
    with pytest.raises(TypeError, match="aux_t2i must be int32 .* arg-max indices"):
        backward(coef, idx.float(), empty, empty, regions, words, rl, wl, 0, 0.1, False)
    with pytest.raises(ValueError, match=r"aux_t2i\[0, 0, 0\] = 9, expected an arg-max index"):
        backward(coef, idx + 9, empty, empty, regions, words, rl, wl, 0, 0.1, False)
    with pytest.raises(TypeError, match="aux_t2i must be Float .* aligned values"):
        backward(coef, idx, empty, empty, regions, words, rl, wl, 1, 0.1, False)


@pytest.mark.parametrize("aggregate", ["mean", "max", "lse"])
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_nan_propagates_wherever_it_sits(direction, aggregate):
    """The CUDA kernels look for no non-finite input (that would cost a sync); a NaN then flows
    as in the reference, whichever token holds it."""
    regions, words, rl, wl = make_inputs(2, 2, 5, 6, 4, dtype=torch.float32)
    kw = dict(direction=direction, align="max", aggregate=aggregate, align_tau=0.1,
              aggregate_tau=0.1, score_activation=None)  # fmt: skip
    for token in range(int(wl[1])):
        nan_words = words.clone()
        nan_words[1, token, 0] = float("nan")
        got = emulated_similarity(regions, nan_words, rl, wl, **kw)
        want = region_word_similarity_reference(regions, nan_words, rl, wl, **kw)
        torch.testing.assert_close(got, want, equal_nan=True)
