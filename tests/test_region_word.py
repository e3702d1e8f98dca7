"""region_word_similarity: every CPU-side backend against the plain-PyTorch reference."""

import itertools
import zlib

import pytest
import torch
from _helpers.region_word import COMBOS, make_inputs, options

import fastalign
from fastalign._backends import extension_loaded
from fastalign.ops.region_word import (
    ALIGNS,
    DIRECTIONS,
    region_word_similarity_reference,
)

needs_cpu_kernel = pytest.mark.skipif(not extension_loaded(), reason="fastalign._C not built")


def grads(fn, regions, words, region_lengths, word_lengths, upstream, **kw):
    regions = regions.detach().clone().requires_grad_()
    words = words.detach().clone().requires_grad_()
    scores = fn(regions, words, region_lengths, word_lengths, **kw)
    return (scores, *torch.autograd.grad((scores * upstream).sum(), (regions, words)))


def test_reference_matches_the_definition():
    """The reference against the definition written as loops over pairs and tokens."""
    regions, words, rl, wl = make_inputs(3, 4, 5, 6, 7)
    for direction, align, aggregate, activation in COMBOS:
        kw = options(direction, align, aggregate, activation)
        got = region_word_similarity_reference(regions, words, rl, wl, **kw)
        for i, t in itertools.product(range(3), range(4)):
            s = regions[i, : rl[i]] @ words[t, : wl[t]].T  # (valid regions, valid words)
            if activation:
                s = torch.nn.functional.leaky_relu(s, 0.1)

            def one_direction(scores, align=align, aggregate=aggregate):  # keys along dim 0
                if align == "max":
                    aligned = scores.max(0).values
                else:
                    aligned = 0.2 * torch.log(torch.exp(scores / 0.2).sum(0))
                return {
                    "mean": aligned.mean(),
                    "sum": aligned.sum(),
                    "max": aligned.max(),
                    "lse": 0.3 * torch.log(torch.exp(aligned / 0.3).sum()),
                }[aggregate]

            want = {"t2i": one_direction(s), "i2t": one_direction(s.T)}
            want["both"] = want["t2i"] + want["i2t"]
            torch.testing.assert_close(got[i, t], want[direction])


@needs_cpu_kernel
@pytest.mark.parametrize("direction,align,aggregate,activation", COMBOS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_forward_and_gradients_match_reference(direction, align, aggregate, activation, dtype):
    kw = options(direction, align, aggregate, activation)
    inputs = make_inputs(5, 7, 9, 11, 13, dtype=dtype, seed=zlib.crc32(str(kw).encode()))
    upstream = torch.randn(5, 7, dtype=dtype)
    got = grads(fastalign.region_word_similarity, *inputs, upstream, backend="cpu", **kw)
    want = grads(region_word_similarity_reference, *inputs, upstream, **kw)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-4, rtol=2e-4)
    for name, a, b in zip(("scores", "grad_regions", "grad_words"), got, want):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


