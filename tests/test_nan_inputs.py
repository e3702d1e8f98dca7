"""With the finite checks off (the CUDA default) a NaN input reaches the kernels; each backend
must then give NaN where the plain-PyTorch reference gives NaN, the reference's values
elsewhere, and the arg-max positions torch.max / argmax / sort give (a NaN is the largest).
tl.max and tl.argmax pass over NaN, so the Triton kernels reduce through NaN-keeping helpers.

The check of CPU inputs is switched off here by patching the policy that check_finite reads;
the Triton kernels run under the interpreter on CPU tensors.
"""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first triton import

import pytest  # noqa: E402
import torch  # noqa: E402

import fastalign  # noqa: E402
from fastalign import ops  # noqa: E402
from fastalign.ops import _checks, _options  # noqa: E402

pytestmark = [
    pytest.mark.triton_interpreter,
    # numpy's nanmax / inf - inf under the interpreter
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


@pytest.fixture(autouse=True)
def finite_checks_off(monkeypatch):
    """No input is checked: the kernels see the NaN, as CUDA inputs do by default."""
    monkeypatch.setattr(_checks, "finite_check_applies", lambda device: False)


def assert_same_nans(actual, expected, what):
    assert torch.equal(actual.isnan(), expected.isnan()), (
        f"{what}: NaN at {actual.isnan().nonzero().tolist()}, reference at "
        f"{expected.isnan().nonzero().tolist()}"
    )
    torch.testing.assert_close(actual, expected, equal_nan=True, msg=lambda m: f"{what}: {m}")


def with_nan(x, index):
    x = x.clone()
    x[index] = math.nan
    return x


# --------------------------------------------------------------------------- region-word
# 40 tokens: two 32-token tiles, so a NaN in the second tile must win over the first's maximum.
N_IMAGES, N_CAPTIONS, TOKENS, DIM = 3, 4, 40, 8
REGION_LENGTHS, WORD_LENGTHS = torch.tensor([40, 7, 33]), torch.tensor([5, 40, 36, 1])
NAN_AT = {
    "region in the first tile": ("regions", (0, 3, 2)),
    "region in the second tile": ("regions", (0, 35, 0)),
    "word in the first tile": ("words", (1, 0, 5)),
    "word in the second tile": ("words", (2, 34, 7)),
}


def region_word_inputs(where):
    g = torch.Generator().manual_seed(5)
    inputs = {
        "regions": torch.randn(N_IMAGES, TOKENS, DIM, generator=g),
        "words": torch.randn(N_CAPTIONS, TOKENS, DIM, generator=g),
    }
    name, index = NAN_AT[where]
    inputs[name] = with_nan(inputs[name], index)
    return inputs


@pytest.mark.parametrize("where", list(NAN_AT))
@pytest.mark.parametrize("align,aggregate", [("max", "mean"), ("max", "max"), ("lse", "lse")])
def test_region_word_scores_nan_as_reference(where, align, aggregate):
    inputs = region_word_inputs(where)
    kwargs = dict(
        region_lengths=REGION_LENGTHS,
        word_lengths=WORD_LENGTHS,
        direction="both",
        align=align,
        aggregate=aggregate,
    )
    expected = ops.region_word_similarity_reference(*inputs.values(), **kwargs)
    assert expected.isnan().any() and not expected.isnan().all()
    actual = fastalign.region_word_similarity(*inputs.values(), **kwargs, backend="triton")
    assert_same_nans(actual, expected, f"{where}, {align}/{aggregate}")


@pytest.mark.parametrize("where", list(NAN_AT))
def test_region_word_max_align_keeps_first_nan_for_backward(where):
    """The aligned values and arg-max key tokens the forward saves for the backward: those of
    torch.max over the 4-D score tensor, NaN and the first NaN's index included."""
    from fastalign.kernels.triton import region_word as kernels

    inputs = region_word_inputs(where)
    regions, words = inputs["regions"], inputs["words"]
    codes = (_options.DIRECTION_BOTH, _options.ALIGN_MAX, _options.AGGREGATE_MEAN)
    _, a_t2i, idx_t2i, a_i2t, idx_i2t = kernels.region_word_forward(
        regions, words, REGION_LENGTHS, WORD_LENGTHS, *codes, 0.1, 0.1, False, True, True
    )
    scores = torch.einsum("ird,twd->itrw", regions, words)
    region_mask = torch.arange(TOKENS) < REGION_LENGTHS[:, None]
    word_mask = torch.arange(TOKENS) < WORD_LENGTHS[:, None]
    for direction, keyed, key_mask, query_mask, values, index in (
        ("t2i", scores, region_mask[:, None, :, None], word_mask[None, :, :], a_t2i, idx_t2i),
        (
            "i2t",
            scores.transpose(2, 3),
            word_mask[None, :, :, None],
            region_mask[:, None, :],
            a_i2t,
            idx_i2t,
        ),
    ):
        expected_values, expected_index = keyed.masked_fill(~key_mask, -math.inf).max(dim=2)
        query_mask = query_mask.expand_as(expected_values)
        what = f"{where}, {direction}"
        assert_same_nans(values[query_mask], expected_values[query_mask], what)
        assert torch.equal(index[query_mask].long(), expected_index[query_mask]), what


# --------------------------------------------------------------------------- prototypes
# 40 prototypes: two 32-wide float32 tiles of the logits kernel.
PROTOTYPE_NAN_AT = {
    "x row": ("x", (3, 1)),
    "first-tile prototype": ("prototypes", (6, 0)),
    "second-tile prototype": ("prototypes", (37, 4)),
}


@pytest.mark.parametrize("where", list(PROTOTYPE_NAN_AT))
@pytest.mark.parametrize("mode", ["softmax", "hard", "sinkhorn"])
def test_prototype_assign_nan_as_reference(where, mode):
    g = torch.Generator().manual_seed(11)
    inputs = {"x": torch.randn(9, 5, generator=g), "prototypes": torch.randn(40, 5, generator=g)}
    name, index = PROTOTYPE_NAN_AT[where]
    inputs[name] = with_nan(inputs[name], index)
    expected = ops.prototype_assign_reference(**inputs, mode=mode)
    actual = fastalign.prototype_assign(**inputs, mode=mode, backend="triton")
    assert_same_nans(actual, expected, f"{where}, {mode}")


@pytest.mark.parametrize("where", ["query", "first-tile key", "second-tile key", "two keys"])
def test_prototype_topk_mix_takes_nan_keys_first(where):
    """torch.sort puts a NaN cosine first: a NaN key is among every query's m keys."""
    from fastalign.kernels.triton import prototypes as kernels

    g = torch.Generator().manual_seed(13)
    queries, keys = torch.randn(6, 5, generator=g), torch.randn(45, 5, generator=g)
    values = torch.randn(45, 3, generator=g)
    if where == "query":
        queries = with_nan(queries, (2, 4))
    else:
        for key in {"first-tile key": [9], "second-tile key": [40], "two keys": [41, 7]}[where]:
            keys = with_nan(keys, (key, 1))
    m = 4
    expected = ops.prototype_topk_mix_reference(queries, keys, values, m=m)
    actual = fastalign.prototype_topk_mix(queries, keys, values, m=m, backend="triton")
    assert_same_nans(actual, expected, where)
    cosine = (
        torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(keys, dim=1).T
    )
    chosen = torch.sort(cosine, dim=1, descending=True, stable=True).indices[:, :m]
    _, indices, _ = kernels.prototype_topk_mix_forward(queries, keys, values, m, 1.0)
    assert torch.equal(indices.sort(dim=1).values, chosen.sort(dim=1).values), where


# --------------------------------------------------------------------------- losses
@pytest.mark.parametrize("row", [0, 5])
@pytest.mark.parametrize(
    "select,largest", [("threshold", True), ("soft", True), ("topk", True), ("topk", False)]
)
@pytest.mark.parametrize("kind", ["inter", "intra"])
def test_sparse_spatial_loss_nan_as_reference(kind, select, largest, row):
    g = torch.Generator().manual_seed(17)
    img, txt = torch.randn(7, 6, generator=g), torch.randn(7, 6, generator=g)
    img = with_nan(img, (row, 2))
    kwargs = dict(kind=kind, select=select, largest=largest, k=3 if select == "topk" else None)
    expected = ops.sparse_spatial_loss_reference(img, txt, **kwargs)
    actual = fastalign.sparse_spatial_loss(img, txt, **kwargs, backend="triton")
    assert_same_nans(actual, expected, f"{kind}, {select}, largest={largest}")


@pytest.mark.parametrize("mode", ["barlow", "softmax"])
@pytest.mark.parametrize("index", [(0, 0), (6, 40)])
def test_dimension_correlation_loss_nan_as_reference(mode, index):
    g = torch.Generator().manual_seed(19)
    a, b = torch.randn(8, 70, generator=g), torch.randn(8, 70, generator=g)
    b = with_nan(b, index)
    expected = ops.dimension_correlation_loss_reference(a, b, mode=mode)
    actual = fastalign.dimension_correlation_loss(a, b, mode=mode, backend="triton")
    assert_same_nans(actual, expected, f"{mode}, NaN at {index}")
