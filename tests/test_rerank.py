"""Score-fusion re-ranking: the order per query against a plain-Python loop over queries,
the identities that pin it down (alpha = 0, a second model equal to the base, k = the whole
gallery, the t2i side as the transposed i2t side), its errors, and ``fastalign eval
--rerank-base``."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import seed_of
from _helpers.cli import one_error_line, run_main

from fastalign.cli import main
from fastalign.evaluation import evaluate
from fastalign.rerank import evaluate_reranked, rerank_scores
from fastalign.training import Trainer

# Odd shapes: prime sizes, a single query, a single gallery item.
SHAPES = [(7, 35), (13, 5), (1, 9), (9, 1), (11, 23)]


# --------------------------------------------------------------------------- reference
def _z(values: list[float]) -> list[float]:
    if max(values) == min(values):
        return [0.0] * len(values)
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / std for v in values]


def reference_order(
    base: torch.Tensor, second: torch.Tensor, k: int, alpha: float, fusion: str, dim: int
) -> list[list[int]]:
    """Per query, its items best first, one query at a time: the base's top k (ties toward
    the lower index) by fused score, then the rest in the base's order (ties toward the lower
    index, in both sorts, as a stable argsort orders them)."""
    queries_base = (base if dim == 1 else base.t()).tolist()
    queries_second = (second if dim == 1 else second.t()).tolist()
    orders = []
    for b, s in zip(queries_base, queries_second):
        by_base = sorted(range(len(b)), key=lambda j: (-b[j], j))
        top, rest = by_base[:k], by_base[k:]
        top_b, top_s = [b[j] for j in top], [s[j] for j in top]
        if fusion == "zscore":
            fused = [zb + alpha * zs for zb, zs in zip(_z(top_b), _z(top_s))]
        else:
            fused = [vb + alpha * vs for vb, vs in zip(top_b, top_s)]
        top = [j for _, j in sorted(zip(fused, top), key=lambda pair: (-pair[0], pair[1]))]
        orders.append(top + rest)
    return orders


def order_of(scores: torch.Tensor, dim: int) -> list[list[int]]:
    """Per query, its items best first; equal scores toward the lower index."""
    order = torch.argsort(scores, dim=dim, descending=True, stable=True)
    return (order if dim == 1 else order.t()).tolist()


def draw(shape: tuple[int, int], seed: int, tied: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (base, second) scores; ``tied``: base takes 4 values only, so that ties fall at
    the k-th place and outside the top k (the second stays continuous: fused scores never
    tie by accident, which float rounding could order either way)."""
    gen = torch.Generator().manual_seed(seed)
    if tied:
        base = torch.randint(0, 4, shape, generator=gen).float()
    else:
        base = torch.randn(shape, generator=gen)
    return base, torch.randn(shape, generator=gen)


# --------------------------------------------------------------------------- the order
@pytest.mark.parametrize("tied", [False, True], ids=["continuous", "tied"])
@pytest.mark.parametrize("fusion", ["zscore", "sum"])
@pytest.mark.parametrize("dim", [1, 0])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_order_matches_the_per_query_reference(test_seed, shape, dim, fusion, tied):
    seed = seed_of(test_seed, shape, dim, fusion, tied)
    base, second = draw(shape, seed, tied)
    size = shape[dim]
    for k in sorted({1, min(3, size), min(15, size), size}):
        for alpha in (0.15, 2.0):
            what = f"seed {seed}, shape {shape}, dim {dim}, {fusion}, k {k}, alpha {alpha}"
            got = rerank_scores(base, second, k, alpha, fusion, dim)
            assert got.shape == base.shape and got.dtype == torch.float64, what
            want = reference_order(base, second, k, alpha, fusion, dim)
            assert order_of(got, dim) == want, what
            # Outside the top k: the base scores themselves, all below the top k.
            got_q = got if dim == 1 else got.t()
            base_q = (base if dim == 1 else base.t()).double()
            for q, items in enumerate(want):
                top, rest = items[:k], items[k:]
                assert torch.equal(got_q[q, rest], base_q[q, rest]), what
                assert rest == [] or got_q[q, top].min() > got_q[q, rest].max(), what