@needs_cpu_kernel
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1, 1, 1), (3, 2, 1, 5, 17), (2, 3, 6, 1, 16), (4, 9, 36, 40, 33), (1, 5, 2, 3, 1)],
)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_cpu_odd_shapes(shape, direction):
    inputs = make_inputs(*shape, seed=sum(shape))
    upstream = torch.randn(shape[0], shape[1], dtype=torch.float64)
    kw = dict(direction=direction, aggregate="mean")
    got = grads(fastalign.region_word_similarity, *inputs, upstream, backend="cpu", **kw)
    want = grads(region_word_similarity_reference, *inputs, upstream, **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@needs_cpu_kernel
def test_cpu_many_tiles_match_reference():
    """Enough tokens for several row and column tiles, so tile seams are exercised."""
    inputs = make_inputs(23, 61, 36, 32, 24, dtype=torch.float32, seed=7)
    upstream = torch.randn(23, 61)
    for align in ALIGNS:
        kw = dict(direction="both", align=align, aggregate="mean")
        got = grads(fastalign.region_word_similarity, *inputs, upstream, backend="cpu", **kw)
        want = grads(region_word_similarity_reference, *inputs, upstream, **kw)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


@needs_cpu_kernel
@pytest.mark.parametrize("dim", [83, 128])
def test_cpu_every_path_matches_reference(cpu_path, dim):
    """The CPU kernels size their tiles and gather blocks from the L2 the CPU reports and run
    their gather at the CPU's x86-64 level: under the smallest and largest blocks they pick and
    at every level (AVX-512 where the CPU has it, AVX2, baseline) the results are the
    reference's: every block width and the last columns of an odd D."""
    inputs = make_inputs(19, 37, 36, 32, dim, dtype=torch.float32, seed=dim)
    upstream = torch.randn(19, 37)
    for align in ALIGNS:
        kw = dict(direction="both", align=align, aggregate="mean")
        got = grads(fastalign.region_word_similarity, *inputs, upstream, backend="cpu", **kw)
        want = grads(region_word_similarity_reference, *inputs, upstream, **kw)
        for name, a, b in zip(("scores", "grad_regions", "grad_words"), got, want):
            torch.testing.assert_close(
                a, b, atol=2e-4, rtol=2e-4, msg=lambda m, name=name: f"{name}: {m}"
            )


@needs_cpu_kernel
@pytest.mark.parametrize(
    "variable,value",
    [("FASTALIGN_CPU_ISA", "avx9"), ("FASTALIGN_L2_BYTES", "1M"), ("FASTALIGN_L2_BYTES", "0")],
)
def test_bad_cpu_path_variables_are_refused(monkeypatch, variable, value):
    """A mistyped stand-in for the machine is an error naming it, never silently ignored."""
    monkeypatch.setenv(variable, value)
    regions, words, rl, wl = make_inputs(3, 4, 5, 6, 20, dtype=torch.float32)
    regions.requires_grad_()
    with pytest.raises(ValueError, match=f"{variable} must be .*got '{value}'"):
        fastalign.region_word_similarity(regions, words, rl, wl, backend="cpu").sum().backward()


@needs_cpu_kernel
def test_padding_never_matters_and_gets_no_gradient():
    regions, words, rl, wl = make_inputs(4, 6, 8, 10, 12, padding_value=1e3, seed=3)
    clean_r, clean_w, _, _ = make_inputs(4, 6, 8, 10, 12, padding_value=0.0, seed=3)
    upstream = torch.randn(4, 6, dtype=torch.float64)
    for direction, align, aggregate, activation in COMBOS:
        kw = options(direction, align, aggregate, activation)
        loud = grads(fastalign.region_word_similarity, regions, words, rl, wl, upstream, **kw)
        quiet = grads(fastalign.region_word_similarity, clean_r, clean_w, rl, wl, upstream, **kw)
        for a, b in zip(loud, quiet):
            torch.testing.assert_close(a, b)
        assert (loud[1][torch.arange(8) >= rl[:, None]] == 0).all()
        assert (loud[2][torch.arange(10) >= wl[:, None]] == 0).all()


@needs_cpu_kernel
def test_ties_send_the_gradient_to_the_first_arg_max():
    regions = torch.zeros(1, 3, 2, dtype=torch.float64)
    regions[0, 1] = regions[0, 2] = torch.tensor([1.0, 0.0])  # two equal best regions
    words = torch.tensor([[[2.0, 1.0]]], dtype=torch.float64)
    got = grads(fastalign.region_word_similarity, regions, words, None, None, 1.0, backend="cpu")
    want = grads(region_word_similarity_reference, regions, words, None, None, 1.0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert got[1][0, 2].abs().sum() == 0 and got[1][0, 1].abs().sum() > 0


@needs_cpu_kernel
@pytest.mark.parametrize(
    "direction,align,aggregate",
    [
        ("t2i", "max", "mean"),
        ("i2t", "lse", "lse"),
        ("both", "max", "max"),
        ("both", "lse", "sum"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(direction, align, aggregate, backend):
    regions, words, rl, wl = make_inputs(2, 3, 4, 5, 6, seed=11)
    regions.requires_grad_()
    words.requires_grad_()

    def fn(r, w):
        return fastalign.region_word_similarity(
            r,
            w,
            rl,
            wl,
            direction=direction,
            align=align,
            aggregate=aggregate,
            score_activation="leaky_relu",
            backend=backend,
        )

    assert torch.autograd.gradcheck(fn, (regions, words))


@needs_cpu_kernel
def test_non_contiguous_inputs():
    regions, words, rl, wl = make_inputs(3, 4, 5, 6, 7)
    regions_t = regions.transpose(0, 1).contiguous().transpose(0, 1)  # same values, odd strides
    words_t = words.transpose(1, 2).contiguous().transpose(1, 2)
    assert not regions_t.is_contiguous() and not words_t.is_contiguous()
    upstream = torch.randn(3, 4, dtype=torch.float64)
    got = grads(fastalign.region_word_similarity, regions_t, words_t, rl, wl, upstream)
    want = grads(region_word_similarity_reference, regions, words, rl, wl, upstream)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@needs_cpu_kernel
@pytest.mark.parametrize("need_indices,need_values", [(True, True), (True, False), (False, False)])
def test_opcheck_forward(need_indices, need_values):
    regions, words, rl, wl = make_inputs(3, 4, 5, 6, 7)
    regions.requires_grad_(need_indices)
    words.requires_grad_(need_indices)
    for direction, align in itertools.product(range(3), range(2)):
        if align == 1 and need_indices and not need_values:
            continue  # align lse reads the values: the public function always keeps them
        leaky = need_values  # the leaky slope of align max reads the values
        args = (
            regions,
            words,
            rl,
            wl,
            direction,
            align,
            0,
            0.1,
            0.1,
            leaky,
            need_indices,
            need_values,
        )
        torch.library.opcheck(torch.ops.fastalign.region_word_forward.default, args)


@needs_cpu_kernel
def test_opcheck_backward():
    regions, words, rl, wl = make_inputs(3, 4, 5, 6, 7)
    _, a_t2i, idx_t2i, a_i2t, idx_i2t = torch.ops.fastalign.region_word_forward(
        regions, words, rl, wl, 2, 0, 0, 0.1, 0.1, False, True, True
    )
    coef_t2i, coef_i2t = torch.randn_like(a_t2i), torch.randn_like(a_i2t)
    torch.library.opcheck(
        torch.ops.fastalign.region_word_backward.default,
        (coef_t2i, idx_t2i, coef_i2t, idx_i2t, regions, words, rl, wl, 0, 0.1, False),
    )
    torch.library.opcheck(
        torch.ops.fastalign.region_word_backward.default,
        (coef_t2i, a_t2i, coef_i2t, a_i2t, regions, words, rl, wl, 1, 0.1, True),
    )


@needs_cpu_kernel
def test_torch_compile_fullgraph():
    regions, words, rl, wl = make_inputs(4, 5, 6, 7, 8, dtype=torch.float32)

    def loss_fn(r, w):
        scores = fastalign.region_word_similarity(
            r, w, rl, wl, direction="both", score_activation="leaky_relu"
        )
        return scores.diagonal().sum() - scores.logsumexp(1).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    upstream = torch.tensor(1.0)
    want = grads(lambda r, w, *_: loss_fn(r, w), regions, words, rl, wl, upstream)
    got = grads(lambda r, w, *_: compiled(r, w), regions, words, rl, wl, upstream)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_module_form_matches_function():
    regions, words, rl, wl = make_inputs(3, 4, 5, 6, 7)
    module = fastalign.nn.RegionWordSimilarity(direction="both", aggregate="lse", aggregate_tau=0.5)
    torch.testing.assert_close(
        module(regions, words, rl, wl),
        fastalign.region_word_similarity(
            regions, words, rl, wl, direction="both", aggregate="lse", aggregate_tau=0.5
        ),
    )
    assert "direction='both'" in repr(module)


@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(words=torch.randn(4, 6, 8, dtype=torch.float64)), ValueError, "feature size D"),
        (dict(words=torch.randn(4, 6, 7)), TypeError, "share a dtype"),
        (dict(regions=torch.randn(3, 7, dtype=torch.float64)), ValueError, "regions must be 3-D"),
        (dict(regions=torch.zeros(3, 5, 7, dtype=torch.int64)), TypeError, "floating-point"),
        (dict(words=torch.randn(0, 6, 7, dtype=torch.float64)), ValueError, "at least one"),
        (dict(regions=[[1.0]]), TypeError, "regions must be a torch.Tensor"),
        (dict(word_lengths=torch.tensor([1, 0, 2, 3])), ValueError, r"word_lengths\[1\] = 0"),
        (dict(word_lengths=torch.tensor([1, 7, 2, 3])), ValueError, "1 <= length <= 6"),
        (dict(region_lengths=torch.tensor([1, 2])), ValueError, r"shape \(3,\)"),
        (dict(region_lengths=torch.tensor([1.0, 2.0, 3.0])), TypeError, "integers"),
        (dict(direction="x2y"), ValueError, "direction must be one of"),
        (dict(align="mean"), ValueError, "align must be one of"),
        (dict(aggregate="median"), ValueError, "aggregate must be one of"),
        (dict(score_activation="relu"), ValueError, "score_activation"),
        (dict(align_tau=0.0), ValueError, "align_tau must be a positive"),
        (dict(aggregate_tau=float("nan")), ValueError, "aggregate_tau"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
        # unavailable without a GPU, refused for CPU tensors with one
        (dict(backend="cuda"), (RuntimeError, ValueError), "backend 'cuda' (is|needs)"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, error, message):
    regions, words, rl, wl = make_inputs(3, 4, 5, 6, 7)
    kw = dict(regions=regions, words=words, region_lengths=rl, word_lengths=wl) | change
    with pytest.raises(error, match=message):
        fastalign.region_word_similarity(**kw)


def test_half_precision_is_refused_on_cpu():
    regions, words, rl, wl = make_inputs(3, 4, 5, 6, 7, dtype=torch.bfloat16)
    if extension_loaded():
        with pytest.raises(TypeError, match="backend 'cpu' supports dtypes"):
            fastalign.region_word_similarity(regions, words, rl, wl, backend="cpu")


def test_backends_report_names_every_backend():
    report = fastalign.backends()
    assert set(report) == {"reference", "cpu", "triton", "cuda"}
    assert report["reference"] == "available"
    if not torch.cuda.is_available():
        assert report["cuda"] != "available"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_backends_match_reference(backend):
    if fastalign.backends()[backend] != "available":
        pytest.skip(f"{backend} backend not available")
    inputs = [x.cuda() for x in make_inputs(37, 53, 36, 40, 96, dtype=torch.float32)]
    upstream = torch.randn(37, 53, device="cuda")
    for direction, align, aggregate, activation in COMBOS:
        kw = options(direction, align, aggregate, activation)
        got = grads(fastalign.region_word_similarity, *inputs, upstream, backend=backend, **kw)
        want = grads(region_word_similarity_reference, *inputs, upstream, **kw)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


TRITON_COMBOS = [
    ("t2i", "max", "lse", None),  # CHAN
    ("both", "max", "mean", "leaky_relu"),  # LAPS
    ("i2t", "lse", "max", "leaky_relu"),
    ("both", "lse", "sum", None),
]
needs_triton = pytest.mark.triton_interpreter


@needs_triton
@pytest.mark.parametrize("direction,align,aggregate,activation", TRITON_COMBOS)
def test_triton_through_public_api_matches_reference(direction, align, aggregate, activation):
    """The custom op, its autograd and the shared backward formula (interpreter on CPU)."""
    kw = options(direction, align, aggregate, activation)
    inputs = make_inputs(4, 5, 7, 9, 19, dtype=torch.float32, seed=zlib.crc32(str(kw).encode()))
    upstream = torch.randn(4, 5)
    got = grads(fastalign.region_word_similarity, *inputs, upstream, backend="triton", **kw)
    want = grads(region_word_similarity_reference, *inputs, upstream, **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@needs_triton
def test_opcheck_triton_op():
    regions, words, rl, wl = make_inputs(2, 3, 4, 5, 16, dtype=torch.float32)
    regions.requires_grad_()
    words.requires_grad_()
    args = (regions, words, rl, wl, 2, 0, 3, 0.1, 0.1, True, True, True)
    torch.library.opcheck(torch.ops.fastalign.region_word_forward_triton.default, args)
