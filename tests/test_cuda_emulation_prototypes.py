"""The CUDA prototype kernels (csrc/cuda/prototypes.cuh) run on the CPU through the host
emulation, against the plain-PyTorch references in float64: assignment in every mode with its
gradients, the EMA update, the top-m mixture with its gradients; shapes that cross the 64 x 64
GEMM tiles, the 16-wide feature steps, the 4-row and 32-column blocks; exact ties, a small
temperature, float16 / bfloat16 inputs and the inputs the host code rejects."""

import math
import shutil
import zlib

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close_with_nans, cuda_emulation

import fastalign
from fastalign._backends import extension_has_cuda
from fastalign.ops.prototypes import (
    MODES,
    prototype_assign_reference,
    prototype_topk_mix_reference,
    prototype_update_reference,
)

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

# (N, K, D): single elements, fewer rows than a block, and past the 64-row / 64-prototype GEMM
# tiles, the 16-wide feature steps and the 32-column Sinkhorn blocks.
ASSIGN_SHAPES = [(1, 1, 1), (5, 3, 2), (37, 70, 19), (70, 33, 65), (130, 129, 17)]
# (N, K, D, Dv, m): one key; m = K; past the 64-query and 64-key tiles (one key range per
# tile: 3 ranges); m past one warp and past the 8 keys of the last range; 17 ranges of 2 tiles.
MIX_SHAPES = [(1, 1, 1, 1, 1), (3, 5, 2, 4, 5), (70, 130, 19, 23, 10), (65, 64, 33, 7, 3),
              (5, 200, 8, 3, 40), (3, 2100, 4, 2, 10)]  # fmt: skip


def ops():
    return cuda_emulation.ops()


def generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def assert_scaled_close(got, want, tol, what=""):
    """|got - want| <= tol * (max |want| + 1e-3) elementwise, in float64."""
    assert got.shape == want.shape, what
    scale = want.abs().max().item() + 1e-3
    torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=tol * scale, msg=what)


def reference_grads(fn, inputs, upstream, **kw):
    """fn on float64 copies of inputs, and the gradients of <fn(...), upstream>."""
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    out = fn(*leaves, **kw)
    return out.detach(), torch.autograd.grad(out, leaves, upstream.double())


