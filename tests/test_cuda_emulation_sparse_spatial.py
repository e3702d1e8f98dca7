"""The CUDA sparse-spatial kernels (csrc/cuda/sparse_spatial.cuh) run on the CPU through the host
emulation against the plain-PyTorch reference (float64): loss, gradients for img, txt and a
per-row alpha, every kind x select x largest, shapes across the 32-wide row chunks and pair
tiles and the 64-wide GEMM tiles, exact top-k ties, rows of equal entries, zero rows, float16 /
bfloat16 inputs and the host code's argument checks. Hard selections use inputs with no entry
near a selection boundary (_helpers.sparse_spatial.separated_inputs)."""

import itertools
import math
import shutil

import pytest
import torch
from _helpers import assert_close_with_nans, cuda_emulation, seed_of
from _helpers.sparse_spatial import (
    COMBOS,
    TEMPERATURE,
    assert_matches,
    discrepancy,
    forward_loss_and_grads,
    make_inputs,
    options_for,
    per_row_alpha,
    reference_loss_and_grads,
    separated_inputs,
)

from fastalign._backends import extension_loaded
from fastalign.ops.sparse_spatial import KINDS, SELECTS

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def emulated(img, txt, alpha, kind, select, k=None, largest=True, need_grad=True, temperature=None):
    """(loss, grad_img, grad_txt, grad_alpha) of the emulated op; alpha is (N,)."""
    return forward_loss_and_grads(
        cuda_emulation.ops().sparse_spatial_loss_forward,
        img,
        txt,
        alpha,
        kind,
        select,
        k,
        largest,
        need_grad,
        TEMPERATURE if temperature is None else temperature,
    )


def check_against_reference(shape, kind, select, largest, dtype=torch.float32, rtol=2e-4):
    n, d = shape
    seed = seed_of("cuda-emulation", shape, kind, select, largest, dtype)
    alpha = per_row_alpha(n, seed, dtype)
    options = options_for(select, n, alpha=alpha)
    img, txt = separated_inputs(n, d, seed, kind, options, largest, dtype, margin=1e-5)
    got = emulated(img, txt, alpha, kind, select, options["k"], largest)
    assert all(x.dtype == dtype for x in got)
    assert got[0].shape == () and got[1].shape == shape and got[3].shape == (n,)
    want = reference_loss_and_grads(img, txt, kind=kind, largest=largest, **options)
    if select != "soft":  # the op returns zeros for alpha, autograd None
        assert got[3].abs().max() == 0
        got = got[:3] + (None,)
    assert_matches(got, want, rtol, context=f"{shape} {kind} {select} largest={largest}")
    return img, txt, alpha, options, got


