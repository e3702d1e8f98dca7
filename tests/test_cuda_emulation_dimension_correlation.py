"""The CUDA kernels of csrc/cuda, run on the CPU through the host emulation (blocks one after
another, the threads of a block as fibers on one host thread; see csrc/cuda/host_emulation.h),
against the plain-PyTorch reference: forward and gradients on fresh random inputs of awkward
shapes."""

import math
import shutil

import pytest
import torch
from _helpers import assert_close_with_nans, cuda_emulation, seed_of

from fastalign.ops._options import CORRELATION_MODES as MODES
from fastalign.ops.dimension_correlation import dimension_correlation_loss_reference

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

# (N, D): one row tile and several, D below, at and past the 32-column blocks and 64-wide tiles.
SHAPES = [(3, 1), (4, 5), (17, 33), (70, 65), (129, 31), (40, 130)]


def emulated_loss(a, b, mode, weight, tau, eps, need_grad=True, path=0):
    return cuda_emulation.ops().dimension_correlation_loss_forward(
        a, b, MODES.index(mode), weight, tau, eps, need_grad, path
    )


def reference_loss_and_grads(a, b, mode, weight, tau, eps):
    a64 = a.double().requires_grad_()
    b64 = b.double().requires_grad_()
    loss = dimension_correlation_loss_reference(a64, b64, mode, weight, tau, eps)
    grad_a, grad_b = torch.autograd.grad(loss, (a64, b64))
    return loss.detach(), grad_a, grad_b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", MODES)
def test_dimension_correlation_matches_reference(shape, mode, test_seed):
    # A seed per case, from the test seed: FASTALIGN_TEST_SEED draws fresh inputs.
    seed = seed_of(test_seed, shape, mode)
    gen = torch.Generator().manual_seed(seed)
    n, d = shape
    shared = torch.randn(n, d, generator=gen)  # correlated pairs: C far from 0 and from I
    a = shared + 0.7 * torch.randn(n, d, generator=gen) + 3.0 * torch.rand(d, generator=gen)
    b = shared * torch.rand(d, generator=gen) + torch.randn(n, d, generator=gen)
    weight, tau, eps = 0.37, 0.3, 1e-5
    loss, grad_a, grad_b = emulated_loss(a, b, mode, weight, tau, eps)
    want_loss, want_a, want_b = reference_loss_and_grads(a, b, mode, weight, tau, eps)
    assert loss.dtype == torch.float32 and grad_a.shape == a.shape and grad_b.shape == b.shape
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-5, atol=2e-5)
    scale = max(want_a.abs().max().item(), want_b.abs().max().item(), 1e-6)
    # float32 kernels: with N = 3 the standardisation's gradient amplifies rounding to ~3e-5.
    for got, want in ((grad_a, want_a), (grad_b, want_b)):
        torch.testing.assert_close(
            got.double() / scale, want / scale, rtol=0, atol=1e-4, msg=lambda m: f"seed {seed}: {m}"
        )
    # Without a gradient: the same loss, empty gradient outputs.
    loss_only, empty_a, empty_b = emulated_loss(a, b, mode, weight, tau, eps, need_grad=False)
    assert empty_a.numel() == 0 and empty_b.numel() == 0
    torch.testing.assert_close(loss_only, loss, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dimension_correlation_half_inputs(dtype):
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(23, 37, generator=gen).to(dtype)
    b = (a.float() + torch.randn(23, 37, generator=gen)).to(dtype)
    loss, grad_a, grad_b = emulated_loss(a, b, "barlow", 0.05, 0.1, 1e-5)
    want_loss, want_a, want_b = reference_loss_and_grads(a, b, "barlow", 0.05, 0.1, 1e-5)
    assert loss.dtype == dtype and grad_a.dtype == dtype
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad_a.double(), want_a, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(grad_b.double(), want_b, rtol=2e-2, atol=2e-3)


def test_dimension_correlation_constant_column_gives_zeros_not_nan():
    a = torch.randn(9, 4)
    b = torch.randn(9, 4)
    a[:, 2] = 5.0
    loss, grad_a, grad_b = emulated_loss(a, b, "softmax", 0.1, 0.2, 1e-5)
    want_loss, want_a, want_b = reference_loss_and_grads(a, b, "softmax", 0.1, 0.2, 1e-5)
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad_a.double(), want_a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("which,value", [("a", math.nan), ("b", math.nan), ("a", math.inf)])
@pytest.mark.parametrize("row,col", [(0, 0), (5, 39)])  # the first and the last element
def test_dimension_correlation_non_finite_input_gives_the_references_nan(
    mode, which, value, row, col
):
    """The host code looks for no non-finite input (reading a flag back would cost a device
    synchronisation): a NaN or an infinity makes the loss, and the gradients where the
    reference's are, NaN, whichever element holds it."""
    gen = torch.Generator().manual_seed(seed_of("non-finite", mode, which, value, row, col))
    a, b = torch.randn(6, 40, generator=gen), torch.randn(6, 40, generator=gen)
    (a if which == "a" else b)[row, col] = value
    got = emulated_loss(a, b, mode, 0.1, 0.2, 1e-5)
    want = reference_loss_and_grads(a, b, mode, 0.1, 0.2, 1e-5)
    assert want[0].isnan()
    for name, x, y in zip(("loss", "grad_a", "grad_b"), got, want):
        assert_close_with_nans(x, y, 1e-4, name)


def test_dimension_correlation_rejects_the_gram_path():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="path must be 0 .auto. or 1 .correlation., got 2"):
        emulated_loss(a, b, "barlow", 0.1, 0.1, 1e-5, path=2)


def test_dimension_correlation_refuses_float64():
    """The CUDA backend computes in float32: a float64 input is refused, not run in float64."""
    a, b = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64 is refused.*, got Double"):
        emulated_loss(a, b, "barlow", 0.1, 0.1, 1e-5)
