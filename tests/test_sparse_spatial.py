"""sparse_select / sparse_spatial_loss: every backend against the plain-PyTorch reference.

The reference is checked against the definition written out element by element and against small
hand-derived cases; the C++ kernel and the Triton kernels (under the interpreter, small shapes)
are checked against the reference on fresh random inputs, in every kind x select x largest
combination, forward and gradients. Hard selections (threshold, topk) are discontinuous, so
inputs for them are drawn until no entry lies near a selection boundary (see
``separated_inputs``): a rounding difference between backends then cannot flip a selection.
"""

import itertools
import math

import pytest
import torch
from _helpers import seed_of
from _helpers.gradient_checks import assert_gradient_scaled_and_not_aliased
from _helpers.sparse_spatial import (
    COMBOS,
    TEMPERATURE,
    assert_matches,
    discrepancy,
    forward_loss_and_grads,
    loss_and_grads,
    make_inputs,
    options_for,
    per_row_alpha,
    reference_loss_and_grads,
    separated_inputs,
)

import fastalign
from fastalign._backends import extension_loaded
from fastalign.ops.sparse_spatial import (
    KINDS,
    SELECTS,
    sparse_spatial_loss_reference,
)

needs_cpu_kernel = pytest.mark.skipif(not extension_loaded(), reason="fastalign._C not built")
needs_triton = pytest.mark.triton_interpreter


# --------------------------------------------------------------------------- the reference
def test_reference_matches_the_definition():
    """The definition element by element (Python loops over a tiny N), every combination."""
    n, d = 5, 4
    img, txt = make_inputs(n, d, seed=1)
    alpha = 0.3

    def cos(a, b):
        return sum(p * q for p, q in zip(a, b)) / math.sqrt(
            sum(p * p for p in a) * sum(q * q for q in b)
        )

    rows_i = img.tolist()
    rows_t = txt.tolist()
    for kind, select, largest in COMBOS:
        if kind == "inter":
            x = [[1 - cos(rows_i[i], rows_t[j]) for j in range(n)] for i in range(n)]
            e = [[abs(x[i][j] - x[j][i]) for j in range(n)] for i in range(n)]
        else:
            e = [
                [
                    abs((1 - cos(rows_i[i], rows_i[j])) - (1 - cos(rows_t[i], rows_t[j])))
                    for j in range(n)
                ]
                for i in range(n)
            ]
        total = 0.0
        for i in range(n):
            others = [j for j in range(n) if j != i]
            values = [e[i][j] for j in others]
            mu = sum(values) / len(values)
            sigma = math.sqrt(sum((v - mu) ** 2 for v in values) / len(values))
            sign = 1 if largest else -1
            ranked = sorted(others, key=lambda j, i=i: (-sign * e[i][j], j))
            for j in others:
                z = sign * (e[i][j] - (mu + sign * alpha * sigma))
                if select == "threshold":
                    w = 1.0 if z > 0 else 0.0
                elif select == "soft":
                    w = 1 / (1 + math.exp(-z / TEMPERATURE))
                else:
                    w = 1.0 if j in ranked[:2] else 0.0
                total += w * e[i][j] ** 2
        k = 2 if select == "topk" else None
        got = sparse_spatial_loss_reference(img, txt, kind, select, alpha, k, TEMPERATURE, largest)
        torch.testing.assert_close(got, torch.tensor(total / n, dtype=torch.float64))


