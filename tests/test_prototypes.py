"""prototype_assign / prototype_update / prototype_topk_mix: every backend against the reference.

The references are checked against the formulas written out element by element (and the Sinkhorn
against SwAV's probability-domain form where that form does not overflow); the C++ kernels and
the Triton kernels (under the interpreter, small shapes) are checked against the references on
fresh random inputs, with exact ties, at an overflowing temperature, and on bad inputs.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import seed_of

import fastalign
from fastalign._backends import extension_loaded
from fastalign.ops.prototypes import (
    MODES,
    prototype_assign_reference,
    prototype_topk_mix_reference,
    prototype_update_reference,
    sinkhorn_reference,
)

FAST_BACKENDS = ["cpu", "triton"]
TAU, ITERS = 0.2, 4


def available(backend: str) -> None:
    if fastalign.backends()[backend] != "available":
        pytest.skip(f"{backend} not available")


def dtypes_of(backend: str):
    """(dtype, rtol) pairs a backend is tested in: Triton runs float32 under the interpreter."""
    if backend == "triton":
        return [(torch.float32, 2e-4)]
    return [(torch.float64, 1e-10), (torch.float32, 2e-4)]


def randn(*shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def assert_close(got, want, rtol, what=""):
    """Within rtol of want's own scale plus 0.05: a gradient that is 0 in exact arithmetic (x
    of D = 1 after normalisation) is rounding noise of the size of the terms that cancel."""
    assert got.shape == want.shape, what
    scale = want.abs().max().item() + 0.05
    torch.testing.assert_close(
        got.double(), want.double(), atol=rtol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def value_and_grads(fn, inputs, upstream_seed, **kw):
    """fn(*inputs) and the gradients of <fn(*inputs), U> for a fixed random U."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs, **kw)
    upstream = randn(*out.shape, seed=upstream_seed, dtype=out.dtype)
    return (out, *torch.autograd.grad(out, inputs, upstream))


def reference_value_and_grads(fn, inputs, upstream_seed, **kw):
    """The reference in float64, whatever the inputs' dtype."""
    return value_and_grads(fn, [x.double() for x in inputs], upstream_seed, **kw)


