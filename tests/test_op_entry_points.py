"""Every compiled op, called directly on CPU tensors with bad arguments, raises an error that
names the argument: never a crash, an out-of-bounds access or a silent answer. All cases run in
this one process, so a segfault fails the whole module. A new op adds its good arguments to
GOOD and its bad ones to BAD."""

from __future__ import annotations

import math

import pytest
import torch

import fastalign
from fastalign.ops import region_word_similarity_reference

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.fastalign, "region_word_forward"), reason="fastalign._C not built"
)
ERRORS = (RuntimeError, ValueError, TypeError, IndexError)
NAN = float("nan")


def _region_word():
    g = torch.Generator().manual_seed(0)
    regions, words = torch.randn(3, 5, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    lengths = dict(region_lengths=torch.tensor([5, 3, 1]), word_lengths=torch.tensor([6, 2]))
    return regions, words, lengths


def _forward_args():
    regions, words, lengths = _region_word()
    return dict(regions=regions, words=words, **lengths, direction=2, align=0, aggregate=0,
                align_tau=0.1, aggregate_tau=0.1, leaky=False, need_indices=True,
                need_values=True)  # fmt: skip


def _backward_args():
    forward = _forward_args()
    _, _, idx_t2i, _, idx_i2t = torch.ops.fastalign.region_word_forward(**forward)
    return dict(coef_t2i=torch.ones(3, 2, 6), aux_t2i=idx_t2i, coef_i2t=torch.ones(3, 2, 5),
                aux_i2t=idx_i2t, regions=forward["regions"], words=forward["words"],
                region_lengths=forward["region_lengths"], word_lengths=forward["word_lengths"],
                align=0, align_tau=0.1, leaky=False)  # fmt: skip


def _topk_backward_args():
    q, keys, values = torch.randn(6, 4), torch.randn(5, 4), torch.randn(5, 2)
    _, indices, weights = torch.ops.fastalign.prototype_topk_mix_forward(q, keys, values, 2, 1.0)
    return dict(grad=torch.randn(6, 2), queries=q, keys=keys, values=values, indices=indices,
                weights=weights, tau=1.0)  # fmt: skip


GOOD = {
    "region_word_forward": _forward_args,
    "region_word_backward": _backward_args,
    "dimension_correlation_loss_forward": lambda: dict(
        a=torch.randn(6, 4), b=torch.randn(6, 4), mode=0, off_diagonal_weight=0.005, tau=0.1,
        eps=1e-5, need_grad=True, path=0),
    "sparse_spatial_loss_forward": lambda: dict(
        img=torch.randn(5, 3), txt=torch.randn(5, 3), alpha=torch.ones(5), kind=0, select=0, k=2,
        temperature=0.1, largest=True, need_grad=True),
    "prototype_assign_forward": lambda: dict(
        x=torch.randn(6, 4), prototypes=torch.randn(3, 4), mode=0, tau=0.1, iters=3,
        normalize=True),
    "prototype_assign_backward": lambda: dict(
        grad=torch.randn(6, 3), assignments=torch.rand(6, 3).softmax(1), x=torch.randn(6, 4),
        prototypes=torch.randn(3, 4), tau=0.1, normalize=True),
    "prototype_update": lambda: dict(
        prototypes=torch.randn(3, 4), x=torch.randn(6, 4), assignments=torch.rand(6, 3),
        momentum=0.9, normalize=True),
    "prototype_topk_mix_forward": lambda: dict(
        queries=torch.randn(6, 4), keys=torch.randn(5, 4), values=torch.randn(5, 2), m=2, tau=1.0),
    "prototype_topk_mix_backward": _topk_backward_args,
}  # fmt: skip


def _set(name, index, value):
    """A change that writes value at x[index] of a clone of argument name."""

    def change(args):
        x = args[name].clone()
        x[index] = value
        return {name: x}

    return change


def _map(name, fn):
    return lambda args: {name: fn(args[name])}


def _all_floats(dtype, *names):
    return lambda args: {n: args[n].to(dtype) for n in names}


RW, RWB = "region_word_forward", "region_word_backward"
DC, SS = "dimension_correlation_loss_forward", "sparse_spatial_loss_forward"
PA, PAB, PU = "prototype_assign_forward", "prototype_assign_backward", "prototype_update"
PT, PTB = "prototype_topk_mix_forward", "prototype_topk_mix_backward"

# (op, change: a dict of arguments to replace or a function of the good arguments, match).
BAD = [
    # region_word_forward: shapes, dtypes, lengths, options, non-finite valid tokens
    (RW, _map("regions", lambda x: x[0]), r"regions must be 3-D \(Ni, R, D\), got shape \[5, 4\]"),
    (
        RW,
        _map("words", lambda x: x[..., :3]),
        "regions and words must share the feature size D, got 4 and 3",
    ),
    (
        RW,
        _map("words", torch.Tensor.double),
        "regions and words must share a dtype, got Float and Double",
    ),
    (
        RW,
        _all_floats(torch.float16, "regions", "words"),
        "the CPU kernels take float32 or float64, got Half",
    ),
    (
        RW,
        _map("regions", lambda x: x[:0]),
        r"regions must have at least one item and one token, got shape \[0, 5, 4\]",
    ),
    (RW, _map("words", lambda x: x[:, :0]), r"words must have at least one item and one token"),
    (
        RW,
        dict(region_lengths=torch.tensor([5, 0, 1])),
        r"region_lengths\[1\] = 0, expected 1 <= length <= 5",
    ),
    (
        RW,
        dict(region_lengths=torch.tensor([5, 6, 1])),
        r"region_lengths\[1\] = 6, expected 1 <= length <= 5",
    ),
    (
        RW,
        dict(word_lengths=torch.tensor([-3, 2])),
        r"word_lengths\[0\] = -3, expected 1 <= length <= 6",
    ),
    (RW, dict(word_lengths=torch.tensor([7, 2], dtype=torch.int32)), r"word_lengths\[0\] = 7"),
    (RW, dict(word_lengths=torch.tensor([6])), r"word_lengths must have shape \(2,\), got \[1\]"),
    (
        RW,
        dict(word_lengths=torch.tensor([[6, 2]])),
        r"word_lengths must have shape \(2,\), got \[1, 2\]",
    ),
    (
        RW,
        dict(word_lengths=torch.tensor([6.0, 2.0])),
        "word_lengths must hold integers, got dtype Float",
    ),
    (
        RW,
        dict(word_lengths=torch.tensor([True, True])),
        "word_lengths must hold integers, got dtype Bool",
    ),
    (RW, dict(direction=3), r"direction = 3, expected one of 0 \(t2i\), 1 \(i2t\), 2 \(both\)"),
    (RW, dict(align=-1), r"align = -1, expected one of 0 \(max\), 1 \(lse\)"),
    (
        RW,
        dict(aggregate=4),
        r"aggregate = 4, expected one of 0 \(mean\), 1 \(sum\), 2 \(max\), 3 \(lse\)",
    ),
    (RW, dict(align_tau=0.0), "align_tau = 0, expected a finite number > 0"),
    (RW, dict(align_tau=-1.0), "align_tau = -1, expected a finite number > 0"),
    (RW, dict(aggregate_tau=math.inf), "aggregate_tau = inf, expected a finite number > 0"),
    (RW, dict(aggregate_tau=NAN), "aggregate_tau = nan, expected a finite number > 0"),
    (
        RW,
        _set("regions", (1, 2, 3), NAN),
        r"regions holds a non-finite value \(nan\) at \[1, 2, 3\]",
    ),
    (
        RW,
        _set("words", (0, 5, 0), -math.inf),
        r"words holds a non-finite value \(-inf\) at \[0, 5, 0\]",
    ),
    # region_word_backward: the saved tensors, and the forward's checks
    (
        RWB,
        _set("aux_t2i", (0, 0, 0), 5),
        r"aux_t2i\[0, 0, 0\] = 5, expected an arg-max index 0 <= index < region_lengths\[0\] = 5$",
    ),
    (
        RWB,
        _set("aux_t2i", (2, 1, 1), 1),
        r"aux_t2i\[2, 1, 1\] = 1, expected an arg-max index 0 <= index < region_lengths\[2\] = 1",
    ),
    (RWB, _set("aux_t2i", (1, 0, 3), -1), r"aux_t2i\[1, 0, 3\] = -1"),
    (
        RWB,
        _set("aux_i2t", (0, 1, 4), 2),
        r"aux_i2t\[0, 1, 4\] = 2, expected an arg-max index 0 <= index < word_lengths\[1\] = 2",
    ),
    (
        RWB,
        _map("aux_t2i", torch.Tensor.float),
        r"aux_t2i must be int32 \(the forward's arg-max indices, align max\), got Float",
    ),
    (
        RWB,
        _map("aux_t2i", lambda x: x[..., :5]),
        r"aux_t2i must have shape \(Ni, Nt, L\) = \[3, 2, 6\], got \[3, 2, 5\]",
    ),
    (
        RWB,
        _map("coef_i2t", lambda x: x[:2]),
        r"coef_i2t must have shape \(Ni, Nt, R\) = \[3, 2, 5\], got \[2, 2, 5\]",
    ),
    (
        RWB,
        _map("coef_t2i", torch.Tensor.double),
        r"coef_t2i must be Float \(the accumulation dtype\), got Double",
    ),
    (
        RWB,
        dict(align=1),
        r"aux_t2i must be Float \(the forward's aligned values, align lse\), got Int",
    ),
    (RWB, dict(align=2), r"align = 2, expected one of 0 \(max\), 1 \(lse\)"),
    (RWB, dict(align_tau=0.0), "align_tau = 0, expected a finite number > 0"),
    (
        RWB,
        dict(region_lengths=torch.tensor([5, 9, 1])),
        r"region_lengths\[1\] = 9, expected 1 <= length <= 5",
    ),
    (RWB, _map("words", lambda x: x[..., :3]), "regions and words must share the feature size D"),
    (
        RWB,
        _set("regions", (0, 4, 0), NAN),
        r"regions holds a non-finite value \(nan\) at \[0, 4, 0\]",
    ),
    # dimension_correlation_loss_forward
    (DC, _map("a", lambda x: x[0]), r"a must be 2-D \(N, D\), got shape \[4\]"),
    (
        DC,
        _map("b", lambda x: x[:, :3]),
        r"a and b must be \(N, D\) matrices of one shape, got \[6, 4\] and \[6, 3\]",
    ),
    (
        DC,
        lambda a: {"a": a["a"][:1], "b": a["b"][:1]},
        r"a and b need N >= 2 rows and D >= 1 columns, got \[1, 4\]",
    ),
    (DC, _map("b", torch.Tensor.double), "a and b must share a dtype, got Float and Double"),
    (
        DC,
        _all_floats(torch.bfloat16, "a", "b"),
        "the CPU kernels take float32 or float64, got BFloat16",
    ),
    (DC, dict(mode=2), r"mode = 2, expected one of 0 \(barlow\), 1 \(softmax\)"),
    (DC, dict(path=3), r"path = 3, expected one of 0 \(auto\), 1 \(correlation\), 2 \(gram\)"),
    (DC, dict(path=2, mode=1), r"path = 2 \(gram\) needs mode = 0 \(barlow\), got mode = 1"),
    (DC, dict(tau=0.0), "tau = 0, expected a finite number > 0"),
    (DC, dict(eps=-1e-5), "eps = -1e-05, expected a finite number > 0"),
    (
        DC,
        dict(off_diagonal_weight=-0.5),
        "off_diagonal_weight = -0.5, expected a finite number >= 0",
    ),
    (DC, _set("b", (2, 1), NAN), r"b holds a non-finite value \(nan\) at \[2, 1\]"),
    # sparse_spatial_loss_forward
    (SS, _map("img", lambda x: x[0]), r"img must be 2-D \(N, D\), got shape \[3\]"),
    (SS, _map("txt", lambda x: x[:4]), r"img and txt must be \(N, D\) matrices of one shape"),
    (
        SS,
        lambda a: {"img": a["img"][:1], "txt": a["txt"][:1], "alpha": a["alpha"][:1]},
        "img and txt need N >= 2 rows",
    ),
    (SS, _map("alpha", lambda x: x[:4]), r"alpha must be \(N,\) = \(5,\), got \[4\]"),
    (
        SS,
        _map("alpha", torch.Tensor.double),
        "img and alpha must share a dtype, got Float and Double",
    ),
    (SS, dict(kind=2), r"kind = 2, expected one of 0 \(inter\), 1 \(intra\)"),
    (SS, dict(select=-1), r"select = -1, expected one of 0 \(threshold\), 1 \(soft\), 2 \(topk\)"),
    (SS, dict(select=2, k=0), r"k must be in \[1, N - 1 = 4\], got 0"),
    (SS, dict(select=2, k=5), r"k must be in \[1, N - 1 = 4\], got 5"),
    (SS, dict(select=1, temperature=0.0), "temperature = 0, expected a finite number > 0"),
    (SS, _set("txt", (3, 0), math.inf), r"txt holds a non-finite value \(inf\) at \[3, 0\]"),
    # prototype_assign_forward
    (PA, _map("x", lambda x: x[0]), r"x must be 2-D \(N, D\), got shape \[4\]"),
    (
        PA,
        _map("x", lambda x: x[:0]),
        r"x \(N, D\) must have at least one row and one column, got shape \[0, 4\]",
    ),
    (
        PA,
        _map("prototypes", lambda x: x[:, :3]),
        r"x \[6, 4\] and prototypes \[3, 3\] must share the feature dimension D",
    ),
    (
        PA,
        _map("prototypes", torch.Tensor.double),
        "x and prototypes must share a dtype, got Float and Double",
    ),
    (PA, dict(mode=3), r"mode = 3, expected one of 0 \(softmax\), 1 \(hard\), 2 \(sinkhorn\)"),
    (PA, dict(tau=0.0), "tau = 0, expected a finite number > 0"),
    (PA, dict(iters=0), "iters = 0, expected iters >= 1"),
    (
        PA,
        _set("prototypes", (2, 3), NAN),
        r"prototypes holds a non-finite value \(nan\) at \[2, 3\]",
    ),
    # prototype_assign_backward
    (
        PAB,
        _map("grad", lambda x: x[:, :2]),
        r"grad must have shape \(N, K\) = \[6, 3\], got \[6, 2\]",
    ),
    (
        PAB,
        _map("assignments", lambda x: x[:5]),
        r"assignments must have shape \(N, K\) = \[6, 3\], got \[5, 3\]",
    ),
    (
        PAB,
        _map("grad", lambda x: x.to(torch.int64)),
        "grad must be a floating-point tensor, got Long",
    ),
    (PAB, _map("assignments", torch.Tensor.double), "x and assignments must share a dtype"),
    (PAB, dict(tau=-0.1), "tau = -0.1, expected a finite number > 0"),
    (PAB, _set("grad", (5, 0), NAN), r"grad holds a non-finite value \(nan\) at \[5, 0\]"),
    # prototype_update
    (
        PU,
        _map("assignments", lambda x: x[:, :2]),
        r"assignments must have shape \(N, K\) = \[6, 3\], got \[6, 2\]",
    ),
    (
        PU,
        _map("x", lambda x: x[:, :2]),
        r"prototypes \[3, 4\] and x \[6, 2\] must share the feature",
    ),
    (PU, dict(momentum=1.5), "momentum = 1.5, expected 0 <= momentum <= 1"),
    (PU, dict(momentum=-0.1), "momentum = -0.1, expected 0 <= momentum <= 1"),
    (PU, dict(momentum=NAN), "momentum = nan, expected 0 <= momentum <= 1"),
    (
        PU,
        _set("assignments", (0, 0), math.inf),
        r"assignments holds a non-finite value \(inf\) at \[0, 0\]",
    ),
    (PU, _set("assignments", (2, 1), -0.5), r"assignments\[2, 1\] = -0.5, expected a non-negative"),
    # prototype_topk_mix_forward
    (PT, dict(m=0), "m = 0, expected 1 <= m <= K = 5"),
    (PT, dict(m=6), "m = 6, expected 1 <= m <= K = 5"),
    (PT, dict(tau=0.0), "tau = 0, expected a finite number > 0"),
    (
        PT,
        _map("values", lambda x: x[:4]),
        r"values \(K, Dv\) must have one row per key \(K = 5\), got shape \[4, 2\]",
    ),
    (
        PT,
        _map("keys", lambda x: x[:, :3]),
        "queries .* and keys .* must share the feature dimension D",
    ),
    (PT, _map("keys", lambda x: x[:0]), r"keys \(K, D\) must have at least one row and one column"),
    (PT, _set("queries", (1, 1), NAN), r"queries holds a non-finite value \(nan\) at \[1, 1\]"),
    # prototype_topk_mix_backward
    (PTB, _set("indices", (0, 1), 5), r"indices\[0, 1\] = 5, expected 0 <= index <= 4"),
    (PTB, _set("indices", (3, 0), -1), r"indices\[3, 0\] = -1, expected 0 <= index <= 4"),
    (PTB, _map("indices", torch.Tensor.float), "indices must hold integers .*, got dtype Float"),
    (PTB, _map("indices", lambda x: x[0]), r"indices must be 2-D \(N, m\), got shape \[2\]"),
    (
        PTB,
        _map("weights", lambda x: x[:, :1]),
        r"weights must have shape \(N, m\) = \[6, 2\], got \[6, 1\]",
    ),
    (
        PTB,
        _map("grad", lambda x: x[:, :1]),
        r"grad must have shape \(N, Dv\) = \[6, 2\], got \[6, 1\]",
    ),
    (
        PTB,
        lambda a: {"indices": torch.zeros(6, 6, dtype=torch.int64), "weights": torch.ones(6, 6)},
        "m = 6, expected 1 <= m <= K = 5",
    ),
    (PTB, dict(tau=0.0), "tau = 0, expected a finite number > 0"),
    (PTB, _set("weights", (0, 0), NAN), r"weights holds a non-finite value \(nan\) at \[0, 0\]"),
]


def compiled_ops() -> set[str]:
    """The ops of torch.ops.fastalign with a C++ CPU kernel."""
    names = (n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastalign::"))
    return {
        n.split("::")[1] for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU")
    }


def test_every_compiled_op_has_good_and_bad_cases():
    assert compiled_ops() == set(GOOD) == {op for op, _, _ in BAD}


@pytest.mark.parametrize("op", sorted(GOOD))
def test_good_arguments_pass(op):
    getattr(torch.ops.fastalign, op)(**GOOD[op]())


@pytest.mark.parametrize(
    "op,change,message", BAD, ids=[f"{op}-{i}" for i, (op, _, _) in enumerate(BAD)]
)
def test_bad_arguments_raise(op, change, message):
    args = GOOD[op]()
    args |= change(args) if callable(change) else change
    with pytest.raises(ERRORS, match=f"^{op}: {message}"):
        getattr(torch.ops.fastalign, op)(**args)


@pytest.mark.parametrize("name", ["keys", "values", "grad"])
def test_topk_mix_backward_names_a_non_finite_row_it_reads(name):
    """The backward checks grad and the key and value rows the indices pick inside its first
    pass; a bad element there raises, named as everywhere."""
    args = _topk_backward_args()
    row = int(args["indices"][2, 1]) if name != "grad" else 2
    x = args[name].clone()
    x[row, 1] = NAN
    message = rf"^{PTB}: {name} holds a non-finite value \(nan\) at \[{row}, 1\]"
    with pytest.raises(ValueError, match=message):
        torch.ops.fastalign.prototype_topk_mix_backward(**(args | {name: x}))


def test_topk_mix_backward_never_reads_rows_no_index_picks():
    """A NaN in a key or value row that no index picks changes nothing, as in the reference
    (its gradient reaches only the picked rows)."""
    args = _topk_backward_args()
    unpicked = sorted(set(range(5)) - set(args["indices"].flatten().tolist()))
    if not unpicked:  # 6 queries x 2 picks of 5 rows: make one row unpicked
        args["indices"] = torch.where(args["indices"] == 4, 3, args["indices"])
        unpicked = [4]
    keys, values = args["keys"].clone(), args["values"].clone()
    keys[unpicked[0]], values[unpicked[0]] = NAN, math.inf
    got = torch.ops.fastalign.prototype_topk_mix_backward(**(args | dict(keys=keys, values=values)))
    want = torch.ops.fastalign.prototype_topk_mix_backward(**args)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_region_word_ignores_non_finite_padding():
    """NaN and inf in padded tokens are never read: the answer equals the one on clean inputs
    (the reference's masked mean would turn a padded NaN into NaN)."""
    args = _forward_args()
    regions, words = args["regions"].clone(), args["words"].clone()
    regions[1, 3:], words[1, 2:] = NAN, math.inf
    got = torch.ops.fastalign.region_word_forward(**(args | dict(regions=regions, words=words)))
    want = torch.ops.fastalign.region_word_forward(**args)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    want = region_word_similarity_reference(
        args["regions"], args["words"], args["region_lengths"], args["word_lengths"], "both"
    )
    torch.testing.assert_close(got[0], want)


def test_region_word_nan_from_overflow_propagates_like_the_reference():
    """Finite tokens whose dot product overflows to inf - inf give NaN: the max keeps it
    wherever it sits, as torch.max does."""
    regions = torch.tensor([[[1.0, 1.0], [3e38, 3e38], [1.0, 0.0]]])
    for position in range(3):
        words = torch.zeros(1, 3, 2)
        words[0, position] = torch.tensor([3e38, -3e38])  # 1: finite, 2: inf - inf = NaN
        for direction in ("t2i", "i2t"):
            got = fastalign.region_word_similarity(regions, words, direction=direction)
            want = region_word_similarity_reference(regions, words, direction=direction)
            torch.testing.assert_close(got, want, equal_nan=True)


def test_non_contiguous_inputs_give_the_contiguous_answer():
    args = _forward_args()
    strided = args["regions"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    got = torch.ops.fastalign.region_word_forward(**(args | dict(regions=strided)))
    want = torch.ops.fastalign.region_word_forward(**args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_compiled_public_function_checks_lengths():
    """Under torch.compile(fullgraph=True) the Python length check is skipped (it would break
    the graph); the compiled op's own check raises."""
    regions, words, lengths = _region_word()
    similarity = torch.compile(
        fastalign.region_word_similarity, fullgraph=True, backend="aot_eager"
    )
    similarity(regions, words, **lengths)
    bad = lengths | dict(word_lengths=torch.tensor([40, 2]))
    with pytest.raises(ERRORS, match=r"word_lengths\[0\] = 40, expected 1 <= length <= 6"):
        similarity(regions, words, **bad)
