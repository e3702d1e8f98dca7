"""backend="cuda" on a real GPU against the reference and Triton (skipped without one)."""

import pytest
import torch
from _helpers import seed_of
from _helpers.region_word import make_inputs, options
from _helpers.sparse_spatial import (
    COMBOS,
    assert_matches,
    loss_and_grads,
    options_for,
    per_row_alpha,
    reference_loss_and_grads,
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


def _prototype_outputs(backend, fn, inputs, upstream, **kw):
    """fn(*inputs) in float64 and, when it needs grad, the gradients of <fn(...), upstream>."""
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    out = fn(*leaves, backend=backend, **kw) if backend else fn(*leaves, **kw)
    grads = torch.autograd.grad(out, leaves, upstream.to(out.dtype)) if out.requires_grad else ()
    return [t.detach().double() for t in (out, *grads)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_prototypes_cuda_vs_reference_and_triton(dtype):
    from fastalign.ops.prototypes import (
        prototype_assign_reference,
        prototype_topk_mix_reference,
        prototype_update_reference,
    )

    for op in ("prototype_assign", "prototype_update", "prototype_topk_mix"):
        if backends(op)["cuda"] != "available":
            pytest.skip(backends(op)["cuda"])
    # Past the 64 x 64 tiles in every direction, K past the 32-column blocks.
    x, p = torch.randn(301, 67, device="cuda"), torch.randn(1031, 67, device="cuda")
    values = torch.randn(1031, 45, device="cuda")
    assignments = torch.softmax(torch.randn(301, 1031, device="cuda") / 0.2, dim=1)
    assignments[:, :7] = 0.0  # prototypes without mass keep their value
    low = [t.to(dtype) for t in (x, p, values, assignments)]
    wide = [t.double() for t in low]
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)

    def check(cuda, reference, triton):
        for c, r, t in zip(cuda, reference, triton):
            scale = r.abs().max().item() + 1e-3
            torch.testing.assert_close(c / scale, r / scale, **tol)
            torch.testing.assert_close(c / scale, t / scale, **tol)

    for mode, tau in (("softmax", 0.1), ("hard", 0.1), ("sinkhorn", 0.05)):
        grad = mode == "softmax"
        inputs = [t.requires_grad_(grad) for t in (low[0].clone(), low[1].clone())]
        upstream = torch.randn(301, 1031, device="cuda")
        kw = dict(mode=mode, tau=tau)
        got = _prototype_outputs("cuda", fastalign.prototype_assign, inputs, upstream, **kw)
        triton = _prototype_outputs("triton", fastalign.prototype_assign, inputs, upstream, **kw)
        ref_inputs = [t.requires_grad_(grad) for t in (wide[0].clone(), wide[1].clone())]
        want = _prototype_outputs(None, prototype_assign_reference, ref_inputs, upstream, **kw)
        if mode == "hard":  # the lowest index of a float32 near-tie may differ: compare scores
            scores = torch.nn.functional.normalize(wide[0], dim=1)
            scores = scores @ torch.nn.functional.normalize(wide[1], dim=1).T
            chosen = scores.gather(1, got[0].argmax(dim=1, keepdim=True)).squeeze(1)
            assert (chosen >= scores.max(dim=1).values - 1e-2).all()
            continue
        check(got, want, triton)
    update = [
        fastalign.prototype_update(low[1], low[0], low[3], 0.7, backend=b).double()
        for b in ("cuda", "triton")
    ]
    want_update = prototype_update_reference(wide[1], wide[0], wide[3], 0.7)
    check(update[:1], [want_update], update[1:])
    assert torch.equal(update[0][:7], wide[1][:7])
    mix_inputs = [t.clone().requires_grad_() for t in low[:3]]
    upstream = torch.randn(301, 45, device="cuda")
    got = _prototype_outputs("cuda", fastalign.prototype_topk_mix, mix_inputs, upstream, m=10)
    triton = _prototype_outputs("triton", fastalign.prototype_topk_mix, mix_inputs, upstream, m=10)
    ref_inputs = [t.clone().requires_grad_() for t in wide[:3]]
    want = _prototype_outputs(None, prototype_topk_mix_reference, ref_inputs, upstream, m=10)
    check(got, want, triton)


REGION_WORD_COMBOS = [
    ("t2i", "max", "lse", None),  # CHAN
    ("both", "max", "mean", "leaky_relu"),  # LAPS
    ("i2t", "lse", "max", None),
    ("both", "lse", "lse", "leaky_relu"),
    ("t2i", "max", "sum", None),
]


@pytest.mark.parametrize("direction,align,aggregate,activation", REGION_WORD_COMBOS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_region_word_cuda_vs_reference_and_triton(direction, align, aggregate, activation, dtype):
    from fastalign.ops.region_word import region_word_similarity_reference

    if backends("region_word_similarity")["cuda"] != "available":
        pytest.skip(backends("region_word_similarity")["cuda"])
    # Odd counts (2 x 2 pair tiles), lengths across the 32-token chunks, D across 64.
    regions, words, rl, wl = (
        x.cuda() for x in make_inputs(37, 53, 36, 70, 200, dtype=torch.float32, seed=1)
    )
    regions, words = regions.to(dtype), words.to(dtype)
    upstream = torch.randn(37, 53, device="cuda", dtype=torch.float64)
    kw = options(direction, align, aggregate, activation)

    def scores_and_grads(fn, r, w, **extra):
        r, w = r.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        scores = fn(r, w, rl, wl, **kw, **extra)
        grads = torch.autograd.grad((scores.double() * upstream).sum(), (r, w))
        return [x.double() for x in (scores, *grads)]

    got = scores_and_grads(fastalign.region_word_similarity, regions, words, backend="cuda")
    want = scores_and_grads(region_word_similarity_reference, regions.double(), words.double())
    triton = scores_and_grads(fastalign.region_word_similarity, regions, words, backend="triton")
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for g, w, t in zip(got, want, triton):
        scale = max(w.abs().max().item(), 1.0)
        torch.testing.assert_close(g / scale, w / scale, **tol)
        torch.testing.assert_close(g / scale, t / scale, **tol)


# Hard selections (threshold, topk) only on inputs with no entry within 3e-6 of a selection
# boundary (_helpers.sparse_spatial.separated_inputs), so rounding cannot flip one; N = 1000 soft.
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
