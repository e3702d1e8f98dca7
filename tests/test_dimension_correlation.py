"""dimension_correlation(_loss): every backend against the plain-PyTorch reference.

The reference is checked against the definition written out element by element; the C++ kernel
(both of its paths: through C and through the Gram matrices) and the Triton kernels (under
the interpreter, small shapes) are checked against the reference on fresh random inputs.
"""

import itertools
import math

import pytest
import torch
from _helpers import seed_of
from _helpers.gradient_checks import assert_gradient_scaled_and_not_aliased

import fastalign
from fastalign._backends import extension_loaded
from fastalign.ops._options import (
    CORRELATION_PATH_AUTO,
    CORRELATION_PATH_CORRELATION,
    CORRELATION_PATH_GRAM,
)
from fastalign.ops.dimension_correlation import (
    MODES,
    dimension_correlation_loss_reference,
    dimension_correlation_reference,
)

needs_cpu_kernel = pytest.mark.skipif(not extension_loaded(), reason="fastalign._C not built")
needs_triton = pytest.mark.triton_interpreter
OPTIONS = dict(off_diagonal_weight=0.02, tau=0.2, eps=1e-5)
PATHS = {
    "auto": CORRELATION_PATH_AUTO,
    "c": CORRELATION_PATH_CORRELATION,
    "gram": CORRELATION_PATH_GRAM,
}


def make_inputs(n, d, seed, dtype=torch.float64):
    """Paired features: b is a noisy linear image of a, so C is far from both 0 and I."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 0.5
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b = a @ (torch.eye(d, dtype=torch.float64) + mix) + torch.randn(n, d, generator=g) - 1
    return a.to(dtype), b.to(dtype)


def loss_and_grads(fn, a, b, upstream=1.0, **kw):
    a = a.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    loss = fn(a, b, **kw)
    return (loss, *torch.autograd.grad(loss * upstream, (a, b)))


def reference_loss_and_grads(a, b, upstream=1.0, **kw):
    """The reference in float64, whatever the inputs' dtype."""
    return loss_and_grads(
        dimension_correlation_loss_reference, a.double(), b.double(), upstream, **kw
    )


def assert_matches(got, want, rtol, context=""):
    """Loss and gradients, each within rtol of its own scale (at least 0.01: a loss near 0,
    e.g. N = 2, D = 1 where C is 1 - eps, has gradients near 0 too)."""
    for name, x, y in zip(("loss", "grad_a", "grad_b"), got, want):
        assert x.dtype == got[0].dtype and x.shape == y.shape, name
        scale = y.abs().max().item() + 0.01
        torch.testing.assert_close(
            x.double(),
            y,
            atol=rtol * scale,
            rtol=rtol,
            msg=lambda m, name=name: f"{name} {context}: {m}",
        )


def op_loss_and_grads(op, a, b, mode, path, **kw):
    """(loss, grad_a, grad_b) straight from the fused op (gradients computed in its forward)."""
    o = OPTIONS | kw
    return op(a, b, MODES.index(mode), o["off_diagonal_weight"], o["tau"], o["eps"], True, path)


# --------------------------------------------------------------------------- the reference
def test_reference_matches_the_definition():
    """The definition element by element: standardise, C_kl, barlow and softmax sums."""
    n, d, eps, lam, tau = 6, 4, 1e-5, 0.02, 0.2
    a, b = make_inputs(n, d, seed=1)

    def standardized(x, k):
        column = [x[r, k].item() for r in range(n)]
        mean = sum(column) / n
        var = sum((v - mean) ** 2 for v in column) / n
        return [(v - mean) / math.sqrt(var + eps) for v in column]

    c = [
        [sum(p * q for p, q in zip(standardized(a, k), standardized(b, m))) / n for m in range(d)]
        for k in range(d)
    ]
    barlow = sum((1 - c[k][k]) ** 2 for k in range(d)) + lam * sum(
        c[k][m] ** 2 for k in range(d) for m in range(d) if k != m
    )
    softmax = 0.0
    for k in range(d):
        row = math.exp(c[k][k] / tau) / sum(math.exp(c[k][m] / tau) for m in range(d))
        col = math.exp(c[k][k] / tau) / sum(math.exp(c[m][k] / tau) for m in range(d))
        softmax += -0.5 * (math.log(row) + math.log(col)) / d
    torch.testing.assert_close(dimension_correlation_reference(a, b, eps), torch.tensor(c).double())
    torch.testing.assert_close(fastalign.dimension_correlation(a, b, eps), torch.tensor(c).double())
    for mode, want in (("barlow", barlow), ("softmax", softmax)):
        got = dimension_correlation_loss_reference(a, b, mode, lam, tau, eps)
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def test_gram_identity():
    """||C||_F^2 = <A A^T, B B^T>_F / N^2, the identity the fast barlow path relies on."""
    a, b = make_inputs(5, 9, seed=2)
    c = dimension_correlation_reference(a, b)
    std = [(x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5) for x in (a, b)]
    gram = (std[0] @ std[0].T * (std[1] @ std[1].T)).sum() / 25
    torch.testing.assert_close(c.pow(2).sum(), gram)