# (N, D): N = 2 (one entry per row, std 0), D = 1, and N past one 32-wide row chunk / pair tile.
SHAPES = [(2, 3), (3, 1), (37, 20)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind,select,largest", COMBOS)
def test_matches_reference(shape, kind, select, largest):
    img, txt, alpha, options, got = check_against_reference(shape, kind, select, largest)
    # Without a gradient: the same loss, three empty gradient outputs.
    loss, *empty = emulated(img, txt, alpha, kind, select, options["k"], largest, need_grad=False)
    assert all(x.numel() == 0 for x in empty)
    torch.testing.assert_close(loss, got[0], rtol=0, atol=0)


@pytest.mark.parametrize("kind,select", list(itertools.product(KINDS, SELECTS)))
def test_across_gemm_tiles(kind, select):
    """N = 70 and 2 D = 66 pass the 64 x 64 output tiles of both products; three row chunks."""
    check_against_reference((70, 33), kind, select, largest=select != "topk")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("select", SELECTS)
def test_half_precision_inputs(dtype, select):
    """Read as float32 and computed in float32: only the outputs are rounded."""
    for kind in KINDS:
        check_against_reference((21, 24), kind, select, largest=True, dtype=dtype, rtol=1e-2)


def one_hot_inputs(n, d):
    """Rows one-hot (scaled): every cosine is 0 or 1 exactly, so E takes a few values with
    exact ties in every row, computed exactly on every backend."""
    img = torch.zeros(n, d)
    txt = torch.zeros(n, d)
    rows = torch.arange(n)
    img[rows, rows % d] = 1.0 + rows % 3
    txt[rows, (rows * 3 + 1) % d] = 2.0
    txt[rows % 5 == 0] = img[rows % 5 == 0]
    return img, txt


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("largest,k", [(True, 5), (False, 62)])
def test_topk_ties_go_to_the_lower_column(kind, largest, k):
    """E is 0 or 1 here and the k-th entry of every row is a 1 tied with the next: the
    gradient shows which of the tied entries were taken (the lowest columns, as the
    reference's stable sort and the CPU op), across the 32-wide chunks of the tie scan."""
    n, d = 66, 4
    img, txt = one_hot_inputs(n, d)
    e = discrepancy(img, txt, kind)
    off = e.masked_select(~torch.eye(n, dtype=torch.bool)).view(n, n - 1)
    ordered = off.sort(dim=1, descending=largest).values
    assert (ordered[:, k - 1] == ordered[:, k]).all() and (ordered[:, k - 1] > 0).all()
    alpha = torch.zeros(n)
    got = emulated(img, txt, alpha, kind, "topk", k, largest)
    want = reference_loss_and_grads(img, txt, kind=kind, select="topk", k=k, largest=largest)
    assert_matches(got[:3] + (None,), want, 1e-5)
    if extension_loaded():
        cpu_op = torch.ops.fastalign.sparse_spatial_loss_forward
        cpu = forward_loss_and_grads(cpu_op, img, txt, alpha, kind, "topk", k, largest)
        for x, y in zip(got, cpu):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("select", SELECTS)
def test_a_row_of_equal_entries(kind, select):
    """Row 0 is unique and every other row is a copy of one pair: row 0's 36 entries are equal
    (their float32 mean need not be), so its mean is that value and its std 0: the threshold
    selects nothing there and the soft weights' gradient has no part through sigma."""
    n, d = 37, 6
    img, txt = make_inputs(n, d, seed=seed_of("equal", kind), dtype=torch.float32)
    img[1:], txt[1:] = img[1], txt[1]
    e = discrepancy(img, txt, kind)
    off = e.masked_select(~torch.eye(n, dtype=torch.bool)).view(n, n - 1)
    constant = off.amin(dim=1) == off.amax(dim=1)
    assert constant[0] and not constant[1:].any() and off[0, 0] > 0.01
    alpha = per_row_alpha(n, seed_of("equal", kind, select), torch.float32)
    options = options_for(select, n, alpha=alpha)
    got = emulated(img, txt, alpha, kind, select, options["k"])
    want = reference_loss_and_grads(img, txt, kind=kind, **options)
    if select != "soft":
        got = got[:3] + (None,)
    assert_matches(got, want, 2e-4)


def test_identical_pairs_give_zero():
    """All rows equal: E is 0 everywhere (inter exactly, intra up to rounding); finite zeros."""
    img = torch.tensor([[1.0, 2.0, -1.0]]).repeat(5, 1)
    txt = torch.tensor([[0.5, -1.0, 3.0]]).repeat(5, 1)
    for kind, select in itertools.product(KINDS, SELECTS):
        options = options_for(select, 5, alpha=-1.0)
        alpha = torch.full((5,), options["alpha"])
        got = emulated(img, txt, alpha, kind, select, options["k"])
        assert abs(got[0].item()) < 1e-10
        for grad in got[1:]:
            assert torch.isfinite(grad).all() and grad.abs().max() < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_zero_vectors_use_the_norm_eps(kind):
    """A zero row is divided by 1e-12 (F.normalize): cosines 0, gradients 1e12 larger."""
    img, txt = make_inputs(6, 5, seed=13, dtype=torch.float32)
    img[2] = 0.0
    txt[4] = 0.0
    alpha = torch.full((6,), 0.2)
    got = emulated(img, txt, alpha, kind, "soft", temperature=0.5)
    want = reference_loss_and_grads(
        img, txt, kind=kind, select="soft", alpha=alpha, temperature=0.5
    )
    torch.testing.assert_close(got[0].double(), want[0], rtol=2e-4, atol=1e-6)
    for x, y in zip(got[1:], want[1:]):
        assert torch.isfinite(x).all()
        for row_got, row_want in zip(x.double().view(6, -1), y.view(6, -1)):
            scale = row_want.abs().max().item() + 1e-3
            torch.testing.assert_close(row_got, row_want, rtol=2e-4, atol=2e-4 * scale)


@pytest.mark.parametrize("kind,select,largest", COMBOS)
@pytest.mark.parametrize("which,value,row", [("img", math.nan, 2), ("txt", math.inf, 5)])
def test_non_finite_input_gives_the_references_nan(kind, select, largest, which, value, row):
    """The host code looks for no non-finite input (reading a flag back would cost a device
    synchronisation): a NaN or an infinity makes the loss, and the gradients where the
    reference's are, NaN, whichever row holds it."""
    img, txt = make_inputs(6, 40, seed=14, dtype=torch.float32)
    (img if which == "img" else txt)[row, 35] = value
    alpha = per_row_alpha(6, seed_of("non-finite", kind, select), torch.float32)
    options = options_for(select, 6, alpha=alpha)
    got = emulated(img, txt, alpha, kind, select, options["k"], largest)
    want = reference_loss_and_grads(img, txt, kind=kind, largest=largest, **options)
    assert want[0].isnan()
    names = ("loss", "grad_img", "grad_txt", "grad_alpha")
    for name, x, y in zip(names, got, want):
        if y is not None:  # hard selections: the op's zeros for alpha, autograd's None
            assert_close_with_nans(x, y, 2e-4, f"{name} {kind} {select} largest={largest}")


def emulated_raw(img, txt, alpha, kind, select, k, temperature):
    return cuda_emulation.ops().sparse_spatial_loss_forward(
        img, txt, alpha, kind, select, k, temperature, True, True
    )


def _ok_args():
    img, txt = make_inputs(4, 3, seed=3, dtype=torch.float32)
    return dict(img=img, txt=txt, alpha=torch.zeros(4), kind=0, select=2, k=2)


@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(img=torch.zeros(4, 3, dtype=torch.float64)), TypeError, "share a dtype"),
        (
            dict(
                img=torch.zeros(4, 3, dtype=torch.float64),
                txt=torch.zeros(4, 3, dtype=torch.float64),
                alpha=torch.zeros(4, dtype=torch.float64),
            ),
            TypeError,
            "take float16, bfloat16 or float32 .*, got Double",
        ),
        (dict(txt=torch.zeros(4, 2)), ValueError, "one shape"),
        (
            dict(img=torch.zeros(1, 3), txt=torch.zeros(1, 3), alpha=torch.zeros(1)),
            ValueError,
            "N >= 2",
        ),
        (dict(alpha=torch.zeros(3)), ValueError, r"alpha must be \(N,\) = \(4,\)"),
        (dict(kind=2), ValueError, "kind = 2, expected one of 0 .inter."),
        (dict(select=3), ValueError, "select = 3, expected one of 0 .threshold."),
        (dict(k=4), ValueError, r"k must be in \[1, N - 1 = 3\], got 4"),
        (dict(k=0), ValueError, r"k must be in \[1, N - 1 = 3\], got 0"),
    ],
)
def test_bad_inputs_raise_the_cpu_ops_errors(change, error, message):
    args = _ok_args() | change
    with pytest.raises(error, match=message):
        emulated_raw(**args, temperature=0.1)


def test_soft_needs_a_positive_temperature():
    with pytest.raises(ValueError, match="temperature = 0, expected a finite number > 0"):
        emulated_raw(**(_ok_args() | dict(select=1)), temperature=0.0)