def test_ties_at_the_kth_place_go_to_the_lower_index():
    base = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    second = torch.tensor([[9.0, 0.0, 1.0, 9.0, 9.0]])
    # The top 2 are items 1 and 2 (of the three 2s, the lowest indices); the second model
    # puts 2 above 1; item 3, tied with them in the base, stays first of the rest.
    for fusion in ("zscore", "sum"):
        assert order_of(rerank_scores(base, second, 2, 1.0, fusion), 1) == [[2, 1, 3, 0, 4]]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_t2i_is_i2t_of_the_transposed_matrices(test_seed, shape):
    seed = seed_of(test_seed, shape)
    base, second = draw(shape, seed, tied=True)
    k = min(4, shape[0])
    t2i = rerank_scores(base, second, k, 0.5, dim=0)
    assert torch.equal(t2i, rerank_scores(base.t(), second.t(), k, 0.5, dim=1).t()), seed
    assert t2i.is_contiguous()


@pytest.mark.parametrize("dim", [1, 0])
def test_k_the_whole_gallery_orders_everything_by_the_fused_score(test_seed, dim):
    seed = seed_of(test_seed, dim)
    base, second = draw((9, 45), seed, tied=False)
    size = base.shape[dim]
    got = order_of(rerank_scores(base, second, size, 0.7, "sum", dim), dim)
    assert got == order_of(base.double() + 0.7 * second.double(), dim), seed
    got = order_of(rerank_scores(base, second, size, 0.7, "zscore", dim), dim)
    z = [
        (x - x.mean(dim, keepdim=True)) / x.std(dim, correction=0, keepdim=True)
        for x in (base.double(), second.double())
    ]
    assert got == order_of(z[0] + 0.7 * z[1], dim), seed


@pytest.mark.parametrize("fusion", ["zscore", "sum"])
@pytest.mark.parametrize("dim", [1, 0])
def test_alpha_zero_keeps_the_base_order_exactly(test_seed, dim, fusion):
    # Tied base scores included: the top k takes the lowest indices of a tie, which is where
    # a stable order of the base puts them.
    for tied in (False, True):
        seed = seed_of(test_seed, dim, fusion, tied)
        base, second = draw((11, 55), seed, tied)
        for k in (1, 5, base.shape[dim]):
            got = rerank_scores(base, second, k, 0.0, fusion, dim)
            assert order_of(got, dim) == order_of(base, dim), (seed, k)


@pytest.mark.parametrize("dim", [1, 0])
def test_a_second_model_equal_to_the_base_keeps_its_order_under_zscore(test_seed, dim):
    for tied in (False, True):
        seed = seed_of(test_seed, dim, tied)
        base, _ = draw((11, 55), seed, tied)
        for k in (1, 5, base.shape[dim]):
            got = rerank_scores(base, base.clone(), k, 0.15, "zscore", dim)
            assert order_of(got, dim) == order_of(base, dim), (seed, k)


def test_constant_top_k_scores_standardise_to_zero():
    # Every base score equal: z(base) = 0, so the second model alone orders the top k.
    base = torch.zeros(3, 15)
    second = torch.randn(3, 15, generator=torch.Generator().manual_seed(1))
    got = rerank_scores(base, second, 15, 0.15)
    assert torch.isfinite(got).all()
    assert order_of(got, 1) == order_of(second, 1)


# --------------------------------------------------------------------------- recalls
@pytest.mark.parametrize("fusion", ["zscore", "sum"])
def test_evaluate_reranked_with_alpha_zero_is_evaluate_of_the_base(test_seed, fusion):
    # Continuous scores: a tie across the k-th place would be split by the re-ranking.
    seed = seed_of(test_seed, fusion)
    base, second = draw((8, 40), seed, tied=False)
    for k in (1, 4, 8):
        assert evaluate_reranked(base, second, k, 0.0, fusion) == evaluate(base), (seed, k)


def test_evaluate_reranked_takes_each_direction_from_its_own_re_ranking(test_seed):
    seed = seed_of(test_seed)
    base, second = draw((6, 18), seed, tied=False)
    got = evaluate_reranked(base, second, 4, 0.5, "sum", captions_per_image=3)
    i2t = evaluate(rerank_scores(base, second, 4, 0.5, "sum", dim=1), 3)
    t2i = evaluate(rerank_scores(base, second, 4, 0.5, "sum", dim=0), 3)
    assert list(got) == list(i2t)
    for key in got:
        if key.endswith("i2t"):
            assert got[key] == i2t[key], (seed, key)
        elif key.endswith("t2i"):
            assert got[key] == t2i[key], (seed, key)
    recalls = [got[f"r{r}_{d}"] for d in ("i2t", "t2i") for r in (1, 5, 10)]
    assert got["rsum"] == sum(recalls)


# --------------------------------------------------------------------------- errors
_BASE = torch.randn(3, 15)