# --------------------------------------------------------------------------- C++ kernel
CPU_SHAPES = [
    (2, 1),
    (2, 7),
    (3, 1),
    (5, 17),
    (17, 5),
    (31, 64),
    (64, 31),
    (127, 129),
    (600, 37),
    (13, 1100),
    (257, 301),
]


@needs_cpu_kernel
@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("mode", MODES)
def test_cpu_matches_reference(shape, mode):
    """The public function (auto path) in float64 and float32, upstream gradient != 1."""
    for dtype, rtol in ((torch.float64, 1e-9), (torch.float32, 2e-4)):
        a, b = make_inputs(*shape, seed=seed_of(shape, mode, dtype), dtype=dtype)
        upstream = 0.75
        got = loss_and_grads(
            fastalign.dimension_correlation_loss,
            a,
            b,
            upstream,
            mode=mode,
            backend="cpu",
            **OPTIONS,
        )
        assert got[0].dtype == dtype and got[0].shape == ()
        want = reference_loss_and_grads(a, b, upstream, mode=mode, **OPTIONS)
        assert_matches(got, want, rtol)


@needs_cpu_kernel
@pytest.mark.parametrize("shape", [(2, 3), (9, 40), (40, 9), (33, 33), (200, 301), (301, 200)])
@pytest.mark.parametrize("path", ["c", "gram"])
@pytest.mark.parametrize("need_grad", [True, False])
def test_cpu_both_barlow_paths(shape, path, need_grad):
    """Through C and through the Gram matrices, whichever is cheaper for the shape."""
    a, b = make_inputs(*shape, seed=seed_of(shape, path))
    op = torch.ops.fastalign.dimension_correlation_loss_forward
    o = OPTIONS
    loss, grad_a, grad_b = op(
        a, b, 0, o["off_diagonal_weight"], o["tau"], o["eps"], need_grad, PATHS[path]
    )
    want = reference_loss_and_grads(a, b, mode="barlow", **OPTIONS)
    if need_grad:
        assert_matches((loss, grad_a, grad_b), want, 1e-9)
    else:
        assert grad_a.numel() == 0 and grad_b.numel() == 0
        torch.testing.assert_close(loss, want[0])


@needs_cpu_kernel
@pytest.mark.parametrize("mode", MODES)
def test_cpu_several_row_blocks(mode):
    """N beyond the C++ kernel's 4096-row blocks (three blocks, the last one partial); without
    a gradient also D beyond its 256-column panels of b (the last one partial)."""
    a, b = make_inputs(9000, 23, seed=seed_of("blocks", mode), dtype=torch.float32)
    got = loss_and_grads(fastalign.dimension_correlation_loss, a, b, 0.5, mode=mode, **OPTIONS)
    want = reference_loss_and_grads(a, b, 0.5, mode=mode, **OPTIONS)
    assert_matches(got, want, 2e-4)
    a, b = make_inputs(9000, 300, seed=seed_of("panels", mode), dtype=torch.float32)
    got = fastalign.dimension_correlation_loss(a, b, mode=mode, **OPTIONS)
    want = dimension_correlation_loss_reference(a.double(), b.double(), mode=mode, **OPTIONS)
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-4 * want.abs().item())


@needs_cpu_kernel
@pytest.mark.parametrize("mode", MODES)
def test_cpu_large_mean_without_gradient(mode):
    """The forward without a gradient multiplies the raw a (mean 100, std 1) with the
    standardised b and corrects by a rank-one term: no precision lost to the mean."""
    g = torch.Generator().manual_seed(seed_of("mean", mode))
    a = torch.randn(4100, 70, generator=g) + 100
    b = (a - 100) * 0.5 + torch.randn(4100, 70, generator=g) * 0.5 - 100
    got = fastalign.dimension_correlation_loss(a, b, mode=mode, **OPTIONS)
    want = dimension_correlation_loss_reference(a.double(), b.double(), mode=mode, **OPTIONS)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


