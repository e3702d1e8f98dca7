"""Backend resolution: an explicitly named backend works under torch.compile(fullgraph=True)."""

import pytest
import torch

import fastalign
from fastalign._backends import extension_loaded

CALLS = {
    "region_word_similarity": (
        lambda backend, r, w: fastalign.region_word_similarity(r, w, backend=backend),
        lambda g: (torch.randn(3, 4, 8, generator=g), torch.randn(5, 6, 8, generator=g)),
    ),
    "dimension_correlation_loss": (
        lambda backend, a, b: fastalign.dimension_correlation_loss(a, b, backend=backend),
        lambda g: (torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)),
    ),
    "sparse_spatial_loss": (
        lambda backend, x, y: fastalign.sparse_spatial_loss(x, y, backend=backend),
        lambda g: (torch.randn(7, 8, generator=g), torch.randn(7, 8, generator=g)),
    ),
    "prototype_assign": (
        lambda backend, x, p: fastalign.prototype_assign(x, p, backend=backend),
        lambda g: (torch.randn(7, 8, generator=g), torch.randn(5, 8, generator=g)),
    ),
}


@pytest.mark.skipif(not extension_loaded(), reason="fastalign._C not built")
@pytest.mark.parametrize("op", list(CALLS))
def test_explicit_cpu_backend_compiles_fullgraph(op):
    call, make_inputs = CALLS[op]
    inputs = make_inputs(torch.Generator().manual_seed(len(op)))
    compiled = torch.compile(lambda *x: call("cpu", *x), fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), call("reference", *inputs))


def test_unavailable_backend_is_named(monkeypatch):
    # No CUDA device, whatever the build: on a GPU machine with a CUDA build it is available.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        fastalign.dimension_correlation_loss(torch.randn(4, 3), torch.randn(4, 3), backend="cuda")
