"""Inputs, options and comparisons shared by the sparse spatial loss tests (the C++, Triton and
CUDA backends and the CUDA kernels' host emulation)."""

import itertools
import math

import torch

from fastalign.ops.sparse_spatial import KINDS, SELECTS, sparse_spatial_loss_reference

COMBOS = list(itertools.product(KINDS, SELECTS, (True, False)))
TEMPERATURE = 0.1


def make_inputs(n, d, seed, dtype=torch.float64):
    """Paired embeddings: txt is a noisy linear image of img, so E is far from 0."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.3
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    txt = img @ mix + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return img.to(dtype), txt.to(dtype)


def discrepancy(img, txt, kind):
    """E written out from its definition with torch.cosine_similarity, in float64."""
    img, txt = img.double(), txt.double()

    def cos(a, b):
        return torch.cosine_similarity(a[:, None, :], b[None, :, :], dim=2)

    if kind == "inter":
        x = 1 - cos(img, txt)
        return (x - x.T).abs()
    return ((1 - cos(img, img)) - (1 - cos(txt, txt))).abs()


def selection_margin(e, select, alpha, k, largest) -> float:
    """Distance of the nearest off-diagonal entry to its row's selection boundary."""
    n = e.shape[0]
    off = e.masked_select(~torch.eye(n, dtype=torch.bool)).view(n, n - 1)
    if select == "soft":
        return math.inf
    if select == "threshold":
        sigma, mu = torch.std_mean(off, dim=1, correction=0)
        threshold = mu + (1 if largest else -1) * torch.as_tensor(alpha).double() * sigma
        distance = (off - threshold[:, None]).abs()
        # a row of equal entries (N = 2: one entry) selects nothing by definition, exactly
        varied = off.amax(dim=1) > off.amin(dim=1)
        return float(distance[varied].min()) if varied.any() else math.inf
    if k == n - 1:
        return math.inf
    ordered = off.sort(dim=1, descending=largest).values
    gaps = (ordered[:, k - 1] - ordered[:, k]).abs()
    gaps = gaps[gaps > 0]  # exact ties (D = 1: E is 0 or 2) go to the lower column everywhere
    return float(gaps.min()) if len(gaps) else math.inf


def options_for(select, n, alpha=0.5):
    return dict(
        select=select,
        alpha=alpha,
        k=max(1, (n - 1) // 3) if select == "topk" else None,
        temperature=TEMPERATURE,
    )


def separated_inputs(n, d, seed, kind, options, largest, dtype=torch.float64, margin=1e-9):
    """Inputs whose hard selection has every entry at least ``margin`` from its boundary."""
    for attempt in range(100):
        img, txt = make_inputs(n, d, seed + attempt, dtype)
        e = discrepancy(img, txt, kind)
        alpha = options["alpha"]
        alpha = alpha.detach() if isinstance(alpha, torch.Tensor) else alpha
        if selection_margin(e, options["select"], alpha, options["k"], largest) > margin:
            return img, txt
    raise AssertionError(f"no well-separated inputs for N={n} D={d} {kind} {options}")


def loss_and_grads(fn, img, txt, upstream=1.0, **kw):
    """(loss, grad_img, grad_txt, grad_alpha or None) for one call of fn; a tensor alpha
    takes a gradient in soft mode."""
    img = img.detach().clone().requires_grad_()
    txt = txt.detach().clone().requires_grad_()
    inputs = [img, txt]
    if isinstance(kw.get("alpha"), torch.Tensor):
        alpha = kw["alpha"].detach().clone().requires_grad_(kw.get("select") == "soft")
        kw = kw | dict(alpha=alpha)
        if alpha.requires_grad:
            inputs.append(alpha)
    loss = fn(img, txt, **kw)
    grads = torch.autograd.grad(loss * upstream, inputs)
    return (loss.detach(), *grads, *([None] * (3 - len(grads))))


def reference_loss_and_grads(img, txt, upstream=1.0, **kw):
    """The reference in float64, whatever the inputs' dtype."""
    if isinstance(kw.get("alpha"), torch.Tensor):
        kw = kw | dict(alpha=kw["alpha"].double())
    return loss_and_grads(sparse_spatial_loss_reference, img.double(), txt.double(), upstream, **kw)


def assert_matches(got, want, rtol, context=""):
    """Loss and gradients, each within rtol of its own scale (at least 1e-3)."""
    names = ("loss", "grad_img", "grad_txt", "grad_alpha")
    for name, x, y in zip(names, got, want):
        assert (x is None) == (y is None), f"{name} {context}"
        if x is None:
            continue
        assert x.dtype == got[0].dtype and x.shape == y.shape, f"{name} {context}"
        scale = y.abs().max().item() + 1e-3
        torch.testing.assert_close(
            x.double(),
            y,
            atol=rtol * scale,
            rtol=rtol,
            msg=lambda m, name=name: f"{name} {context}: {m}",
        )


def per_row_alpha(n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g, dtype=torch.float64) * 1.5 - 0.25).to(dtype)


def forward_loss_and_grads(
    forward, img, txt, alpha, kind, select, k, largest, need_grad=True, temperature=TEMPERATURE
):
    """(loss, grad_img, grad_txt, grad_alpha) straight from a forward with the compiled op's
    schema (alpha (N,), kind and select as their indices)."""
    return forward(
        img,
        txt,
        alpha,
        KINDS.index(kind),
        SELECTS.index(select),
        k or 0,
        temperature,
        largest,
        need_grad,
    )