def unit_like_vectors(n, d, seed, nonzeros=4):
    """Rows with ``nonzeros`` entries of +-1, the rest 0: their norms are exact (2 for 4 entries),
    so every cosine and dot product between them is exact in any summation order, and many are
    exactly equal: exact ties on every backend."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.zeros(n, d)
    for r in range(n):
        cols = torch.randperm(d, generator=g)[:nonzeros]
        rows[r, cols] = torch.randint(0, 2, (nonzeros,), generator=g).float() * 2 - 1
    return rows


# --------------------------------------------------------------------------- references
def test_assign_reference_matches_the_definition():
    x, p = randn(4, 3, seed=1), randn(5, 3, seed=2)
    cos = [
        [sum(x[n, d] * p[k, d] for d in range(3)) / (x[n].norm() * p[k].norm()) for k in range(5)]
        for n in range(4)
    ]
    soft = [[math.exp(c / TAU) / sum(math.exp(v / TAU) for v in row) for c in row] for row in cos]
    hard = [[float(k == max(range(5), key=lambda j: row[j])) for k in range(5)] for row in cos]
    torch.testing.assert_close(
        prototype_assign_reference(x, p, "softmax", TAU), torch.tensor(soft, dtype=torch.float64)
    )
    torch.testing.assert_close(
        prototype_assign_reference(x, p, "hard"), torch.tensor(hard, dtype=torch.float64)
    )
    raw = prototype_assign_reference(x, p, "softmax", TAU, normalize=False)
    torch.testing.assert_close(raw, torch.softmax(x @ p.T / TAU, dim=1))


def swav_sinkhorn(scores, tau, iters):
    """SwAV's distributed_sinkhorn (probability domain, single process), the form whose
    exp(scores / tau) overflows at small tau: Q (K x B) ends with columns summing to 1."""
    q = torch.exp(scores / tau).T
    q /= q.sum()
    k, b = q.shape
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.T


def test_sinkhorn_reference_is_swav_in_the_log_domain():
    x, p = randn(30, 6, seed=3), randn(7, 6, seed=4)
    scores = F.normalize(x, dim=1) @ F.normalize(p, dim=1).T
    for iters in (1, 3, 10):
        want = swav_sinkhorn(scores, TAU, iters)
        torch.testing.assert_close(prototype_assign_reference(x, p, "sinkhorn", TAU, iters), want)


def test_topk_mix_reference_matches_the_definition():
    q, k, v = randn(3, 4, seed=5), randn(9, 4, seed=6), randn(9, 2, seed=7)
    m, tau = 3, 0.5
    want = []
    for n in range(3):
        cos = [float(F.cosine_similarity(q[n], k[j], dim=0)) for j in range(9)]
        chosen = sorted(range(9), key=lambda j: (-cos[j], j))[:m]
        logits = [float(q[n] @ k[j]) / tau for j in chosen]
        weights = [math.exp(v_) / sum(math.exp(u) for u in logits) for v_ in logits]
        want.append(sum(w * v[j] for w, j in zip(weights, chosen)))
    torch.testing.assert_close(prototype_topk_mix_reference(q, k, v, m, tau), torch.stack(want))


def test_update_reference_matches_the_definition():
    p, x = randn(3, 2, seed=8), randn(5, 2, seed=9)
    a = randn(5, 3, seed=10).abs()
    a[:, 1] = 0
    got = prototype_update_reference(p, x, a, 0.7)
    for k in range(3):
        mass = a[:, k].sum()
        want = p[k] if mass == 0 else 0.7 * p[k] + 0.3 * (a[:, k, None] * x).sum(0) / mass
        torch.testing.assert_close(got[k], want)


# --------------------------------------------------------------------------- assignment
# (N, K, D): ones, primes, sizes just past the C++ tiles (128 rows, 64 prototypes per gradient
# tile) and the Triton tiles (32).
CPU_SHAPES = [(1, 1, 1), (2, 3, 1), (5, 3, 7), (37, 11, 13), (130, 65, 33), (300, 200, 19)]
TRITON_SHAPES = [(1, 1, 1), (5, 3, 7), (37, 70, 13)]


def shapes_of(backend):
    return CPU_SHAPES if backend == "cpu" else TRITON_SHAPES


@pytest.mark.parametrize(
    "backend,shape", [(b, s) for b in FAST_BACKENDS for s in shapes_of(b)], ids=str
)
@pytest.mark.parametrize("normalize", [True, False])
def test_softmax_assign_matches_reference(backend, shape, normalize):
    available(backend)
    n, k, d = shape
    for dtype, rtol in dtypes_of(backend):
        seed = seed_of(backend, shape, normalize, dtype)
        x, p = randn(n, d, seed=seed, dtype=dtype), randn(k, d, seed=seed + 1, dtype=dtype)
        opts = dict(mode="softmax", tau=TAU, normalize=normalize)
        got = value_and_grads(fastalign.prototype_assign, (x, p), seed, backend=backend, **opts)
        assert got[0].dtype == dtype
        want = reference_value_and_grads(prototype_assign_reference, (x, p), seed, **opts)
        for name, a, b in zip(("assignments", "grad_x", "grad_p"), got, want):
            assert_close(a, b, rtol, f"{name} {dtype}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_on_every_shape(backend, mode):
    available(backend)
    for n, k, d in shapes_of(backend):
        for dtype, rtol in dtypes_of(backend):
            seed = seed_of(backend, mode, n, k, d, dtype)
            x, p = randn(n, d, seed=seed, dtype=dtype), randn(k, d, seed=seed + 1, dtype=dtype)
            for normalize in (True, False):
                got = fastalign.prototype_assign(x, p, mode, TAU, ITERS, normalize, backend)
                want = prototype_assign_reference(
                    x.double(), p.double(), mode, TAU, ITERS, normalize
                )
                assert_close(got, want, rtol, f"{mode} {(n, k, d)} {dtype} {normalize}")
                assert not (mode != "softmax" and got.requires_grad)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fresh_random_inputs(backend, test_seed):
    """Random shapes and values drawn from the test seed: another FASTALIGN_TEST_SEED draws new
    ones."""
    available(backend)
    g = torch.Generator().manual_seed(seed_of(test_seed, backend))
    limit = 400 if backend == "cpu" else 40
    for _ in range(2):
        n, k, d = (int(torch.randint(1, limit, (1,), generator=g)) for _ in range(3))
        seed = int(torch.randint(0, 2**31, (1,), generator=g))
        dtype, rtol = dtypes_of(backend)[-1]
        x, p = randn(n, d, seed=seed, dtype=dtype), randn(k, d, seed=seed + 1, dtype=dtype)
        context = f"N={n} K={k} D={d} seed={seed}"
        got = value_and_grads(fastalign.prototype_assign, (x, p), seed, tau=TAU, backend=backend)
        want = reference_value_and_grads(prototype_assign_reference, (x, p), seed, tau=TAU)
        for a, b in zip(got, want):
            assert_close(a, b, rtol, context)
        sink = fastalign.prototype_assign(x, p, "sinkhorn", TAU, ITERS, backend=backend)
        assert_close(sink, prototype_assign_reference(x, p, "sinkhorn", TAU, ITERS), rtol, context)
        if d == 1:  # every cosine is +-1: rounding decides the ties (see prototype_topk_mix)
            x, p = torch.cat([x, x.flip(0)], 1), torch.cat([p, p.flip(0)], 1)
        m = int(torch.randint(1, k + 1, (1,), generator=g))
        v = randn(k, 5, seed=seed + 2, dtype=dtype)
        got = value_and_grads(fastalign.prototype_topk_mix, (x, p, v), seed, m=m, backend=backend)
        want = reference_value_and_grads(prototype_topk_mix_reference, (x, p, v), seed, m=m)
        for a, b in zip(got, want):
            assert_close(a, b, rtol, f"{context} m={m}")


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
def test_hard_ties_go_to_the_lowest_index(backend):
    available(backend)
    x = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0], [1.0, 0.0, 1.0]])
    # prototypes 1 and 3 are equal; prototype 2 ties with 0 for the first row
    p = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    for normalize in (True, False):
        got = fastalign.prototype_assign(x, p, "hard", normalize=normalize, backend=backend)
        assert got.argmax(dim=1).tolist() == [0, 1, 0]
        assert got.sum(dim=1).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
def test_no_gradient_for_hard_and_sinkhorn(backend):
    available(backend)
    x = randn(6, 4, seed=11, dtype=torch.float32).requires_grad_()
    p = randn(3, 4, seed=12, dtype=torch.float32).requires_grad_()
    for mode in ("hard", "sinkhorn"):
        assert not fastalign.prototype_assign(x, p, mode, backend=backend).requires_grad
    assert fastalign.prototype_assign(x, p, "softmax", backend=backend).requires_grad


# --------------------------------------------------------------------------- Sinkhorn
@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
def test_sinkhorn_marginals(backend):
    """Rows sum to 1 after every call; columns to N / K within 1e-3 (relative) after 50
    iterations at tau = 0.2, and the column gap shrinks as the iterations grow."""
    available(backend)
    n, k = (60, 7) if backend != "triton" else (37, 5)
    x, p = randn(n, 5, seed=13, dtype=torch.float32), randn(k, 5, seed=14, dtype=torch.float32)
    gaps = []
    for iters in (1, 5, 50):
        q = fastalign.prototype_assign(x, p, "sinkhorn", TAU, iters, backend=backend)
        torch.testing.assert_close(q.sum(dim=1), torch.ones(n), atol=1e-5, rtol=0)
        gaps.append(((q.sum(dim=0) - n / k).abs().max() / (n / k)).item())
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3, gaps


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
def test_sinkhorn_is_stable_where_the_exponential_overflows(backend):
    """tau = 0.01 and cosines near 1: exp(score / tau) ~ e^100 overflows float32 (SwAV's form
    returns NaN), while ours stays finite and matches the float64 reference."""
    available(backend)
    base = randn(1, 16, seed=15)
    x = (base + 0.05 * randn(24, 16, seed=16)).float()
    p = (base + 0.05 * randn(6, 16, seed=17)).float()
    scores = F.normalize(x, dim=1) @ F.normalize(p, dim=1).T
    assert scores.min() > 0.95
    assert torch.isinf(torch.exp(scores / 0.01)).any()
    assert torch.isnan(swav_sinkhorn(scores, 0.01, 3)).any()
    got = fastalign.prototype_assign(x, p, "sinkhorn", tau=0.01, iters=3, backend=backend)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.sum(dim=1), torch.ones(24), atol=1e-5, rtol=0)
    want = prototype_assign_reference(x.double(), p.double(), "sinkhorn", 0.01, 3)
    assert_close(got, want, 1e-3)
    soft = fastalign.prototype_assign(x, p, "softmax", tau=0.01, backend=backend)
    assert torch.isfinite(soft).all()


def test_sinkhorn_reference_function():
    logits = randn(5, 3, seed=18) * 50
    q = sinkhorn_reference(logits, 2)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(5, dtype=torch.float64))


# --------------------------------------------------------------------------- top-m mixture
TOPK_CPU_SHAPES = [(1, 1, 1, 1, 1), (3, 5, 4, 2, 5), (17, 40, 9, 6, 10), (300, 700, 20, 7, 10)]
TOPK_TRITON_SHAPES = [(1, 1, 1, 1, 1), (3, 5, 4, 2, 5), (37, 70, 9, 6, 10)]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_topk_mix_matches_reference(backend):
    """(N, K, D, Dv, m): past the C++ tiles (256 queries x 256 keys) and the Triton ones."""
    available(backend)
    shapes = TOPK_CPU_SHAPES if backend == "cpu" else TOPK_TRITON_SHAPES
    for n, k, d, dv, m in shapes:
        for dtype, rtol in dtypes_of(backend):
            seed = seed_of(backend, n, k, d, dtype)
            inputs = [
                randn(*s, seed=seed + i, dtype=dtype)
                for i, s in enumerate(((n, d), (k, d), (k, dv)))
            ]
            got = value_and_grads(
                fastalign.prototype_topk_mix, inputs, seed, m=m, tau=0.7, backend=backend
            )
            assert got[0].dtype == dtype and got[0].shape == (n, dv)
            want = reference_value_and_grads(
                prototype_topk_mix_reference, inputs, seed, m=m, tau=0.7
            )
            for name, a, b in zip(("out", "grad_q", "grad_k", "grad_v"), got, want):
                assert_close(a, b, rtol, f"{name} {(n, k, d, dv, m)} {dtype}")


def topk_indices(backend, queries, keys, values, m):
    if backend == "reference":
        cos = F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).T
        return torch.sort(cos, dim=1, descending=True, stable=True).indices[:, :m]
    suffix = "" if backend == "cpu" else "_triton"
    op = getattr(torch.ops.fastalign, f"prototype_topk_mix_forward{suffix}")
    return op(queries, keys, values, m, 1.0)[1]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_topk_ties_and_duplicates_take_the_lowest_indices(backend):
    """Keys with four +-1 entries: cosines are exact and often equal, and some keys are exact
    duplicates; every backend must select the same sets (lowest index first among equals)."""
    available(backend)
    keys = unit_like_vectors(40, 8, seed=19)
    keys[25], keys[33], keys[39] = keys[2], keys[2], keys[10]  # duplicates after the originals
    queries = unit_like_vectors(9, 8, seed=20)
    queries[0] = keys[2]  # its best key appears three times
    values = randn(40, 3, seed=21, dtype=torch.float32)
    for m in (1, 2, 5, 13):
        want = topk_indices("reference", queries, keys, values, m)
        cos = F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).T
        kth = cos.gather(1, want[:, -1:])
        assert ((cos == kth).sum(dim=1) > 1).any(), "the test needs ties at the boundary"
        got = topk_indices(backend, queries, keys, values, m)
        assert torch.equal(got.sort(dim=1).values, want.sort(dim=1).values), m
        out = fastalign.prototype_topk_mix(queries, keys, values, m, backend=backend)
        assert_close(out, prototype_topk_mix_reference(queries, keys, values, m), 1e-5)
    assert topk_indices(backend, queries[:1], keys, values, 2)[0].sort().values.tolist() == [2, 25]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_topk_gradient_flows_only_through_the_selected_keys(backend):
    available(backend)
    q, k, v = (
        randn(*s, seed=22 + i, dtype=torch.float32)
        for i, s in enumerate(((4, 6), (30, 6), (30, 3)))
    )
    k.requires_grad_()
    v.requires_grad_()
    fastalign.prototype_topk_mix(q, k, v, m=3, backend=backend).sum().backward()
    chosen = topk_indices("reference", q, k.detach(), v.detach(), 3).unique()
    untouched = torch.ones(30, dtype=torch.bool)
    untouched[chosen] = False
    assert (v.grad[untouched] == 0).all() and (k.grad[untouched] == 0).all()
    assert (v.grad[chosen] != 0).any(dim=1).all()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    available(backend)
    x, p = randn(5, 4, seed=25).requires_grad_(), randn(3, 4, seed=26).requires_grad_()
    for normalize in (True, False):
        assert torch.autograd.gradcheck(
            lambda a, b, nz=normalize: fastalign.prototype_assign(
                a, b, tau=0.5, normalize=nz, backend=backend
            ),
            (x, p),
        )
    q, k, v = randn(4, 3, seed=27), randn(9, 3, seed=28), randn(9, 2, seed=29)
    assert torch.autograd.gradcheck(
        lambda a, b, c: fastalign.prototype_topk_mix(a, b, c, m=3, tau=0.8, backend=backend),
        (q.requires_grad_(), k.requires_grad_(), v.requires_grad_()),
    )


# --------------------------------------------------------------------------- update
@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
@pytest.mark.parametrize("normalize", [False, True])
def test_update(backend, normalize):
    available(backend)
    for dtype, rtol in dtypes_of(backend if backend != "reference" else "cpu"):
        p = randn(70, 13, seed=30, dtype=dtype).requires_grad_()
        x = randn(37, 13, seed=31, dtype=dtype).requires_grad_()
        a = torch.softmax(randn(37, 70, seed=32, dtype=dtype), dim=1)
        a[:, 5] = 0  # no mass
        before = p.detach().clone()
        got = fastalign.prototype_update(p, x, a, 0.75, normalize, backend=backend)
        assert not got.requires_grad and got.dtype == dtype
        assert torch.equal(p.detach(), before), "the input must stay untouched"
        assert torch.equal(got[5], before[5]), "a prototype without mass keeps its value"
        want = prototype_update_reference(p.double(), x.double(), a.double(), 0.75, normalize)
        assert_close(got, want, rtol, f"{dtype}")
        if normalize:
            moved = torch.ones(70, dtype=torch.bool)
            moved[5] = False
            norms = got[moved].double().norm(dim=1)
            torch.testing.assert_close(norms, torch.ones_like(norms))
    x, a = randn(6, 4, seed=33), torch.rand(6, 3, dtype=torch.float64)
    p = randn(3, 4, seed=34)
    if backend != "triton":
        torch.testing.assert_close(fastalign.prototype_update(p, x, a, 1.0, backend=backend), p)
        means = (a.T @ x) / a.sum(0)[:, None]
        torch.testing.assert_close(fastalign.prototype_update(p, x, a, 0.0, backend=backend), means)


# --------------------------------------------------------------------------- module, compile
def test_prototype_bank_state_dict_round_trip():
    bank = fastalign.nn.PrototypeBank(7, 5, generator=torch.Generator().manual_seed(0))
    x = randn(20, 5, seed=35, dtype=torch.float32)
    assignments = bank.assign(x)
    torch.testing.assert_close(assignments, fastalign.prototype_assign(x, bank.prototypes))
    before = bank.prototypes.clone()
    bank.update(x, bank.assign(x, mode="hard"))
    assert not torch.equal(bank.prototypes, before)
    torch.testing.assert_close(bank.prototypes.norm(dim=1), torch.ones(7))
    restored = fastalign.nn.PrototypeBank(7, 5)
    assert not torch.equal(restored.prototypes, bank.prototypes)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.prototypes, bank.prototypes)
    assert list(bank.state_dict()) == ["prototypes"] and not list(bank.parameters())
    learnable = fastalign.nn.PrototypeBank(7, 5, learnable=True)
    learnable(x).pow(2).sum().backward()
    assert learnable.prototypes.grad is not None and "7, 5" in repr(learnable)


@pytest.mark.parametrize("backend", ["reference", "auto"])  # auto: the C++ ops on CPU
def test_torch_compile_fullgraph(backend):
    available("cpu" if backend == "auto" else backend)
    x, p = randn(12, 6, seed=36, dtype=torch.float32), randn(5, 6, seed=37, dtype=torch.float32)
    v = randn(5, 4, seed=38, dtype=torch.float32)

    def loss_fn(a, b, c):
        soft = fastalign.prototype_assign(torch.tanh(a), b, tau=0.3, backend=backend)
        hard = fastalign.prototype_assign(a, b, "sinkhorn", backend=backend)
        mixed = fastalign.prototype_topk_mix(a, b, c, m=2, backend=backend)
        return (soft * hard).sum() + mixed.pow(2).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    want = value_and_grads(lambda *t: loss_fn(*t)[None], (x, p, v), 39)
    got = value_and_grads(lambda *t: compiled(*t)[None], (x, p, v), 39)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- opcheck
def op_cases(backend):
    x, p = randn(6, 5, seed=40, dtype=torch.float32), randn(4, 5, seed=41, dtype=torch.float32)
    a = torch.softmax(randn(6, 4, seed=42, dtype=torch.float32), dim=1)
    g = randn(6, 4, seed=43, dtype=torch.float32)
    v = randn(4, 3, seed=44, dtype=torch.float32)
    suffix = "" if backend == "cpu" else "_triton"
    ops = torch.ops.fastalign
    forward = getattr(ops, f"prototype_topk_mix_forward{suffix}")
    _, idx, w = forward(x, p, v, 2, 0.5)
    return [
        (f"prototype_assign_forward{suffix}", (x, p, 0, 0.5, 3, True), True),
        (f"prototype_assign_forward{suffix}", (x, p, 1, 0.5, 3, False), True),
        (f"prototype_assign_forward{suffix}", (x, p, 2, 0.5, 3, True), True),
        (f"prototype_assign_backward{suffix}", (g, a, x, p, 0.5, True), False),
        (f"prototype_update{suffix}", (p, x, a, 0.9, True), False),
        (f"prototype_topk_mix_forward{suffix}", (x, p, v, 2, 0.5), True),
        (
            f"prototype_topk_mix_backward{suffix}",
            (randn(6, 3, seed=45, dtype=torch.float32), x, p, v, idx, w, 0.5),
            False,
        ),
    ]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_opcheck_every_op(backend):
    available(backend)
    for name, args, differentiable in op_cases(backend):
        if differentiable:
            args = tuple(
                t.clone().requires_grad_() if isinstance(t, torch.Tensor) and i < 3 else t
                for i, t in enumerate(args)
            )
        torch.library.opcheck(getattr(torch.ops.fastalign, name).default, args)


# --------------------------------------------------------------------------- bad inputs
def good_assign():
    return dict(x=torch.randn(6, 5), prototypes=torch.randn(4, 5))


def good_topk():
    # m within 1..K: each case below makes one thing bad
    return dict(queries=torch.randn(6, 5), keys=torch.randn(4, 5), values=torch.randn(4, 3), m=2)


def good_update():
    return dict(prototypes=torch.randn(4, 5), x=torch.randn(6, 5), assignments=torch.rand(6, 4))


def with_nan(shape, at):
    t = torch.randn(*shape)
    t[at] = float("nan")
    return t


BAD = [
    ("assign", dict(prototypes=torch.randn(0, 5)), ValueError, "prototypes must hold at least"),
    ("assign", dict(prototypes=torch.randn(4, 3)), ValueError, "share the feature dimension"),
    ("assign", dict(x=with_nan((6, 5), (2, 3))), ValueError, r"x holds .* \(nan\) at \[2, 3\]"),
    (
        "assign",
        dict(prototypes=torch.full((4, 5), math.inf)),
        ValueError,
        r"prototypes holds .* \(inf\) at \[0, 0\]",
    ),
    ("assign", dict(x=torch.randn(6)), ValueError, "x must be 2-D"),
    ("assign", dict(x=torch.zeros(6, 5, dtype=torch.int64)), TypeError, "x must be a floating"),
    ("assign", dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    ("assign", dict(prototypes=torch.randn(4, 5).double()), TypeError, "share a dtype"),
    ("assign", dict(prototypes=torch.randn(4, 5, device="meta")), ValueError, "one device"),
    ("assign", dict(tau=0.0), ValueError, "tau must be a finite number > 0"),
    ("assign", dict(tau=-1.0), ValueError, "tau"),
    ("assign", dict(iters=0), ValueError, "iters = 0, expected iters >= 1"),
    ("assign", dict(iters=2.0), TypeError, "iters must be an int"),
    ("assign", dict(mode="argmax"), ValueError, "mode must be one of"),
    ("assign", dict(backend="gpu"), ValueError, "backend must be one of"),
    ("topk", dict(m=0), ValueError, "m = 0, expected m >= 1"),
    ("topk", dict(m=5), ValueError, r"m = 5, expected 1 <= m <= 4"),
    ("topk", dict(m=True), TypeError, "m must be an int"),
    ("topk", dict(keys=torch.randn(0, 5), values=torch.randn(0, 3)), ValueError, "keys must hold"),
    ("topk", dict(keys=torch.randn(4, 6)), ValueError, "share the feature dimension"),
    ("topk", dict(values=torch.randn(5, 3)), ValueError, "one row per key"),
    (
        "topk",
        dict(values=with_nan((4, 3), (1, 2))),
        ValueError,
        r"values holds .* \(nan\) at \[1, 2\]",
    ),
    ("topk", dict(queries=torch.randn(2, 6, 5)), ValueError, "queries must be 2-D"),
    ("topk", dict(tau=math.nan), ValueError, "tau"),
    ("update", dict(momentum=1.5), ValueError, "momentum must be in"),
    ("update", dict(momentum=-0.1), ValueError, "momentum must be a finite number >= 0"),
    ("update", dict(assignments=torch.rand(6, 3)), ValueError, r"assignments must be \(N, K\)"),
    ("update", dict(assignments=-torch.rand(6, 4)), ValueError, "non-negative"),
    ("update", dict(x=torch.randn(6, 4)), ValueError, "share the feature dimension"),
    ("update", dict(x=with_nan((6, 5), (0, 1))), ValueError, r"x holds .* \(nan\) at \[0, 1\]"),
]
FUNCTIONS = {
    "assign": (fastalign.prototype_assign, good_assign),
    "topk": (fastalign.prototype_topk_mix, good_topk),
    "update": (fastalign.prototype_update, good_update),
}


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
@pytest.mark.parametrize("op,change,error,message", BAD)
def test_bad_inputs_raise(backend, op, change, error, message):
    available(backend)
    fn, good = FUNCTIONS[op]
    kwargs = {"backend": backend, **good(), **change}
    with pytest.raises(error, match=message):
        fn(**kwargs)


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
def test_large_finite_inputs_are_accepted(backend):
    """The finite check sums each input first: a sum that overflows must not be taken for an
    infinity in the input."""
    available(backend)
    values = torch.full((4, 3), 3e38)
    assert torch.isinf(values.sum())
    out = fastalign.prototype_topk_mix(
        torch.randn(2, 5), torch.randn(4, 5), values, m=2, backend=backend
    )
    assert torch.isfinite(out).all()


@pytest.mark.triton_interpreter
def test_backend_dtype_is_checked():
    if fastalign.backends()["triton"] != "available":
        pytest.skip("triton not available")
    x, p = torch.randn(3, 2, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend 'triton' supports dtypes"):
        fastalign.prototype_assign(x, p, backend="triton")


@pytest.mark.skipif(not extension_loaded(), reason="fastalign._C not built")
def test_non_contiguous_inputs():
    x = randn(13, 9, seed=46).T.contiguous().T
    p = randn(7, 9, seed=47)[:, torch.arange(9)].T.contiguous().T
    assert not x.is_contiguous() and not p.is_contiguous()
    got = value_and_grads(fastalign.prototype_assign, (x, p), 48, backend="cpu")
    want = reference_value_and_grads(prototype_assign_reference, (x, p), 48)
    for a, b in zip(got, want):
        assert_close(a, b, 1e-10)


# --------------------------------------------------------------------------- Triton dtypes
def half_precision_cases(device, dtype):
    """(name, got, want) for the three operators in ``dtype`` against the float64 reference."""
    x, p = randn(37, 40, seed=49), randn(70, 40, seed=50)
    v = randn(70, 24, seed=51)
    a = torch.softmax(randn(37, 70, seed=52), dim=1)
    low = [t.to(device=device, dtype=dtype) for t in (x, p, v, a)]
    got_soft = value_and_grads(fastalign.prototype_assign, low[:2], 53, backend="triton")
    want_soft = reference_value_and_grads(prototype_assign_reference, (x, p), 53)
    got_mix = value_and_grads(fastalign.prototype_topk_mix, low[:3], 54, m=4, backend="triton")
    want_mix = reference_value_and_grads(prototype_topk_mix_reference, (x, p, v), 54, m=4)
    sink = fastalign.prototype_assign(*low[:2], "sinkhorn", backend="triton")
    update = fastalign.prototype_update(low[1], low[0], low[3], 0.5, backend="triton")
    return [
        *zip(("assign", "grad_x", "grad_p"), got_soft, want_soft),
        *zip(("mix", "grad_q", "grad_k", "grad_v"), got_mix, want_mix),
        ("sinkhorn", sink, prototype_assign_reference(x, p, "sinkhorn")),
        ("update", update, prototype_update_reference(p, x, a, 0.5)),
    ]


@pytest.mark.triton_interpreter
def test_triton_float16_smoke():
    """float16 through the same kernels (bfloat16 tl.dot is broken in the interpreter)."""
    available("triton")
    for name, got, want in half_precision_cases("cpu", torch.float16):
        assert got.dtype == torch.float16, name
        assert_close(got.float(), want, 2e-2, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_on_gpu_matches_reference(dtype):
    available("triton")
    rtol = 2e-3 if dtype == torch.float32 else 3e-2
    for name, got, want in half_precision_cases("cuda", dtype):
        assert_close(got.cpu(), want, rtol, name)


# --------------------------------------------------------------------------- AOT specs
def test_aot_specs_describe_the_kernels():
    pytest.importorskip("triton")
    from fastalign.kernels.triton import prototypes as pk

    specs = pk.aot_specs()
    dot_kernels = {
        pk._logits_kernel,
        pk._assign_grad_kernel,
        pk._update_kernel,
        pk._topk_mix_forward_kernel,
    }
    others = {
        pk._sinkhorn_columns_kernel,
        pk._sinkhorn_rows_kernel,
        pk._finish_kernel,
        pk._row_dot_kernel,
        pk._topk_mix_backward_kernel,
    }
    assert {s["fn"] for s in specs} == dot_kernels | others
    for spec in specs:
        arg_names = spec["fn"].arg_names
        assert list(spec["signature"]) == arg_names, spec["name"]
        constexprs = {n for n in arg_names if spec["signature"][n] == "constexpr"}
        assert constexprs == set(spec["constexprs"]), spec["name"]
        assert spec["expect_mma"] == (spec["fn"] in dot_kernels), spec["name"]