@needs_cpu_kernel
def test_cpu_largest_shape():
    a, b = make_inputs(600, 1100, seed=17, dtype=torch.float32)
    for mode in MODES:
        got = loss_and_grads(fastalign.dimension_correlation_loss, a, b, mode=mode, **OPTIONS)
        want = reference_loss_and_grads(a, b, mode=mode, **OPTIONS)
        assert_matches(got, want, 2e-4, context=mode)


@needs_cpu_kernel
@pytest.mark.parametrize("mode", MODES)
def test_cpu_fresh_random_inputs(mode, test_seed):
    """Random shapes (N 2..600, D 1..1100) drawn from the test seed: another
    FASTALIGN_TEST_SEED draws new ones."""
    g = torch.Generator().manual_seed(seed_of(test_seed, mode))
    for _ in range(2):
        n = int(torch.randint(2, 601, (1,), generator=g))
        d = int(torch.randint(1, 1101, (1,), generator=g))
        seed = int(torch.randint(0, 2**31, (1,), generator=g))
        a, b = make_inputs(n, d, seed=seed, dtype=torch.float32)
        got = loss_and_grads(fastalign.dimension_correlation_loss, a, b, mode=mode, **OPTIONS)
        want = reference_loss_and_grads(a, b, mode=mode, **OPTIONS)
        assert_matches(got, want, 2e-4, context=f"N={n} D={d} seed={seed}")


@needs_cpu_kernel
@pytest.mark.parametrize(
    "mode,shape", [("barlow", (4, 7)), ("barlow", (7, 4)), ("softmax", (5, 6)), ("softmax", (2, 3))]
)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(mode, shape, backend):
    """(4, 7) takes the Gram path (N < D) on cpu, (7, 4) the path through C."""
    a, b = make_inputs(*shape, seed=seed_of(mode, shape))
    a.requires_grad_()
    b.requires_grad_()

    def fn(x, y):
        return fastalign.dimension_correlation_loss(x, y, mode=mode, backend=backend, **OPTIONS)

    assert torch.autograd.gradcheck(fn, (a, b))


@needs_cpu_kernel
def test_gradient_is_scaled_by_grad_output_and_not_aliased():
    a, b = make_inputs(9, 12, seed=3)
    a.requires_grad_()
    assert_gradient_scaled_and_not_aliased(fastalign.dimension_correlation_loss(a, b), a)


@needs_cpu_kernel
def test_no_gradient_without_need():
    a, b = make_inputs(9, 12, seed=4)
    with torch.no_grad():
        loss = fastalign.dimension_correlation_loss(a.requires_grad_(), b)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, dimension_correlation_loss_reference(a.detach(), b))


@needs_cpu_kernel
@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_inputs(mode):
    a, b = make_inputs(11, 13, seed=5)
    a_t = a.T.contiguous().T
    b_t = b[:, torch.arange(13)].T.contiguous().T
    assert not a_t.is_contiguous() and not b_t.is_contiguous()
    got = loss_and_grads(fastalign.dimension_correlation_loss, a_t, b_t, mode=mode)
    want = reference_loss_and_grads(a, b, mode=mode)
    assert_matches(got, want, 1e-9)


@needs_cpu_kernel
@pytest.mark.parametrize("need_grad", [True, False])
@pytest.mark.parametrize("mode,path", [(0, 0), (0, 1), (0, 2), (1, 0)])
def test_opcheck_cpu(need_grad, mode, path):
    a, b = make_inputs(6, 10, seed=6)
    a.requires_grad_(need_grad)
    b.requires_grad_(need_grad)
    args = (a, b, mode, 0.02, 0.2, 1e-5, need_grad, path)
    torch.library.opcheck(torch.ops.fastalign.dimension_correlation_loss_forward.default, args)


@needs_cpu_kernel
@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_fullgraph(mode):
    a, b = make_inputs(12, 20, seed=7, dtype=torch.float32)
    module = fastalign.nn.DimensionCorrelationLoss(mode=mode, off_diagonal_weight=0.02)

    def loss_fn(x, y):
        return module(torch.tanh(x), y) * 2 + x.pow(2).mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    want = loss_and_grads(loss_fn, a, b)
    got = loss_and_grads(compiled, a, b)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)


# --------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("mode", MODES)
def test_constant_column_gives_no_nan(backend, mode):
    if fastalign.backends()[backend] != "available":
        pytest.skip(f"{backend} not available")
    a, b = make_inputs(7, 5, seed=8, dtype=torch.float32)
    a[:, 1] = 3.25  # zero variance: standardises to zeros thanks to eps
    b[:, 3] = -1.0
    got = loss_and_grads(fastalign.dimension_correlation_loss, a, b, mode=mode, backend=backend)
    assert all(torch.isfinite(x).all() for x in got)
    want = reference_loss_and_grads(a, b, mode=mode)
    assert_matches(got, want, 2e-4)


