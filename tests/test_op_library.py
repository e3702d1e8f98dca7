"""The op plumbing written once (fastalign/ops/_library.py): every operator listed in
_backends.OPERATOR_OPS has its Triton and compiled ops, the two agree on their schema, and a
double backward through any of them fails loudly instead of missing second-order terms."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first triton import

import pytest  # noqa: E402
import torch  # noqa: E402

import fastalign  # noqa: E402
from fastalign._backends import OPERATOR_OPS, extension_loaded  # noqa: E402

OPS = [name for names in OPERATOR_OPS.values() for name in names]


def arguments(op) -> list[tuple[str, str]]:
    """(name, type) of every argument; SymInt (what Python schemas infer) reads as int."""
    schema = op.default._schema
    return [(a.name, str(a.type).replace("SymInt", "int")) for a in schema.arguments]


@pytest.mark.parametrize("name", OPS)
def test_every_op_has_a_triton_op(name):
    assert hasattr(torch.ops.fastalign, f"{name}_triton")


@pytest.mark.skipif(not extension_loaded(), reason="fastalign._C not built")
@pytest.mark.parametrize("name", OPS)
def test_triton_schema_is_the_compiled_one(name):
    """The Triton op's schema is read off the Python fake kernel; the compiled op's comes from
    csrc/ops.cpp. One op, two declarations: they must not drift apart."""
    compiled, triton_op = (
        getattr(torch.ops.fastalign, name),
        getattr(torch.ops.fastalign, name + "_triton"),
    )
    assert arguments(triton_op) == arguments(compiled)
    returns = [len(op.default._schema.returns) for op in (compiled, triton_op)]
    assert returns[0] == returns[1]


def double_backward_cases():
    torch.manual_seed(1402)
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    regions, words = torch.randn(2, 3, 4), torch.randn(3, 2, 4)
    x, p = torch.randn(5, 4), torch.randn(3, 4)
    return {
        "dimension_correlation_loss": (fastalign.dimension_correlation_loss, (a, b)),
        "sparse_spatial_loss": (fastalign.sparse_spatial_loss, (a, b)),
        "region_word_similarity": (fastalign.region_word_similarity, (regions, words)),
        "prototype_assign": (fastalign.prototype_assign, (x, p)),
        "prototype_topk_mix": (fastalign.prototype_topk_mix, (x, p, torch.randn(3, 2)), {"m": 2}),
    }


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("op", list(double_backward_cases()))
def test_double_backward_fails_loudly(op, backend):
    if fastalign.backends()[backend] != "available":
        pytest.skip(f"{backend} not available")
    fn, inputs, *kw = double_backward_cases()[op]
    inputs = [t.clone().requires_grad_() for t in inputs]
    out = fn(*inputs, backend=backend, **(kw[0] if kw else {}))
    upstream = torch.rand_like(out).requires_grad_()  # a gradient that itself needs one
    (grad,) = torch.autograd.grad(out, inputs[0], upstream, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.sum().backward()
