"""Triton region-word kernels under the interpreter (CPU tensors) against the reference."""

import pytest
import torch
import torch.nn.functional as F
from _helpers import seed_of

pytest.importorskip("triton")

from fastalign.kernels.triton import region_word as rw
from fastalign.ops.region_word import (
    AGGREGATES,
    ALIGNS,
    DIRECTIONS,
    LEAKY_SLOPE,
    region_word_similarity_reference,
)

pytestmark = pytest.mark.triton_interpreter
N_IMAGES, N_CAPTIONS = 3, 5
ALIGN_TAU, AGGREGATE_TAU = 0.1, 0.2


def make_inputs(n_regions, n_words, dim, seed, dtype=torch.float32, integer=False):
    gen = torch.Generator().manual_seed(seed)
    if integer:  # values in {-1, 0, 1}: many exactly tied scores
        regions = torch.randint(-1, 2, (N_IMAGES, n_regions, dim), generator=gen).to(dtype)
        words = torch.randint(-1, 2, (N_CAPTIONS, n_words, dim), generator=gen).to(dtype)
    else:
        regions = torch.randn(N_IMAGES, n_regions, dim, generator=gen).to(dtype)
        words = torch.randn(N_CAPTIONS, n_words, dim, generator=gen).to(dtype)
    region_lengths = torch.randint(1, n_regions + 1, (N_IMAGES,), generator=gen)
    word_lengths = torch.randint(1, n_words + 1, (N_CAPTIONS,), generator=gen)
    region_lengths[0], word_lengths[0] = 1, n_words  # always one minimal and one full length
    region_lengths[-1], word_lengths[-1] = n_regions, 1
    return regions, words, region_lengths, word_lengths


def dense_aux(regions, words, region_lengths, word_lengths, align, leaky):
    """(a_t2i, idx_t2i, a_i2t, idx_i2t) from the 4-D score tensor (test only)."""
    scores = torch.einsum("ird,twd->itrw", regions.float(), words.float())
    if leaky:
        scores = F.leaky_relu(scores, LEAKY_SLOPE)
    region_mask = torch.arange(regions.shape[1]) < region_lengths[:, None]  # (Ni, R)
    word_mask = torch.arange(words.shape[1]) < word_lengths[:, None]  # (Nt, L)
    out = []
    for keyed, key_mask, query_mask in (
        (scores, region_mask[:, None, :, None], word_mask[None, :, :]),
        (scores.transpose(2, 3), word_mask[None, :, :, None], region_mask[:, None, :]),
    ):
        masked = keyed.masked_fill(~key_mask, float("-inf"))
        if align == "max":
            values, index = masked.max(dim=2)
        else:
            values = ALIGN_TAU * torch.logsumexp(masked / ALIGN_TAU, dim=2)
            index = torch.zeros_like(values, dtype=torch.long)
        out.append(values * query_mask)
        out.append((index * query_mask).to(torch.int32))
    return out


def run_forward(inputs, direction, align, aggregate, leaky, need_aux=True, need_values=None):
    regions, words, region_lengths, word_lengths = inputs
    return rw.region_word_forward(
        regions,
        words,
        region_lengths,
        word_lengths,
        DIRECTIONS.index(direction),
        ALIGNS.index(align),
        AGGREGATES.index(aggregate),
        ALIGN_TAU,
        AGGREGATE_TAU,
        leaky,
        need_aux,
        need_aux if need_values is None else need_values,
    )


def reference(inputs, direction, align, aggregate, leaky):
    return region_word_similarity_reference(
        *inputs,
        direction=direction,
        align=align,
        aggregate=aggregate,
        align_tau=ALIGN_TAU,
        aggregate_tau=AGGREGATE_TAU,
        score_activation="leaky_relu" if leaky else None,
    )


def check_aux(inputs, outputs, direction, align, leaky):
    a_t2i, idx_t2i, a_i2t, idx_i2t = outputs[1:]
    want = dense_aux(*inputs, align, leaky)
    for name, got, expected, used in (
        ("a_t2i", a_t2i, want[0], direction != "i2t"),
        ("idx_t2i", idx_t2i, want[1], direction != "i2t" and align == "max"),
        ("a_i2t", a_i2t, want[2], direction != "t2i"),
        ("idx_i2t", idx_i2t, want[3], direction != "t2i" and align == "max"),
    ):
        if not used:
            assert got.numel() == 0, name
            continue
        assert got.shape == expected.shape, name
        if name.startswith("idx"):
            assert got.dtype == torch.int32
            assert torch.equal(got, expected), name
        else:
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=name)