def test_dimension_correlation_function():
    a, b = make_inputs(8, 3, seed=10)
    a.requires_grad_()
    c = fastalign.dimension_correlation(a, b, eps=1e-3)
    assert c.shape == (3, 3)
    torch.testing.assert_close(c, dimension_correlation_reference(a, b, 1e-3))
    c.sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
    with pytest.raises(ValueError, match="must have one shape"):
        fastalign.dimension_correlation(a, b[:, :2])


def test_module_form_matches_function():
    a, b = make_inputs(9, 6, seed=11)
    module = fastalign.nn.DimensionCorrelationLoss(mode="softmax", tau=0.3)
    torch.testing.assert_close(
        module(a, b), fastalign.dimension_correlation_loss(a, b, mode="softmax", tau=0.3)
    )
    assert "mode='softmax'" in repr(module) and "tau=0.3" in repr(module)


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(a=torch.randn(1, 5, dtype=torch.float64)), ValueError, "must have one shape"),
        (
            dict(
                a=torch.randn(1, 5, dtype=torch.float64), b=torch.randn(1, 5, dtype=torch.float64)
            ),
            ValueError,
            "N >= 2",
        ),
        (dict(b=torch.randn(6, 4, dtype=torch.float64)), ValueError, "must have one shape"),
        (dict(b=torch.randn(6, 5)), TypeError, "share a dtype"),
        (dict(b=torch.randn(6, 5, dtype=torch.float64, device="meta")), ValueError, "one device"),
        (dict(a=torch.randn(6, 5, 1, dtype=torch.float64)), ValueError, "a must be 2-D"),
        (dict(b=torch.zeros(6, 5, dtype=torch.int64)), TypeError, "floating-point"),
        (dict(a=[[1.0, 2.0]]), TypeError, "a must be a torch.Tensor"),
        (dict(b=None), TypeError, "b must be a torch.Tensor"),
        (
            dict(
                a=torch.randn(6, 0, dtype=torch.float64), b=torch.randn(6, 0, dtype=torch.float64)
            ),
            ValueError,
            "D >= 1",
        ),
        (dict(mode="vicreg"), ValueError, "mode must be one of"),
        (dict(off_diagonal_weight=-0.1), ValueError, "off_diagonal_weight must be a finite"),
        (dict(off_diagonal_weight="1"), TypeError, "off_diagonal_weight must be a float"),
        (dict(tau=0.0), ValueError, "tau must be a finite number > 0"),
        (dict(eps=float("nan")), ValueError, "eps must be a finite"),
        (dict(eps=0), ValueError, "eps must be a finite number > 0"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
        (dict(backend="cuda"), RuntimeError, "backend 'cuda'"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, error, message):
    a, b = make_inputs(6, 5, seed=12)
    kw = dict(a=a, b=b) | change
    with pytest.raises(error, match=message):
        fastalign.dimension_correlation_loss(**kw)


def test_half_precision_is_refused_on_cpu():
    a, b = make_inputs(6, 5, seed=13, dtype=torch.bfloat16)
    if extension_loaded():
        with pytest.raises(TypeError, match="backend 'cpu' supports dtypes"):
            fastalign.dimension_correlation_loss(a, b, backend="cpu")


# --------------------------------------------------------------------------- Triton
TRITON_SHAPES = [(2, 1), (5, 17), (17, 5), (33, 40), (70, 36)]


@needs_triton
@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_matches_reference(shape):
    """Every mode and path through the kernels (interpreter on CPU tensors, float32)."""
    from fastalign.kernels.triton.dimension_correlation import dimension_correlation_loss_forward

    a, b = make_inputs(*shape, seed=seed_of("triton", shape), dtype=torch.float32)
    for mode, path in (("barlow", "c"), ("barlow", "gram"), ("softmax", "auto")):
        got = op_loss_and_grads(dimension_correlation_loss_forward, a, b, mode, PATHS[path])
        assert got[1].dtype == torch.float32 and got[1].shape == shape
        want = reference_loss_and_grads(a, b, mode=mode, **OPTIONS)
        assert_matches(got, want, 2e-4)


@needs_triton
def test_triton_multiple_tiles(monkeypatch):
    """Tiles of 16 and 32 rows and columns, so several programs meet along every side."""
    from fastalign.kernels.triton import _common
    from fastalign.kernels.triton import dimension_correlation as dc

    monkeypatch.setattr(_common, "matrix_tile", lambda dtype: 16)
    monkeypatch.setattr(dc, "_COLUMN_BLOCK", 16)
    monkeypatch.setattr(dc, "_ROW_BLOCK", 16)
    a, b = make_inputs(37, 35, seed=14, dtype=torch.float32)
    for mode, path in (("barlow", "c"), ("barlow", "gram"), ("softmax", "auto")):
        got = op_loss_and_grads(dc.dimension_correlation_loss_forward, a, b, mode, PATHS[path])
        want = reference_loss_and_grads(a, b, mode=mode, **OPTIONS)
        assert_matches(got, want, 2e-4)


@needs_triton
@pytest.mark.parametrize("mode", MODES)
def test_triton_through_public_api(mode):
    """The custom op, its autograd (upstream gradient != 1) and no-grad forward."""
    a, b = make_inputs(19, 23, seed=seed_of("api", mode), dtype=torch.float32)
    got = loss_and_grads(
        fastalign.dimension_correlation_loss, a, b, 2.5, mode=mode, backend="triton", **OPTIONS
    )
    want = reference_loss_and_grads(a, b, 2.5, mode=mode, **OPTIONS)
    assert_matches(got, want, 2e-4)
    with torch.no_grad():
        loss = fastalign.dimension_correlation_loss(a, b, mode=mode, backend="triton", **OPTIONS)
    torch.testing.assert_close(loss.double(), want[0], atol=1e-4, rtol=1e-4)


@needs_triton
def test_triton_float16_smoke():
    """float16 through the same kernels (bfloat16 tl.dot is broken in the interpreter)."""
    from fastalign.kernels.triton.dimension_correlation import dimension_correlation_loss_forward

    a, b = make_inputs(20, 24, seed=15, dtype=torch.float16)
    for mode, path in (("barlow", "c"), ("barlow", "gram")):
        got = op_loss_and_grads(dimension_correlation_loss_forward, a, b, mode, PATHS[path])
        assert all(x.dtype == torch.float16 for x in got)
        want = reference_loss_and_grads(a, b, mode=mode, **OPTIONS)
        assert_matches(got, want, 2e-2)


@needs_triton
@pytest.mark.parametrize("need_grad", [True, False])
def test_opcheck_triton(need_grad):
    a, b = make_inputs(6, 10, seed=16, dtype=torch.float32)
    a.requires_grad_(need_grad)
    b.requires_grad_(need_grad)
    args = (a, b, 0, 0.02, 0.2, 1e-5, need_grad, 0)
    torch.library.opcheck(
        torch.ops.fastalign.dimension_correlation_loss_forward_triton.default, args
    )


def test_aot_specs_describe_the_kernels():
    pytest.importorskip("triton")
    from fastalign.kernels.triton import dimension_correlation as dc

    specs = dc.aot_specs()
    dot_kernels = {
        dc._correlation_kernel,
        dc._correlation_grad_kernel,
        dc._gram_kernel,
        dc._gram_grad_kernel,
    }
    assert dot_kernels | {
        dc._column_stats_kernel,
        dc._standardize_backward_kernel,
        dc._logsumexp_kernel,
    } == {s["fn"] for s in specs}
    for spec in specs:
        arg_names = spec["fn"].arg_names
        assert list(spec["signature"]) == arg_names, spec["name"]
        assert {n for n in arg_names if spec["signature"][n] == "constexpr"} == set(
            spec["constexprs"]
        )
        assert spec["expect_mma"] == (spec["fn"] in dot_kernels), spec["name"]
    dtypes = {spec["signature"]["a_ptr"] for spec in specs if spec["fn"] is dc._gram_kernel}
    assert dtypes == {"*fp16", "*bf16"}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_on_gpu_matches_reference(dtype):
    if fastalign.backends()["triton"] != "available":
        pytest.skip("triton not available")
    rtol = 2e-3 if dtype == torch.float32 else 3e-2
    for (n, d), mode in itertools.product([(64, 512), (512, 96), (300, 1000)], MODES):
        a, b = (x.cuda() for x in make_inputs(n, d, seed=seed_of(n, d, mode), dtype=dtype))
        got = loss_and_grads(
            fastalign.dimension_correlation_loss, a, b, mode=mode, backend="triton", **OPTIONS
        )
        want = reference_loss_and_grads(a, b, mode=mode, **OPTIONS)
        assert_matches(got, want, rtol)