def test_sparse_select_hand_example():
    """Row 0: {1, 2} (mu 1.5, sigma 0.5); row 1: {3, 3} (equal: sigma 0, nothing passes a
    strict threshold, topk takes the lower column); row 2: {1, 5} (mu 3, sigma 2)."""
    e = torch.tensor([[9.0, 1.0, 2.0], [3.0, 9.0, 3.0], [1.0, 5.0, 9.0]], dtype=torch.float64)
    threshold = fastalign.sparse_select(e, "threshold", alpha=0.0)
    assert threshold.tolist() == [[0, 0, 1], [0, 0, 0], [0, 1, 0]]
    smallest = fastalign.sparse_select(e, "threshold", alpha=0.5, largest=False)
    assert smallest.tolist() == [[0, 1, 0], [0, 0, 0], [1, 0, 0]]  # below mu - 0.5 sigma
    assert fastalign.sparse_select(e, "topk", k=1).tolist() == [[0, 0, 1], [1, 0, 0], [0, 1, 0]]
    low = fastalign.sparse_select(e, "topk", k=1, largest=False)
    assert low.tolist() == [[0, 1, 0], [1, 0, 0], [1, 0, 0]]
    soft = fastalign.sparse_select(e, "soft", alpha=0.0, temperature=0.5)
    sig = torch.sigmoid(torch.tensor(1.0, dtype=torch.float64)).item()  # 0.5 / 0.5
    far = torch.sigmoid(torch.tensor(4.0, dtype=torch.float64)).item()  # 2 / 0.5
    want = [[0, 1 - sig, sig], [0.5, 0, 0.5], [1 - far, far, 0]]
    torch.testing.assert_close(soft, torch.tensor(want, dtype=torch.float64))
    # with the diagonal: row 1 = {3, 9, 3}, mu 5, sigma 2 sqrt(2)
    full = fastalign.sparse_select(e, "threshold", alpha=0.0, exclude_diagonal=False)
    assert full[1].tolist() == [0, 1, 0]
    rect = fastalign.sparse_select(e[:, :2], "topk", k=1, exclude_diagonal=False)
    assert rect.tolist() == [[1, 0], [0, 1], [0, 1]]


def test_sparse_select_soft_gradcheck():
    """Soft weights are differentiable in E (through mu and sigma too) and in alpha."""
    g = torch.Generator().manual_seed(3)
    e = torch.rand(6, 6, generator=g, dtype=torch.float64).requires_grad_()
    for alpha in (torch.tensor(0.4, dtype=torch.float64), per_row_alpha(6, seed=4)):
        alpha.requires_grad_()

        def fn(x, a):
            return fastalign.sparse_select(x, "soft", alpha=a, temperature=0.3)

        assert torch.autograd.gradcheck(fn, (e, alpha))