@pytest.mark.parametrize(
    "change, error, name",
    [
        ({"base": _BASE.tolist()}, TypeError, "base"),
        ({"base": _BASE.long()}, TypeError, "base"),
        ({"second": _BASE[None]}, ValueError, "second"),
        ({"second": _BASE[:, :14]}, ValueError, "second"),
        (
            {
                "base": _BASE.clone().index_put_(
                    (torch.tensor(1), torch.tensor(2)), torch.tensor(math.nan)
                )
            },
            ValueError,
            "base",
        ),
        ({"second": torch.full((3, 15), math.inf)}, ValueError, "second"),
        ({"k": 0}, ValueError, "k"),
        ({"k": 16}, ValueError, "k"),
        ({"k": 4, "dim": 0}, ValueError, "k"),  # 3 images: a caption query ranks 3
        ({"k": 2.0}, TypeError, "k"),
        ({"k": True}, TypeError, "k"),
        ({"alpha": -0.1}, ValueError, "alpha"),
        ({"alpha": math.nan}, ValueError, "alpha"),
        ({"alpha": math.inf}, ValueError, "alpha"),
        ({"alpha": "0.1"}, TypeError, "alpha"),
        ({"fusion": "product"}, ValueError, "fusion"),
        ({"dim": 2}, ValueError, "dim"),
        ({"dim": -1}, ValueError, "dim"),
    ],
)
def test_bad_arguments_name_themselves(change, error, name):
    arguments = {
        "base": _BASE,
        "second": _BASE,
        "k": 5,
        "alpha": 0.15,
        "fusion": "zscore",
        "dim": 1,
    } | change
    with pytest.raises(error, match=f"^{name} "):
        rerank_scores(**arguments)


# --------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def two_runs(tiny_data, tiny_config, tmp_path_factory):
    """Checkpoints of two one-epoch runs on the tiny data: CHAN's similarity (a.pt) and
    VSE++, the base whose top k it re-ranks (b.pt)."""
    out = tmp_path_factory.mktemp("rerank")
    for name, overrides in (("a", []), ("b", ["method=vsepp"])):
        Trainer(tiny_config(tiny_data, out / name, *overrides, epochs=1), progress=False).fit()
    return out / "a" / "best.pt", out / "b" / "best.pt"


def _tables(text: str) -> list[str]:
    """The recall tables of an output, each from its header line to its rSum line."""
    tables, current = [], None
    for line in text.splitlines():
        if line.split() == ["R@1", "R@5", "R@10", "medr", "meanr"]:
            current = [line]
        elif current is not None:
            current.append(line)
            if line.startswith("rSum"):
                tables.append("\n".join(current))
                current = None
    return tables


def test_eval_rerank_prints_base_checkpoint_and_reranked_tables(capsys, two_runs):
    a, b = map(str, two_runs)
    main(["eval", a, "--rerank-base", b, "--rerank-k", "5", "--no-progress"])
    out = capsys.readouterr().out
    tables = _tables(out)
    assert len(tables) == 3, out
    assert f"base {b}:" in out and f"{a}:" in out and "re-ranked: the top 5" in out, out
    # The first two are the plain evaluations of the base and of the checkpoint.
    for path, table in ((b, tables[0]), (a, tables[1])):
        main(["eval", path, "--no-progress"])
        assert _tables(capsys.readouterr().out) == [table]
    # alpha = 0: the re-ranked table is the base's (model scores do not tie).
    main(["eval", a, "--rerank-base", b, "--rerank-k", "12", "--rerank-alpha", "0"])
    tables = _tables(capsys.readouterr().out)
    assert tables[2] == tables[0]


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--rerank-k", "5"], ["--rerank-k", "--rerank-base"]),
        (
            ["--rerank-alpha", "0.1", "--rerank-fusion", "sum"],
            ["--rerank-alpha", "--rerank-fusion", "--rerank-base"],
        ),
        (["--rerank-base", "B", "--protocol", "coco5k"], ["--rerank-base", "f30k", "coco5k"]),
        (["--rerank-base", "B", "--rerank-alpha", "-1"], ["--rerank-alpha", ">= 0"]),
        (["--rerank-base", "B", "--rerank-k", "13"], ["--rerank-k", "<= 12"]),  # 12 images
    ],
)
def test_eval_rerank_errors(capsys, two_runs, argv, names):
    a, b = map(str, two_runs)
    argv = [b if arg == "B" else arg for arg in argv]
    code, lines = run_main(capsys, "eval", a, *argv)
    assert code == 2
    one_error_line(lines, "eval", *names)