# --------------------------------------------------------------------------- assignment
@pytest.mark.parametrize("shape", ASSIGN_SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_softmax_assignment_and_gradients(shape, normalize):
    n, k, d = shape
    gen = generator("softmax", shape, normalize)
    x, p = torch.randn(n, d, generator=gen), torch.randn(k, d, generator=gen)
    upstream = torch.randn(n, k, generator=gen)
    tau = 0.3 if normalize else 2.0
    got = ops().prototype_assign_forward(x, p, 0, tau, 3, normalize)
    want, (want_x, want_p) = reference_grads(
        prototype_assign_reference, (x, p), upstream, tau=tau, normalize=normalize
    )
    assert got.dtype == torch.float32
    assert_scaled_close(got, want, 1e-5, "assignments")
    grad_x, grad_p = ops().prototype_assign_backward(upstream, got, x, p, tau, normalize)
    assert_scaled_close(grad_x, want_x, 2e-5, "grad_x")
    assert_scaled_close(grad_p, want_p, 2e-5, "grad_prototypes")


@pytest.mark.parametrize("shape", ASSIGN_SHAPES)
def test_hard_assignment_is_a_one_hot_of_the_best_score(shape):
    n, k, d = shape
    gen = generator("hard", shape)
    x, p = torch.randn(n, d, generator=gen), torch.randn(k, d, generator=gen)
    got = ops().prototype_assign_forward(x, p, 1, 0.1, 3, True)
    scores = F.normalize(x.double(), dim=1) @ F.normalize(p.double(), dim=1).T
    assert torch.equal(got.sum(dim=1), torch.ones(n)) and set(got.unique().tolist()) <= {0.0, 1.0}
    chosen = scores.gather(1, got.argmax(dim=1, keepdim=True)).squeeze(1)
    assert (chosen >= scores.max(dim=1).values - 1e-6).all()  # a float32 rounding step at most


def test_hard_ties_go_to_the_lowest_index():
    # Rows of +-1 in 4 places: norms of exactly 2, so every score is exact and many tie.
    gen = generator("ties")
    x = (torch.randint(0, 3, (41, 6), generator=gen) - 1).float()
    x[x.abs().sum(dim=1) == 0, 0] = 1.0
    p = torch.cat([torch.eye(6), torch.eye(6), -torch.eye(6)])[torch.randperm(18, generator=gen)]
    got = ops().prototype_assign_forward(x, p, 1, 0.1, 3, True)
    want = prototype_assign_reference(x.double(), p.double(), "hard")
    assert torch.equal(got.double(), want)


@pytest.mark.parametrize("shape", ASSIGN_SHAPES)
@pytest.mark.parametrize("iters", [1, 4])
def test_sinkhorn_assignment(shape, iters):
    n, k, d = shape
    gen = generator("sinkhorn", shape, iters)
    x, p = torch.randn(n, d, generator=gen), torch.randn(k, d, generator=gen)
    got = ops().prototype_assign_forward(x, p, 2, 0.2, iters, True)
    want = prototype_assign_reference(x.double(), p.double(), "sinkhorn", 0.2, iters)
    assert_scaled_close(got, want, 1e-5, "sinkhorn")
    ones = torch.ones(n, dtype=torch.float64)
    torch.testing.assert_close(got.double().sum(dim=1), ones, rtol=0, atol=1e-6)  # float32 sums


def test_sinkhorn_is_stable_at_a_small_temperature_with_scores_near_one():
    # Every score within 1e-3 of 1 at tau = 0.01: logits near 100, exp(100) overflows float32.
    gen = generator("stable")
    base = torch.randn(1, 24, generator=gen)
    x = base + 1e-3 * torch.randn(50, 24, generator=gen)
    p = base + 1e-3 * torch.randn(37, 24, generator=gen)
    got = ops().prototype_assign_forward(x, p, 2, 0.01, 5, True)
    want = prototype_assign_reference(x.double(), p.double(), "sinkhorn", 0.01, 5)
    assert torch.isfinite(got).all()
    # float32 logits near 100 carry an absolute error of ~1e-5, i.e. a relative one in Q
    assert_scaled_close(got, want, 2e-4, "sinkhorn at tau = 0.01")
    ones = torch.ones(50, dtype=torch.float64)
    torch.testing.assert_close(got.double().sum(dim=1), ones, rtol=0, atol=1e-6)


def test_zero_row_clamps_its_norm_like_f_normalize():
    gen = generator("zero row")
    x, p = torch.randn(9, 5, generator=gen), torch.randn(6, 5, generator=gen)
    x[4] = 0.0
    upstream = torch.randn(9, 6, generator=gen)
    got = ops().prototype_assign_forward(x, p, 0, 0.5, 3, True)
    want, (want_x, want_p) = reference_grads(prototype_assign_reference, (x, p), upstream, tau=0.5)
    assert_scaled_close(got, want, 1e-6, "assignments")
    grad_x, grad_p = ops().prototype_assign_backward(upstream, got, x, p, 0.5, True)
    assert_scaled_close(grad_x, want_x, 1e-5, "grad_x (x / eps for the zero row)")
    assert_scaled_close(grad_p, want_p, 1e-5, "grad_prototypes")


# --------------------------------------------------------------------------- update
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 70, 19), (130, 33, 65)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_update_with_prototypes_without_mass(shape, normalize, momentum):
    n, k, d = shape
    gen = generator("update", shape, normalize, momentum)
    x, p = torch.randn(n, d, generator=gen), torch.randn(k, d, generator=gen)
    assignments = torch.softmax(3 * torch.randn(n, k, generator=gen), dim=1)
    empty = torch.rand(k, generator=gen) < 0.3  # these prototypes get no mass
    assignments[:, empty] = 0.0
    got = ops().prototype_update(p, x, assignments, momentum, normalize)
    want = prototype_update_reference(
        p.double(), x.double(), assignments.double(), momentum, normalize
    )
    assert_scaled_close(got, want, 2e-6, "update")
    assert torch.equal(got[empty], p[empty])