def test_hard_selection_carries_no_gradient():
    e = torch.rand(5, 5, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert not fastalign.sparse_select(e, "threshold", alpha=alpha).requires_grad
    assert not fastalign.sparse_select(e, "topk", k=2).requires_grad


def test_n2_has_one_entry_per_row_and_std_zero():
    """N = 2: each row has one candidate, its mean is itself and its std 0."""
    img, txt = make_inputs(2, 3, seed=5)
    e = discrepancy(img, txt, "inter")
    assert float(e[0, 1]) > 0.01
    for kind in KINDS:
        e = discrepancy(img, txt, kind)
        threshold = sparse_spatial_loss_reference(img, txt, kind, "threshold", alpha=-2.0)
        assert threshold.item() == 0.0  # E = mu and sigma = 0: nothing passes, any alpha
        soft = sparse_spatial_loss_reference(img, txt, kind, "soft", alpha=3.0)
        torch.testing.assert_close(soft, 0.5 * (e[0, 1] ** 2 + e[1, 0] ** 2) / 2)
        topk = sparse_spatial_loss_reference(img, txt, kind, "topk", k=1)
        torch.testing.assert_close(topk, (e[0, 1] ** 2 + e[1, 0] ** 2) / 2)


# --------------------------------------------------------------------------- C++ kernel
CPU_SHAPES = [(2, 3), (3, 1), (3, 8), (17, 9), (40, 3), (130, 33), (301, 17)]


@needs_cpu_kernel
@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("kind,select,largest", COMBOS)
def test_cpu_matches_reference(shape, kind, select, largest):
    """float64, upstream gradient != 1, a per-row alpha that takes a gradient in soft mode;
    (301, 17) spans two 256-row strips of the C++ kernel's products."""
    n, d = shape
    seed = seed_of(shape, kind, select, largest)
    options = options_for(select, n, alpha=per_row_alpha(n, seed))
    img, txt = separated_inputs(n, d, seed, kind, options, largest)
    kw = dict(kind=kind, largest=largest, **options)
    got = loss_and_grads(fastalign.sparse_spatial_loss, img, txt, 0.75, backend="cpu", **kw)
    assert got[0].dtype == torch.float64 and got[0].shape == ()
    want = reference_loss_and_grads(img, txt, 0.75, **kw)
    assert_matches(got, want, 1e-9, context=f"{kind} {select} largest={largest}")


@needs_cpu_kernel
@pytest.mark.parametrize("kind,select,largest", COMBOS)
def test_cpu_float32(kind, select, largest):
    """float32 against the float64 reference."""
    n, d = 150, 45
    seed = seed_of("f32", kind, select, largest)
    options = options_for(select, n, alpha=0.8)
    img, txt = separated_inputs(n, d, seed, kind, options, largest, torch.float32, margin=3e-6)
    kw = dict(kind=kind, largest=largest, **options)
    got = loss_and_grads(fastalign.sparse_spatial_loss, img, txt, backend="cpu", **kw)
    want = reference_loss_and_grads(img, txt, **kw)
    assert_matches(got, want, 5e-4)


@needs_cpu_kernel
@pytest.mark.parametrize("shape", [(150, 45), (97, 200), (260, 129)])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("select", ["threshold", "topk"])
def test_cpu_float32_sparse_gradient_products(cpu_path, shape, kind, select):
    """A hard selection of a sixth or less of each row: the float32 gradient products gather
    over the nonzeros (csrc/cpu/sparse_rows_matmul.h), here with D across the column blocks and
    the last columns, on every CPU path (block widths from the smallest and largest L2, every
    x86-64 level)."""
    n, d = shape
    seed = seed_of("sparse", shape, kind, select)
    options = options_for(select, n, alpha=1.2) | ({"k": n // 8} if select == "topk" else {})
    img, txt = separated_inputs(n, d, seed, kind, options, True, torch.float32, margin=3e-6)
    weights = fastalign.sparse_select(discrepancy(img, txt, kind), **options)
    mirrored = (weights != 0) | (weights != 0).T
    assert mirrored.double().mean() < 0.35  # the products take the gather path
    kw = dict(kind=kind, **options)
    got = loss_and_grads(fastalign.sparse_spatial_loss, img, txt, 1.3, backend="cpu", **kw)
    want = reference_loss_and_grads(img, txt, 1.3, **kw)
    assert_matches(got, want, 5e-4, context=f"{shape} {kind} {select}")


@needs_cpu_kernel
@pytest.mark.parametrize("select", SELECTS)
def test_cpu_fresh_random_inputs(select, test_seed):
    """Random shapes (N 2..400, D 1..200) and options drawn from the test seed: another
    FASTALIGN_TEST_SEED draws new ones."""
    g = torch.Generator().manual_seed(seed_of(test_seed, select))
    for _ in range(3):
        n = int(torch.randint(2, 401, (1,), generator=g))
        d = int(torch.randint(1, 201, (1,), generator=g))
        seed = int(torch.randint(0, 2**31, (1,), generator=g))
        kind = KINDS[seed % 2]
        largest = bool(seed % 3)
        alpha = float(torch.rand(1, generator=g)) * 2 - 0.5
        options = options_for(select, n, alpha=alpha) | (
            dict(k=int(torch.randint(1, n, (1,), generator=g))) if select == "topk" else {}
        )
        img, txt = separated_inputs(n, d, seed, kind, options, largest)
        kw = dict(kind=kind, largest=largest, **options)
        got = loss_and_grads(fastalign.sparse_spatial_loss, img, txt, backend="cpu", **kw)
        want = reference_loss_and_grads(img, txt, **kw)
        assert_matches(got, want, 1e-9, context=f"N={n} D={d} seed={seed} {kw}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kind,select,largest", COMBOS)
def test_gradcheck_float64(backend, kind, select, largest):
    """Hard selections on inputs whose boundaries are far from gradcheck's perturbations;
    soft mode with alpha as a 0-d tensor and as a per-row tensor."""
    if backend == "cpu" and not extension_loaded():
        pytest.skip("fastalign._C not built")
    n, d = 6, 4
    seed = seed_of("gradcheck", kind, select, largest)
    alphas = [torch.tensor(0.7, dtype=torch.float64), per_row_alpha(n, seed)]
    for alpha in alphas if select == "soft" else alphas[:1]:
        options = options_for(select, n, alpha=alpha)
        img, txt = separated_inputs(n, d, seed, kind, options, largest, margin=1e-4)
        inputs = [img.requires_grad_(), txt.requires_grad_()]
        if select == "soft":
            inputs.append(alpha.requires_grad_())

        def fn(x, y, *a, options=options):
            kw = options | (dict(alpha=a[0]) if a else {})
            return fastalign.sparse_spatial_loss(
                x, y, kind=kind, largest=largest, backend=backend, **kw
            )

        assert torch.autograd.gradcheck(fn, tuple(inputs))


@needs_cpu_kernel
def test_scalar_alpha_gets_the_sum_of_the_per_row_gradients():
    img, txt = make_inputs(9, 5, seed=6)
    scalar = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    rows = torch.full((9,), 0.4, dtype=torch.float64, requires_grad=True)
    for backend in ("reference", "cpu"):
        (g_scalar,) = torch.autograd.grad(
            fastalign.sparse_spatial_loss(img, txt, select="soft", alpha=scalar, backend=backend),
            scalar,
        )
        (g_rows,) = torch.autograd.grad(
            fastalign.sparse_spatial_loss(img, txt, select="soft", alpha=rows, backend=backend),
            rows,
        )
        assert g_scalar.shape == () and g_rows.shape == (9,)
        assert g_scalar.item() < 0  # a higher threshold selects less
        torch.testing.assert_close(g_scalar, g_rows.sum())


@needs_cpu_kernel
def test_gradient_is_scaled_by_grad_output_and_not_aliased():
    img, txt = make_inputs(9, 12, seed=7)
    img.requires_grad_()
    loss = fastalign.sparse_spatial_loss(img, txt, select="soft")
    assert_gradient_scaled_and_not_aliased(loss, img)


@needs_cpu_kernel
@pytest.mark.parametrize("select", SELECTS)
def test_no_gradient_without_need(select):
    img, txt = make_inputs(9, 12, seed=8)
    options = options_for(select, 9)
    with torch.no_grad():
        loss = fastalign.sparse_spatial_loss(img.requires_grad_(), txt, **options)
    assert not loss.requires_grad
    want = sparse_spatial_loss_reference(img.detach(), txt, **options)
    torch.testing.assert_close(loss, want)
    alpha = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    hard = fastalign.sparse_spatial_loss(img.detach(), txt, select="threshold", alpha=alpha)
    assert not hard.requires_grad  # alpha takes no gradient through a hard selection


@needs_cpu_kernel
def test_non_contiguous_inputs():
    img, txt = make_inputs(11, 13, seed=9)
    img_t = img.T.contiguous().T
    txt_t = txt[:, torch.arange(13)].T.contiguous().T
    assert not img_t.is_contiguous() and not txt_t.is_contiguous()
    for kind in KINDS:
        got = loss_and_grads(fastalign.sparse_spatial_loss, img_t, txt_t, kind=kind, select="soft")
        want = reference_loss_and_grads(img, txt, kind=kind, select="soft")
        assert_matches(got, want, 1e-9)


@needs_cpu_kernel
@pytest.mark.parametrize("need_grad", [True, False])
@pytest.mark.parametrize("kind,select,largest", [(0, 0, True), (1, 1, False), (0, 2, False)])
def test_opcheck_cpu(need_grad, kind, select, largest):
    img, txt = make_inputs(7, 10, seed=10)
    alpha = per_row_alpha(7, seed=11)
    for x in (img, txt, alpha):
        x.requires_grad_(need_grad)
    args = (img, txt, alpha, kind, select, 2, 0.2, largest, need_grad)
    torch.library.opcheck(torch.ops.fastalign.sparse_spatial_loss_forward.default, args)


@needs_cpu_kernel
@pytest.mark.parametrize("select", SELECTS)
def test_torch_compile_fullgraph(select):
    img, txt = make_inputs(12, 20, seed=12, dtype=torch.float32)
    module = fastalign.nn.SparseSpatialLoss(kind="intra", **options_for(select, 12, alpha=0.6))

    def loss_fn(x, y):
        return module(torch.tanh(x), y) * 2 + x.pow(2).mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    want = loss_and_grads(loss_fn, img, txt)
    got = loss_and_grads(compiled, img, txt)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)


@needs_cpu_kernel
def test_torch_compile_fullgraph_learned_alpha():
    """A learned alpha (module parameter) gets the eager gradient under torch.compile."""
    img, txt = make_inputs(12, 20, seed=20, dtype=torch.float32)
    grads = []
    for compile_it in (False, True):
        alpha = torch.nn.Parameter(torch.tensor(0.3))
        module = fastalign.nn.SparseSpatialLoss(select="soft", alpha=alpha, temperature=0.2)
        fn = torch.compile(module, fullgraph=True, backend="aot_eager") if compile_it else module
        fn(img, txt).backward()
        grads.append(alpha.grad)
    assert grads[0] != 0
    torch.testing.assert_close(grads[1], grads[0])


# --------------------------------------------------------------------------- edge cases
def available(backend):
    if fastalign.backends()[backend] != "available":
        pytest.skip(f"{backend} not available")


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_equal_rows_select_nothing_and_give_zero(backend):
    """Identical pairs: every E is 0 (up to rounding): loss and gradients 0, never NaN."""
    available(backend)
    img = torch.tensor([[1.0, 2.0, -1.0]]).repeat(5, 1)
    txt = torch.tensor([[0.5, -1.0, 3.0]]).repeat(5, 1)
    for kind, select in itertools.product(KINDS, SELECTS):
        options = options_for(select, 5, alpha=-1.0)
        got = loss_and_grads(
            fastalign.sparse_spatial_loss, img, txt, kind=kind, backend=backend, **options
        )
        assert abs(got[0].item()) < 1e-10
        for grad in got[1:3]:
            assert torch.isfinite(grad).all() and grad.abs().max() < 1e-5


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_zero_vectors_use_the_norm_eps(backend):
    """A zero row is divided by 1e-12 (F.normalize): cosines 0, finite values everywhere."""
    available(backend)
    img, txt = make_inputs(6, 5, seed=13, dtype=torch.float32)
    img[2] = 0.0
    txt[4] = 0.0
    for kind in KINDS:
        kw = dict(kind=kind, select="soft", alpha=0.2, temperature=0.5)
        got = loss_and_grads(fastalign.sparse_spatial_loss, img, txt, backend=backend, **kw)
        assert all(torch.isfinite(x).all() for x in got[:3])
        want = reference_loss_and_grads(img, txt, **kw)
        torch.testing.assert_close(got[0].double(), want[0], rtol=2e-4, atol=1e-6)
        for x, y in zip(got[1:3], want[1:3]):  # the zero rows' gradients are 1e12 larger
            for row_got, row_want in zip(x.double(), y):
                scale = row_want.abs().max().item() + 1e-3
                torch.testing.assert_close(row_got, row_want, rtol=2e-4, atol=2e-4 * scale)


def test_module_form_matches_function():
    img, txt = make_inputs(9, 6, seed=15)
    module = fastalign.nn.SparseSpatialLoss(kind="intra", select="topk", k=3, largest=False)
    torch.testing.assert_close(
        module(img, txt),
        fastalign.sparse_spatial_loss(img, txt, kind="intra", select="topk", k=3, largest=False),
    )
    assert "kind='intra'" in repr(module) and "k=3" in repr(module)
    alpha = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    soft = fastalign.nn.SparseSpatialLoss(select="soft", alpha=alpha)
    assert [p is alpha for p in soft.parameters()] == [True]
    soft(img, txt).backward()
    assert alpha.grad is not None and alpha.grad.item() != 0.0


# --------------------------------------------------------------------------- bad inputs
def _tensor(*shape, dtype=torch.float64, **kw):
    return torch.randn(*shape, dtype=dtype, **kw)


@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(img=_tensor(5, 5)), ValueError, "must have one shape"),
        (dict(img=_tensor(1, 5), txt=_tensor(1, 5)), ValueError, "N >= 2"),
        (dict(img=_tensor(6, 0), txt=_tensor(6, 0)), ValueError, "D >= 1"),
        (dict(txt=_tensor(6, 5, dtype=torch.float32)), TypeError, "share a dtype"),
        (dict(txt=_tensor(6, 5, device="meta")), ValueError, "one device"),
        (dict(img=_tensor(6, 5, 1)), ValueError, "img must be 2-D"),
        (dict(txt=torch.zeros(6, 5, dtype=torch.int64)), TypeError, "floating-point"),
        (dict(img=[[1.0, 2.0]]), TypeError, "img must be a torch.Tensor"),
        (dict(txt=None), TypeError, "txt must be a torch.Tensor"),
        (dict(kind="cross"), ValueError, "kind must be one of"),
        (dict(select="random"), ValueError, "select must be one of"),
        (dict(select="topk"), ValueError, "needs k"),
        (dict(select="topk", k=6), ValueError, r"k must be in \[1, 5\]"),
        (dict(select="topk", k=0), ValueError, r"k must be in \[1, 5\]"),
        (dict(select="topk", k=2.0), TypeError, "k must be an int"),
        (dict(k=2), ValueError, "k is used only with select='topk'"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=-1.0), ValueError, "temperature must be"),
        (dict(alpha=_tensor(3)), ValueError, r"alpha must be a float, a 0-d tensor or a \(6,\)"),
        (dict(alpha=_tensor(6, 1)), ValueError, "alpha must be"),
        (dict(alpha=torch.ones(6, dtype=torch.int64)), TypeError, "alpha must be a floating"),
        (dict(alpha=math.nan), ValueError, "alpha must be a finite number"),
        (dict(alpha="1"), TypeError, "alpha must be a float"),
        (dict(alpha=_tensor(6, device="meta")), ValueError, "alpha must be on"),
        (dict(largest=1), TypeError, "largest must be a bool"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
        (dict(backend="cuda"), RuntimeError, "backend 'cuda'"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, error, message):
    img, txt = make_inputs(6, 5, seed=16)
    kw = dict(img=img, txt=txt) | change
    with pytest.raises(error, match=message):
        fastalign.sparse_spatial_loss(**kw)


@pytest.mark.parametrize(
    "args,kw,error,message",
    [
        ((_tensor(3, 4),), {}, ValueError, "exclude_diagonal needs a square E"),
        ((_tensor(3),), {}, ValueError, "E must be a 2-D"),
        ((_tensor(3, 1),), dict(exclude_diagonal=False, select="topk", k=2), ValueError, "k must"),
        (([[1.0]],), {}, TypeError, "E must be a torch.Tensor"),
        (
            (torch.tensor([[0.0, math.nan], [1.0, 0.0]]),),
            {},
            ValueError,
            r"E holds .* \(nan\) at \[0, 1\]",
        ),
        ((_tensor(1, 1),), {}, ValueError, "at least one candidate"),
    ],
)
def test_sparse_select_bad_inputs(args, kw, error, message):
    with pytest.raises(error, match=message):
        fastalign.sparse_select(*args, **kw)


def test_half_precision_is_refused_on_cpu():
    img, txt = make_inputs(6, 5, seed=17, dtype=torch.bfloat16)
    if extension_loaded():
        with pytest.raises(TypeError, match="backend 'cpu' supports dtypes"):
            fastalign.sparse_spatial_loss(img, txt, backend="cpu")


# --------------------------------------------------------------------------- Triton
TRITON_SHAPES = [(2, 3), (3, 5), (17, 9), (37, 20)]


def triton_loss_and_grads(img, txt, alpha, kind, select, k, largest):
    """(loss, grad_img, grad_txt, grad_alpha) straight from the Triton launcher."""
    from fastalign.kernels.triton.sparse_spatial import sparse_spatial_loss_forward

    return forward_loss_and_grads(
        sparse_spatial_loss_forward, img, txt, alpha, kind, select, k, largest
    )


def check_triton(shape, kind, select, largest, seed):
    n, d = shape
    alpha = per_row_alpha(n, seed, torch.float32)
    options = options_for(select, n, alpha=alpha)
    img, txt = separated_inputs(n, d, seed, kind, options, largest, torch.float32, margin=1e-5)
    got = triton_loss_and_grads(img, txt, alpha, kind, select, options["k"], largest)
    assert got[1].dtype == torch.float32 and got[1].shape == shape
    want = reference_loss_and_grads(img, txt, kind=kind, largest=largest, **options)
    if select != "soft":  # the launcher returns zeros for alpha, autograd None
        assert got[3].abs().max() == 0
        got = got[:3] + (None,)
    assert_matches(got, want, 2e-4, context=f"{shape} {kind} {select} largest={largest}")


@needs_triton
@pytest.mark.parametrize("shape", TRITON_SHAPES)
@pytest.mark.parametrize("kind,select,largest", COMBOS)
def test_triton_matches_reference(shape, kind, select, largest):
    check_triton(shape, kind, select, largest, seed_of("triton", shape, kind, select, largest))


@needs_triton
@pytest.mark.parametrize("kind,select,largest", COMBOS)
def test_triton_multiple_tiles(monkeypatch, kind, select, largest):
    """Tiles of 16 and row blocks of 8 x 16, so several programs meet along every side."""
    from fastalign.kernels.triton import _common
    from fastalign.kernels.triton import sparse_spatial as ss

    monkeypatch.setattr(_common, "matrix_tile", lambda dtype: 16)
    monkeypatch.setattr(ss, "_ROW_BLOCK", 8)
    monkeypatch.setattr(ss, "_COLUMN_BLOCK", 16)
    monkeypatch.setattr(ss, "_SELECT_COLUMNS", 16)
    check_triton((35, 37), kind, select, largest, seed_of("tiles", kind, select, largest))


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
def test_triton_through_public_api(kind):
    """The custom op, its autograd (upstream gradient != 1, alpha as a 0-d tensor), no grad."""
    img, txt = make_inputs(19, 23, seed=seed_of("api", kind), dtype=torch.float32)
    kw = dict(kind=kind, select="soft", alpha=torch.tensor(0.3), temperature=TEMPERATURE)
    got = loss_and_grads(fastalign.sparse_spatial_loss, img, txt, 2.5, backend="triton", **kw)
    want = reference_loss_and_grads(img, txt, 2.5, **kw)
    assert_matches(got, want, 2e-4)
    with torch.no_grad():
        loss = fastalign.sparse_spatial_loss(img, txt, backend="triton", **kw)
    torch.testing.assert_close(loss.double(), want[0], atol=1e-5, rtol=1e-4)


@needs_triton
def test_triton_float16_smoke():
    """float16 through the same kernels (bfloat16 tl.dot is broken in the interpreter)."""
    n = 20
    alpha = torch.zeros(n, dtype=torch.float16)
    for kind in KINDS:
        img, txt = make_inputs(n, 24, seed=seed_of("f16", kind), dtype=torch.float16)
        got = triton_loss_and_grads(img, txt, alpha, kind, "soft", None, True)
        assert all(x.dtype == torch.float16 for x in got)
        want = reference_loss_and_grads(
            img, txt, kind=kind, select="soft", alpha=alpha, temperature=TEMPERATURE
        )
        assert_matches(got, want, 3e-2)


@needs_triton
@pytest.mark.parametrize("need_grad", [True, False])
@pytest.mark.parametrize("select", [0, 1, 2])
def test_opcheck_triton(need_grad, select):
    img, txt = make_inputs(6, 10, seed=18, dtype=torch.float32)
    alpha = per_row_alpha(6, seed=19, dtype=torch.float32)
    for x in (img, txt, alpha):
        x.requires_grad_(need_grad)
    args = (img, txt, alpha, select % 2, select, 2, 0.2, True, need_grad)
    torch.library.opcheck(torch.ops.fastalign.sparse_spatial_loss_forward_triton.default, args)


def test_aot_specs_describe_the_kernels():
    pytest.importorskip("triton")
    from fastalign.kernels.triton import sparse_spatial as ss

    specs = ss.aot_specs()
    dot_kernels = {ss._discrepancy_kernel, ss._gradient_kernel}
    row_kernels = {ss._row_norm_kernel, ss._select_kernel, ss._normalize_backward_kernel}
    assert dot_kernels | row_kernels == {s["fn"] for s in specs}
    for spec in specs:
        arg_names = spec["fn"].arg_names
        assert list(spec["signature"]) == arg_names, spec["name"]
        assert {n for n in arg_names if spec["signature"][n] == "constexpr"} == set(
            spec["constexprs"]
        )
        assert spec["expect_mma"] == (spec["fn"] in dot_kernels), spec["name"]
    dtypes = {spec["signature"]["x_ptr"] for spec in specs if spec["fn"] in dot_kernels}
    assert dtypes == {"*fp16", "*bf16"}
    selects = {spec["constexprs"]["SELECT"] for spec in specs if spec["fn"] is ss._select_kernel}
    assert selects == {0, 1, 2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_on_gpu_matches_reference(dtype):
    if fastalign.backends()["triton"] != "available":
        pytest.skip("triton not available")
    rtol = 2e-3 if dtype == torch.float32 else 3e-2
    for (n, d), kind in itertools.product([(64, 512), (300, 96), (1000, 256)], KINDS):
        alpha = torch.tensor(0.5, device="cuda")
        img, txt = (x.cuda() for x in make_inputs(n, d, seed=seed_of(n, d, kind), dtype=dtype))
        kw = dict(kind=kind, select="soft", alpha=alpha, temperature=TEMPERATURE)
        got = loss_and_grads(fastalign.sparse_spatial_loss, img, txt, backend="triton", **kw)
        want = reference_loss_and_grads(img, txt, **kw)
        assert_matches(got, want, rtol)