FORWARD_SHAPES = [(1, 9, 8), (7, 17, 33), (20, 1, 33), (20, 17, 8), (7, 9, 33)]


@pytest.mark.parametrize("shape", FORWARD_SHAPES)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("align", ALIGNS)
def test_forward_matches_reference(shape, direction, align):
    inputs = make_inputs(*shape, seed=seed_of(shape, direction, align))
    for k, aggregate in enumerate(AGGREGATES):
        leaky = k % 2 == 1
        outputs = run_forward(inputs, direction, align, aggregate, leaky)
        expected = reference(inputs, direction, align, aggregate, leaky)
        assert outputs[0].shape == (N_IMAGES, N_CAPTIONS)
        assert outputs[0].dtype == torch.float32
        torch.testing.assert_close(outputs[0], expected, atol=1e-4, rtol=1e-4)
        if aggregate in ("mean", "max"):  # aux does not depend on the aggregate
            check_aux(inputs, outputs, direction, align, leaky)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_forward_indices_without_values(direction):
    inputs = make_inputs(7, 9, 16, seed=4)
    outputs = run_forward(inputs, direction, "max", "mean", False, need_values=False)
    assert outputs[1].numel() == 0 and outputs[3].numel() == 0
    want = dense_aux(*inputs, "max", False)
    for got, expected, used in (
        (outputs[2], want[1], direction != "i2t"),
        (outputs[4], want[3], direction != "t2i"),
    ):
        assert torch.equal(got, expected) if used else got.numel() == 0


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_forward_without_aux_returns_empty(direction):
    inputs = make_inputs(7, 9, 16, seed=3)
    outputs = run_forward(inputs, direction, "max", "mean", False, need_aux=False)
    assert all(t.numel() == 0 for t in outputs[1:])
    torch.testing.assert_close(
        outputs[0], reference(inputs, direction, "max", "mean", False), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("align", ALIGNS)
def test_forward_multiple_token_blocks_and_ties(monkeypatch, align):
    """Blocks of 16 tokens, so 20 regions / 17 words span two blocks; integer data ties."""
    monkeypatch.setattr(rw, "_token_block", lambda n: 16)
    inputs = make_inputs(20, 17, 24, seed=11, integer=True)
    for direction in DIRECTIONS:
        for aggregate, leaky in (("mean", True), ("lse", False)):
            outputs = run_forward(inputs, direction, align, aggregate, leaky)
            expected = reference(inputs, direction, align, aggregate, leaky)
            torch.testing.assert_close(outputs[0], expected, atol=1e-4, rtol=1e-4)
            check_aux(inputs, outputs, direction, align, leaky)


def kernel_gradients(inputs, direction, align, leaky, upstream):
    """Gradients of sum_{i,t} upstream[i,t] * S[i,t] with aggregate "sum" through the kernels."""
    regions, words, region_lengths, word_lengths = inputs
    outputs = run_forward(inputs, direction, align, "sum", leaky)
    _, a_t2i, idx_t2i, a_i2t, idx_i2t = outputs
    word_mask = (torch.arange(words.shape[1]) < word_lengths[:, None])[None]  # (1, Nt, L)
    region_mask = (torch.arange(regions.shape[1]) < region_lengths[:, None])[:, None]  # (Ni,1,R)

    def coef(aligned, mask):
        if aligned.numel() == 0:
            return aligned
        c = upstream[:, :, None].expand(aligned.shape).clone()
        if align == "max" and leaky:  # the max path passes act'(s) at the arg-max in coef
            c = torch.where(aligned > 0, c, LEAKY_SLOPE * c)
        return c * mask

    coef_t2i, coef_i2t = coef(a_t2i, word_mask), coef(a_i2t, region_mask)
    aux_t2i, aux_i2t = (idx_t2i, idx_i2t) if align == "max" else (a_t2i, a_i2t)
    return rw.region_word_backward(
        coef_t2i,
        aux_t2i,
        coef_i2t,
        aux_i2t,
        regions,
        words,
        region_lengths,
        word_lengths,
        ALIGNS.index(align),
        ALIGN_TAU,
        leaky,
    )


def reference_gradients(inputs, direction, align, leaky, upstream):
    regions, words, region_lengths, word_lengths = inputs
    regions = regions.double().requires_grad_()
    words = words.double().requires_grad_()
    score = reference(
        (regions, words, region_lengths, word_lengths), direction, align, "sum", leaky
    )
    score.backward(upstream.double())
    return regions.grad, words.grad


def check_gradients(inputs, direction, align, leaky, seed):
    upstream = torch.randn(N_IMAGES, N_CAPTIONS, generator=torch.Generator().manual_seed(seed))
    grad_regions, grad_words = kernel_gradients(inputs, direction, align, leaky, upstream)
    want_regions, want_words = reference_gradients(inputs, direction, align, leaky, upstream)
    for got, want, lengths in (
        (grad_regions, want_regions, inputs[2]),
        (grad_words, want_words, inputs[3]),
    ):
        assert got.dtype == inputs[0].dtype and got.shape == want.shape
        scale = want.abs().max().item() + 1.0
        torch.testing.assert_close(got.double(), want, atol=1e-4 * scale, rtol=1e-4)
        padded = torch.arange(got.shape[1]) >= lengths[:, None]
        assert torch.all(got[padded] == 0)


BACKWARD_SHAPES = [(7, 9, 33), (20, 17, 8), (1, 17, 33), (20, 1, 8)]


@pytest.mark.parametrize("shape", BACKWARD_SHAPES)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("align", ALIGNS)
@pytest.mark.parametrize("leaky", [False, True])
def test_backward_matches_autograd(shape, direction, align, leaky):
    inputs = make_inputs(*shape, seed=seed_of(shape, direction, align, leaky))
    check_gradients(inputs, direction, align, leaky, seed=5)


@pytest.mark.parametrize("align", ALIGNS)
def test_backward_multiple_blocks_and_chunks(monkeypatch, align):
    """Two token blocks per side and several D output chunks per program grid."""
    monkeypatch.setattr(rw, "_token_block", lambda n: 16)
    monkeypatch.setattr(rw, "_out_block", lambda align, dim: 16)
    inputs = make_inputs(20, 17, 40, seed=21)
    for direction, leaky in (("both", True), ("t2i", False)):
        check_gradients(inputs, direction, align, leaky, seed=7)


def test_backward_without_any_direction_is_zero():
    inputs = make_inputs(7, 9, 16, seed=4)
    empty = torch.empty(0)
    grad_regions, grad_words = rw.region_word_backward(
        empty, empty, empty, empty, *inputs, 0, ALIGN_TAU, False
    )
    assert torch.all(grad_regions == 0) and torch.all(grad_words == 0)


def test_float16_smoke():
    """float16 runs through the same kernels (bfloat16 tl.dot is broken in the interpreter)."""
    inputs = make_inputs(7, 9, 32, seed=9, dtype=torch.float16)
    outputs = run_forward(inputs, "both", "max", "mean", True)
    assert outputs[0].dtype == torch.float16
    as_float = (inputs[0].float(), inputs[1].float(), *inputs[2:])
    expected = reference(as_float, "both", "max", "mean", True)
    torch.testing.assert_close(outputs[0].float(), expected, atol=2e-2, rtol=1e-2)
    upstream = torch.ones(N_IMAGES, N_CAPTIONS)
    grad_regions, grad_words = kernel_gradients(inputs, "both", "max", True, upstream)
    want_regions, want_words = reference_gradients(as_float, "both", "max", True, upstream)
    assert grad_regions.dtype == torch.float16 and grad_words.dtype == torch.float16
    torch.testing.assert_close(grad_regions.double(), want_regions, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(grad_words.double(), want_words, atol=2e-2, rtol=1e-2)


def test_aot_specs_describe_the_kernels():
    specs = rw.aot_specs()
    assert {s["fn"] for s in specs} == {rw._region_word_fwd_kernel, rw._region_word_bwd_kernel}
    for spec in specs:
        arg_names = spec["fn"].arg_names
        assert list(spec["signature"]) == arg_names, spec["name"]
        for name in spec["constexprs"]:
            assert spec["signature"][name] == "constexpr"
        assert all(
            spec["signature"][n] != "constexpr" or n in spec["constexprs"] for n in arg_names
        )
        assert spec["expect_mma"] and spec["num_warps"] in (4, 8)