# --------------------------------------------------------------------------- top-m mixture
@pytest.mark.parametrize("shape", MIX_SHAPES)
def test_topk_mix_and_gradients(shape):
    n, k, d, dv, m = shape
    gen = generator("mix", shape)
    q, keys = torch.randn(n, d, generator=gen), torch.randn(k, d, generator=gen)
    values, upstream = torch.randn(k, dv, generator=gen), torch.randn(n, dv, generator=gen)
    out, indices, weights = ops().prototype_topk_mix_forward(q, keys, values, m, 0.7)
    want, want_grads = reference_grads(
        prototype_topk_mix_reference, (q, keys, values), upstream, m=m, tau=0.7
    )
    cosine = F.normalize(q.double(), dim=1) @ F.normalize(keys.double(), dim=1).T
    want_indices = torch.sort(cosine, dim=1, descending=True, stable=True).indices[:, :m]
    assert indices.dtype == torch.int64 and torch.equal(indices, want_indices)
    logits = (q.double()[:, None, :] * keys.double()[want_indices]).sum(-1) / 0.7
    assert_scaled_close(weights, torch.softmax(logits, dim=1), 1e-5, "weights")
    assert_scaled_close(out, want, 1e-5, "out")
    grads = ops().prototype_topk_mix_backward(upstream, q, keys, values, indices, weights, 0.7)
    for name, got, expected in zip(("queries", "keys", "values"), grads, want_grads):
        assert_scaled_close(got, expected, 2e-5, f"grad_{name}")


def test_topk_ties_and_duplicate_keys_take_the_lowest_indices():
    gen = generator("mix ties")
    keys = (torch.randint(0, 3, (150, 5), generator=gen) - 1).float()
    keys[keys.abs().sum(dim=1) == 0, 1] = 1.0
    q = keys[torch.randint(0, 150, (67,), generator=gen)]  # exact matches, with duplicates
    values = torch.randn(150, 3, generator=gen)
    out, indices, _ = ops().prototype_topk_mix_forward(q, keys, values, 7, 1.0)
    cosine = F.normalize(q.double(), dim=1) @ F.normalize(keys.double(), dim=1).T
    want_indices = torch.sort(cosine, dim=1, descending=True, stable=True).indices[:, :7]
    # Cosines of rows of 0 / +-1 are exact up to the norms' rounding, equal for equal norms.
    assert torch.equal(indices, want_indices)
    assert_scaled_close(out, prototype_topk_mix_reference(q, keys, values, 7, 1.0), 1e-5)


def test_topk_many_queries_share_the_keys_their_gradients_add_up():
    # 130 queries over 4 keys with m = 3: every key gradient sums many atomic additions.
    gen = generator("shared keys")
    q, keys = torch.randn(130, 6, generator=gen), torch.randn(4, 6, generator=gen)
    values, upstream = torch.randn(4, 9, generator=gen), torch.randn(130, 9, generator=gen)
    _, indices, weights = ops().prototype_topk_mix_forward(q, keys, values, 3, 0.5)
    _, want = reference_grads(
        prototype_topk_mix_reference, (q, keys, values), upstream, m=3, tau=0.5
    )
    grads = ops().prototype_topk_mix_backward(upstream, q, keys, values, indices, weights, 0.5)
    for got, expected in zip(grads, want):
        assert_scaled_close(got, expected, 2e-5)


# --------------------------------------------------------------------------- non-finite inputs
# The host code looks for no NaN (reading a flag back would cost a device synchronisation); the
# kernels rank a NaN above every number and propagate it as torch does, so the answer is the
# reference's wherever the NaN sits: (normalize, tensor, row, column, value). An infinity is a
# NaN once normalised; without normalize the GPU's products differ (see prototype_assign).
NON_FINITE = [(normalize, *case) for normalize in (True, False) for case in
              [("x", 0, 0, math.nan), ("x", 36, 7, math.nan), ("p", 5, 18, math.nan),
               ("p", 69, 0, math.nan)]]  # fmt: skip
