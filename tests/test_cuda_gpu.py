"""backend="cuda" on a real GPU against the reference and Triton (skipped without one)."""

import pytest
import torch
from test_sparse_spatial import (
    COMBOS,
    assert_matches,
    loss_and_grads,
    options_for,
    per_row_alpha,
    reference_loss_and_grads,
    seed_of,
    separated_inputs,
)

import fastalign
from fastalign._backends import backends
from fastalign.ops.dimension_correlation import dimension_correlation_loss_reference

pytestmark = pytest.mark.gpu


def _loss_and_grads(backend, a, b, **kw):
    a = a.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    loss = fastalign.dimension_correlation_loss(a, b, backend=backend, **kw)
    loss.backward()
    return loss.detach().double(), a.grad.double(), b.grad.double()


@pytest.mark.parametrize("shape", [(2, 1), (33, 65), (257, 130), (1024, 512)])
@pytest.mark.parametrize("mode", ["barlow", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dimension_correlation_cuda_vs_reference_and_triton(shape, mode, dtype):
    if backends("dimension_correlation_loss")["cuda"] != "available":
        pytest.skip(backends("dimension_correlation_loss")["cuda"])
    n, d = shape
    a = torch.randn(n, d, device="cuda")
    b = (a + torch.randn(n, d, device="cuda")).to(dtype)
    a = a.to(dtype)
    kw = dict(mode=mode, off_diagonal_weight=0.05, tau=0.2)
    got = _loss_and_grads("cuda", a, b, **kw)
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    want_loss = dimension_correlation_loss_reference(a64, b64, **kw)
    want = (want_loss.detach(), *torch.autograd.grad(want_loss, (a64, b64)))
    triton = _loss_and_grads("triton", a, b, **kw)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for g, w, t in zip(got, want, triton):
        torch.testing.assert_close(g, w, **tol)
        torch.testing.assert_close(g, t, **tol)
    assert fastalign.dimension_correlation_loss(a, b, backend="auto", **kw).device.type == "cuda"


# Hard selections (threshold, topk) only on inputs with no entry within 3e-6 of a selection
# boundary (test_sparse_spatial.separated_inputs), so rounding cannot flip one; N = 1000 soft.
SPARSE_SPATIAL_CASES = [
    (shape, kind, select, largest)
    for shape in [(2, 3), (70, 33), (150, 96)]
    for kind, select, largest in COMBOS
] + [
    ((1000, 256), kind, "soft", largest) for kind in ("inter", "intra") for largest in (True, False)
]


@pytest.mark.parametrize("shape,kind,select,largest", SPARSE_SPATIAL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_spatial_cuda_vs_reference_and_triton(shape, kind, select, largest, dtype):
    """alpha: a per-row (N,) tensor with its gradient (soft), a 0-d tensor (threshold) or a
    float (topk); upstream gradient 0.75; also the loss without a gradient."""
    if backends("sparse_spatial_loss")["cuda"] != "available":
        pytest.skip(backends("sparse_spatial_loss")["cuda"])
    n, d = shape
    seed = seed_of("cuda-gpu", shape, kind, select, largest)
    alpha = {"soft": per_row_alpha(n, seed), "threshold": torch.tensor(0.6), "topk": 0.5}
    options = options_for(select, n, alpha=alpha[select])
    img, txt = separated_inputs(n, d, seed, kind, options, largest, dtype, margin=3e-6)
    img, txt = img.cuda(), txt.cuda()
    if isinstance(options["alpha"], torch.Tensor):
        options["alpha"] = options["alpha"].to("cuda", dtype)
    kw = dict(kind=kind, largest=largest, **options)
    got = loss_and_grads(fastalign.sparse_spatial_loss, img, txt, 0.75, backend="cuda", **kw)
    want = reference_loss_and_grads(img, txt, 0.75, **kw)
    triton = loss_and_grads(fastalign.sparse_spatial_loss, img, txt, 0.75, backend="triton", **kw)
    rtol = 2e-4 if dtype == torch.float32 else 1e-2  # bf16: inputs and outputs rounded
    assert_matches(got, want, rtol, context=f"cuda {shape} {kind} {select} {largest}")
    assert_matches(got, tuple(x if x is None else x.double() for x in triton), 2 * rtol)
    with torch.no_grad():
        loss = fastalign.sparse_spatial_loss(img, txt, backend="cuda", **kw)
    torch.testing.assert_close(loss, got[0], rtol=0, atol=0)