NON_FINITE += [(True, "x", 20, 3, math.inf), (True, "p", 40, 9, -math.inf)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize,where,row,col,value", NON_FINITE)
def test_assignment_of_non_finite_inputs_is_the_references(mode, normalize, where, row, col, value):
    gen = generator("non-finite", mode, normalize, where, row, col, value)
    x, p = torch.randn(37, 19, generator=gen), torch.randn(70, 19, generator=gen)
    (x if where == "x" else p)[row, col] = value
    got = ops().prototype_assign_forward(x, p, MODES.index(mode), 0.3, 3, normalize)
    want = prototype_assign_reference(x.double(), p.double(), mode, 0.3, 3, normalize)
    if mode == "hard":  # the first NaN is the arg-max, as torch.argmax
        assert torch.equal(got.double(), want)
        return
    assert want.isnan().any()
    assert_close_with_nans(got, want, 1e-5, f"{mode} normalize={normalize}")


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("where", ["prototypes", "x", "assignments"])
def test_update_of_a_nan_input_is_the_references(normalize, where):
    gen = generator("update nan", normalize, where)
    x, p = torch.randn(37, 19, generator=gen), torch.randn(33, 19, generator=gen)
    assignments = torch.softmax(3 * torch.randn(37, 33, generator=gen), dim=1)
    {"prototypes": p, "x": x, "assignments": assignments}[where][4, 7] = math.nan
    got = ops().prototype_update(p, x, assignments, 0.5, normalize)
    want = prototype_update_reference(p.double(), x.double(), assignments.double(), 0.5, normalize)
    # A NaN mass is not > 0: that prototype keeps its value, on both sides.
    assert want.isnan().any() or where == "assignments"
    assert_close_with_nans(got, want, 2e-6, f"update normalize={normalize}")


@pytest.mark.parametrize("where,row", [("queries", 0), ("queries", 69), ("keys", 0),
                                       ("keys", 77), ("keys", 129), ("values", None)])  # fmt: skip
def test_topk_mix_of_a_nan_input_is_the_references(where, row):
    """A NaN cosine ranks first (torch.sort's order; the lowest index among NaNs), in every key
    range of the scan and in the merge of the ranges."""
    gen = generator("mix nan", where, row)
    q, keys = torch.randn(70, 19, generator=gen), torch.randn(130, 19, generator=gen)
    values = torch.randn(130, 23, generator=gen)
    if where == "values":  # a value row that some query mixes
        cosine = F.normalize(q, dim=1) @ F.normalize(keys, dim=1).T
        row = int(cosine[0].argmax())
    {"queries": q, "keys": keys, "values": values}[where][row, 5] = math.nan
    out, indices, weights = ops().prototype_topk_mix_forward(q, keys, values, 10, 0.7)
    want = prototype_topk_mix_reference(q.double(), keys.double(), values.double(), 10, 0.7)
    cosine = F.normalize(q.double(), dim=1) @ F.normalize(keys.double(), dim=1).T
    want_indices = torch.sort(cosine, dim=1, descending=True, stable=True).indices[:, :10]
    assert torch.equal(indices, want_indices)
    assert want.isnan().any()
    assert_close_with_nans(out, want, 1e-5, "out")


# --------------------------------------------------------------------------- half precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    gen = generator("half", str(dtype))
    x, p = torch.randn(37, 40, generator=gen), torch.randn(70, 40, generator=gen)
    values = torch.randn(70, 24, generator=gen)
    assignments = torch.softmax(torch.randn(37, 70, generator=gen), dim=1)
    low = [t.to(dtype) for t in (x, p, values, assignments)]
    x, p, values, assignments = (t.double() for t in low)  # the references see the rounded inputs
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    upstream = torch.randn(37, 70, generator=gen).to(dtype)
    for mode in MODES:
        got = ops().prototype_assign_forward(low[0], low[1], MODES.index(mode), 0.2, 3, True)
        assert got.dtype == dtype
        assert_scaled_close(got, prototype_assign_reference(x, p, mode, 0.2, 3), tol, mode)
    soft = ops().prototype_assign_forward(low[0], low[1], 0, 0.2, 3, True)
    _, want = reference_grads(prototype_assign_reference, (x, p), upstream, tau=0.2)
    grads = ops().prototype_assign_backward(upstream, soft, *low[:2], 0.2, True)
    for got, expected in zip(grads, want):
        assert got.dtype == dtype
        assert_scaled_close(got, expected, tol, "assignment gradient")
    update = ops().prototype_update(low[1], low[0], low[3], 0.5, False)
    assert update.dtype == dtype
    assert_scaled_close(update, prototype_update_reference(p, x, assignments, 0.5), tol, "update")
    mix_upstream = torch.randn(37, 24, generator=gen).to(dtype)
    out, indices, weights = ops().prototype_topk_mix_forward(*low[:3], 4, 1.0)
    want_out, want = reference_grads(
        prototype_topk_mix_reference, (x, p, values), mix_upstream, m=4, tau=1.0
    )
    assert out.dtype == dtype and weights.dtype == dtype
    assert_scaled_close(out, want_out, tol, "mix")
    grads = ops().prototype_topk_mix_backward(mix_upstream, *low[:3], indices, weights, 1.0)
    for got, expected in zip(grads, want):
        assert got.dtype == dtype
        assert_scaled_close(got, expected, tol, "mix gradient")


# --------------------------------------------------------------------------- bad inputs
def _assign(x=None, p=None, mode=0, tau=0.1, iters=3):
    x = torch.randn(4, 3) if x is None else x
    p = torch.randn(5, 3) if p is None else p
    return ops().prototype_assign_forward(x, p, mode, tau, iters, True)


def _mix(q=None, keys=None, values=None, m=2, tau=1.0):
    q = torch.randn(4, 3) if q is None else q
    keys = torch.randn(5, 3) if keys is None else keys
    values = torch.randn(5, 2) if values is None else values
    return ops().prototype_topk_mix_forward(q, keys, values, m, tau)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: _assign(torch.randn(4, 3).double(), torch.randn(5, 3).double()), TypeError,
         "take float16, bfloat16 or float32 .*, got Double"),
        (lambda: _assign(p=torch.randn(5, 3, dtype=torch.float16)), TypeError,
         "x and prototypes must share a dtype"),
        (lambda: _assign(p=torch.randn(5, 4)), ValueError, "must share the feature dimension D"),
        (lambda: _assign(x=torch.randn(0, 3)), ValueError, "x .N, D. must have at least one row"),
        (lambda: _assign(p=torch.randn(5)), ValueError, "prototypes must be 2-D"),
        (lambda: _assign(mode=3), ValueError, "mode = 3, expected one of 0 .softmax."),
        (lambda: _assign(tau=0.0), ValueError, "tau = 0, expected a finite number > 0"),
        (lambda: _assign(iters=0), ValueError, "iters = 0, expected iters >= 1"),
        (lambda: ops().prototype_assign_backward(torch.randn(4, 6), torch.rand(4, 5),
                                                 torch.randn(4, 3), torch.randn(5, 3), 0.1, True),
         ValueError, r"grad must have shape \(N, K\) = \[4, 5\]"),
        (lambda: ops().prototype_update(torch.randn(5, 3), torch.randn(4, 3), torch.rand(4, 6),
                                        0.9, False),
         ValueError, r"assignments must have shape \(N, K\) = \[4, 5\]"),
        (lambda: ops().prototype_update(torch.randn(5, 3), torch.randn(4, 3),
                                        torch.rand(4, 5) - 2.0, 0.9, False),
         ValueError, r"assignments\[0, 0\] = -1\.\d+, expected a non-negative weight"),
        (lambda: _mix(m=6), ValueError, "m = 6, expected 1 <= m <= K = 5"),
        (lambda: _mix(m=0), ValueError, "m = 0, expected 1 <= m <= K = 5"),
        (lambda: _mix(tau=-1.0), ValueError, "tau = -1, expected a finite number > 0"),
        (lambda: _mix(values=torch.randn(6, 2)), ValueError, "values .K, Dv."),
        (lambda: _mix(keys=torch.randn(5, 3, dtype=torch.bfloat16)), TypeError,
         "queries and keys must share a dtype"),
        (lambda: ops().prototype_topk_mix_backward(
            torch.randn(4, 2), torch.randn(4, 3), torch.randn(5, 3), torch.randn(5, 2),
            torch.zeros(4, 2, dtype=torch.int64), torch.rand(3, 2), 1.0),
         ValueError, r"weights must have shape \(N, m\) = \[4, 2\]"),
    ],
)  # fmt: skip
def test_bad_inputs_are_rejected(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --------------------------------------------------------------------------- dispatch
@pytest.mark.skipif(extension_has_cuda("prototype_assign"), reason="built with CUDA kernels")
@pytest.mark.parametrize("op", ["prototype_assign", "prototype_update", "prototype_topk_mix"])
def test_backend_cuda_without_cuda_kernels_names_the_operator(op):
    x, p = torch.randn(4, 3), torch.randn(5, 3)
    args = {
        "prototype_assign": (x, p),
        "prototype_update": (p, x, torch.rand(4, 5)),
        "prototype_topk_mix": (x, p, torch.randn(5, 2)),
    }[op]
    with pytest.raises(RuntimeError, match=rf"{op}: backend 'cuda' is unavailable"):
        getattr(fastalign, op)(*args, backend="cuda")
