"""Evaluation: ranks and recalls against a brute-force loop, folds, the streamed matrix."""

import math
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastalign
import fastalign.evaluation as evaluation
import fastalign.progress
from fastalign._backends import extension_loaded
from fastalign.config import TrainConfig
from fastalign.data import PrecompDataset, Vocabulary, read_captions
from fastalign.evaluation import (
    RESULT_KEYS,
    compute_ranks,
    evaluate,
    evaluate_folds,
    format_results,
    similarity_matrix,
)
from fastalign.methods import get_method
from fastalign.model_evaluation import encode_dataset, evaluate_trained
from fastalign.models import MatchingModel, ModelConfig
from fastalign.tokens import Tokens

needs_cpu_kernel = pytest.mark.skipif(not extension_loaded(), reason="fastalign._C not built")


# --------------------------------------------------------------------------- brute force
def brute_force_ranks(sims: torch.Tensor, per_image: int) -> tuple[list[int], list[int]]:
    """The protocol written out row by row, ties counting against the positive."""
    rows = sims.tolist()
    n_images, n_captions = len(rows), len(rows[0])
    i2t = []
    for i in range(n_images):
        positives = range(i * per_image, (i + 1) * per_image)
        best = max(rows[i][j] for j in positives)
        outranking = [j for j in range(n_captions) if j not in positives and rows[i][j] >= best]
        i2t.append(1 + len(outranking))
    t2i = []
    for j in range(n_captions):
        owner = j // per_image
        outranking = [k for k in range(n_images) if k != owner and rows[k][j] >= rows[owner][j]]
        t2i.append(1 + len(outranking))
    return i2t, t2i


def brute_force_metrics(sims: torch.Tensor, per_image: int) -> dict[str, float]:
    results = {}
    for name, ranks in zip(("i2t", "t2i"), brute_force_ranks(sims, per_image)):
        for k in (1, 5, 10):
            results[f"r{k}_{name}"] = 100.0 * sum(r <= k for r in ranks) / len(ranks)
        results[f"medr_{name}"] = float(math.floor(statistics.median(ranks)))
        results[f"meanr_{name}"] = sum(ranks) / len(ranks)
    results["rsum"] = sum(results[f"r{k}_{d}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return results


def assert_same_results(got: dict, expected: dict) -> None:
    assert list(got) == list(RESULT_KEYS)
    for key in RESULT_KEYS:
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key


def tied_scores(n_images: int, per_image: int, seed: int) -> torch.Tensor:
    """Scores from a few levels only, plus a boost on the positives: many planted ties."""
    g = torch.Generator().manual_seed(seed)
    sims = torch.randint(0, 6, (n_images, n_images * per_image), generator=g).float()
    owner = torch.arange(n_images * per_image) // per_image
    sims[owner, torch.arange(n_images * per_image)] += torch.randint(
        0, 3, (n_images * per_image,), generator=g
    ).float()
    return sims


# --------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize("per_image", [1, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_matches_brute_force_with_ties(per_image, seed):
    sims = tied_scores(23, per_image, seed)
    assert_same_results(evaluate(sims, per_image), brute_force_metrics(sims, per_image))


@pytest.mark.parametrize("per_image", [1, 5])
def test_evaluate_matches_brute_force_continuous(per_image):
    g = torch.Generator().manual_seed(per_image)
    sims = torch.randn(30, 30 * per_image, generator=g)
    sims[torch.arange(30), torch.arange(30) * per_image] += 1.5  # some correct retrievals
    expected = brute_force_metrics(sims, per_image)
    assert_same_results(evaluate(sims, per_image), expected)
    assert 0 < expected["r1_i2t"] < 100  # a case that is neither trivial nor hopeless


def test_ranks_match_brute_force_and_do_not_depend_on_block_rows():
    sims = tied_scores(17, 5, seed=3)
    expected_i2t, expected_t2i = brute_force_ranks(sims, 5)
    for block_rows in (1, 2, 7, 17, 100, None):
        ranks_i2t, ranks_t2i = compute_ranks(sims, 5, block_rows=block_rows)
        assert ranks_i2t.dtype == ranks_t2i.dtype == torch.int64
        assert ranks_i2t.tolist() == expected_i2t
        assert ranks_t2i.tolist() == expected_t2i
        assert evaluate(sims, 5, block_rows=block_rows) == evaluate(sims, 5)


@pytest.mark.parametrize("per_image", [1, 5])
def test_perfect_matrix(per_image):
    n_images = 12
    owner = torch.arange(n_images * per_image) // per_image
    sims = (torch.arange(n_images)[:, None] == owner).float()
    results = evaluate(sims, per_image)
    for key in RESULT_KEYS:
        if key.startswith("r") and key != "rsum":
            assert results[key] == 100.0, key
        elif key != "rsum":
            assert results[key] == 1.0, key
    assert results["rsum"] == 600.0


def test_constant_matrix_ties_count_against_the_positive():
    results = evaluate(torch.zeros(3, 6), captions_per_image=2)
    # i2t: the 4 negatives tie with the best positive -> rank 5; t2i: 2 images tie -> 3.
    assert results["medr_i2t"] == results["meanr_i2t"] == 5.0
    assert results["medr_t2i"] == results["meanr_t2i"] == 3.0
    assert results["r1_i2t"] == results["r1_t2i"] == 0.0
    assert results["r5_i2t"] == results["r5_t2i"] == 100.0


def test_known_cases():
    # Image 0 ranks its caption first; image 1 ranks caption 0 above its own.
    results = evaluate(torch.tensor([[0.9, 0.5], [0.8, 0.1]]), captions_per_image=1)
    assert results["r1_i2t"] == 50.0 and results["r5_i2t"] == 100.0
    assert results["medr_i2t"] == 1.0  # floor of the median 1.5, as SCAN reports it
    assert results["meanr_i2t"] == 1.5
    # caption 0: 0.9 beats 0.8 (rank 1); caption 1: 0.1 loses to 0.5 (rank 2).
    assert results["r1_t2i"] == 50.0 and results["meanr_t2i"] == 1.5

    # A negative tied with the positive ranks above it.
    ranks_i2t, ranks_t2i = compute_ranks(torch.tensor([[0.5, 0.5], [0.2, 0.7]]), 1)
    assert ranks_i2t.tolist() == [2, 1] and ranks_t2i.tolist() == [1, 1]

    # Positives tied with each other do not push their image down; a tied image does
    # push the caption down (caption 3: image 0 scores 0.5 like its own image 1).
    sims = torch.tensor([[0.7, 0.7, 0.3, 0.5], [0.1, 0.2, 0.6, 0.5]])
    ranks_i2t, ranks_t2i = compute_ranks(sims, 2)
    assert ranks_i2t.tolist() == [1, 1] and ranks_t2i.tolist() == [1, 1, 1, 2]


def test_numpy_and_half_inputs_give_the_same_results():
    sims = tied_scores(10, 5, seed=4)
    expected = evaluate(sims)
    assert evaluate(sims.numpy()) == expected
    assert evaluate(sims.half()) == expected  # small integers are exact in float16


def test_evaluate_errors():
    with pytest.raises(ValueError, match="sims must be 2-D"):
        evaluate(torch.zeros(10))
    with pytest.raises(ValueError, match=r"sims has shape \(4, 19\).*20 captions"):
        evaluate(torch.zeros(4, 19))
    with pytest.raises(ValueError, match="sims has shape"):
        evaluate(torch.zeros(4, 4), captions_per_image=5)
    with pytest.raises(TypeError, match="sims must hold floating-point"):
        evaluate(torch.zeros(2, 10, dtype=torch.int64))
    with pytest.raises(TypeError, match="sims must be a torch.Tensor"):
        evaluate([[1.0] * 5])
    with pytest.raises(ValueError, match="captions_per_image must be >= 1"):
        evaluate(torch.zeros(2, 10), captions_per_image=0)
    with pytest.raises(TypeError, match="captions_per_image must be an int"):
        evaluate(torch.zeros(2, 10), captions_per_image=5.0)
    with pytest.raises(ValueError, match="block_rows must be >= 1"):
        evaluate(torch.zeros(2, 10), block_rows=0)
    sims = torch.zeros(6, 30)
    sims[3, 7] = sims[5, 0] = float("nan")
    for block_rows in (1, 4, None):
        with pytest.raises(ValueError, match=r"2 NaN value\(s\), the first at \[3, 7\]"):
            evaluate(sims, block_rows=block_rows)


# --------------------------------------------------------------------------- folds
def test_folds_average_manual_slices():
    g = torch.Generator().manual_seed(5)
    sims = torch.randn(10, 50, generator=g)
    sims[torch.arange(10), torch.arange(10) * 5 + 2] += 2.0
    mean, per_fold = evaluate_folds(sims, n_folds=5, captions_per_image=5)
    manual = [evaluate(sims[2 * k : 2 * k + 2, 10 * k : 10 * k + 10]) for k in range(5)]
    assert per_fold == manual
    for key in RESULT_KEYS:
        assert mean[key] == pytest.approx(sum(fold[key] for fold in manual) / 5), key
    assert mean["rsum"] == pytest.approx(
        sum(mean[f"r{k}_{d}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    )
    one_fold, [only] = evaluate_folds(sims, n_folds=1)
    assert one_fold == only == evaluate(sims)  # COCO 5K: the whole matrix


def test_folds_errors():
    with pytest.raises(ValueError, match="n_folds = 3 must divide"):
        evaluate_folds(torch.zeros(10, 50), n_folds=3)
    with pytest.raises(ValueError, match="n_folds must be >= 1"):
        evaluate_folds(torch.zeros(10, 50), n_folds=0)


def test_format_results():
    text = format_results(evaluate(tied_scores(12, 5, seed=6)))
    lines = text.splitlines()
    assert lines[0].split() == ["R@1", "R@5", "R@10", "medr", "meanr"]
    assert lines[1].startswith("i2t") and lines[2].startswith("t2i")
    assert lines[3].startswith("rSum")
    assert len({len(line) for line in lines[:3]}) == 1  # aligned columns
    with pytest.raises(ValueError, match="results is missing the keys"):
        format_results({"r1_i2t": 1.0})
    with pytest.raises(TypeError, match="results must be a mapping"):
        format_results([1.0])


# --------------------------------------------------------------------------- similarity
def make_features(n_images=13, n_captions=29, n_regions=6, n_words=9, dim=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    regions = F.normalize(torch.randn(n_images, n_regions, dim, generator=g), dim=-1)
    words = F.normalize(torch.randn(n_captions, n_words, dim, generator=g), dim=-1)
    region_lengths = torch.randint(1, n_regions + 1, (n_images,), generator=g)
    word_lengths = torch.randint(1, n_words + 1, (n_captions,), generator=g)
    region_lengths[0] = n_regions
    word_lengths[-1] = n_words
    return regions, region_lengths, words, word_lengths


class RecordDtypes(TorchDispatchMode):
    """Records the dtype of every tensor any torch operation creates."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.dtypes.add(t.dtype)
        return out


@needs_cpu_kernel
@pytest.mark.parametrize(
    "blocks",
    [
        dict(block_images=1, block_captions=1),
        dict(block_images=3, block_captions=7),
        dict(block_images=5),
        dict(block_captions=4),
        dict(block_images=13, block_captions=29),
        dict(memory_budget_mb=0.002),  # a budget of a few blocks' scores
        dict(),
    ],
)
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(direction="both", aggregate="lse", score_activation="leaky_relu"),
        dict(direction="i2t", align="lse", aggregate="max"),
    ],
)
def test_similarity_matrix_is_shard_invariant(blocks, options):
    regions, region_lengths, words, word_lengths = make_features()
    full = fastalign.region_word_similarity(regions, words, region_lengths, word_lengths, **options)
    got = similarity_matrix(
        Tokens(regions, region_lengths), Tokens(words, word_lengths), **blocks, **options
    )
    assert got.dtype == torch.float32 and got.shape == (13, 29)
    if not blocks:  # the default plan: one call, the very same numbers
        assert torch.equal(got, full)
    # Blocks can change the BLAS's path for a matrix product, hence its last bit.
    torch.testing.assert_close(got, full, rtol=0, atol=1e-6)


@needs_cpu_kernel
def test_similarity_matrix_recalls_do_not_depend_on_blocks():
    regions, region_lengths, words, _ = make_features(n_images=8, n_captions=40)
    words[:, :3] = regions[torch.arange(40) // 5, :3]  # captions that match their image
    word_lengths = torch.randint(3, 10, (40,), generator=torch.Generator().manual_seed(1))
    expected = evaluate(
        fastalign.region_word_similarity(regions, words, region_lengths, word_lengths)
    )
    assert 0 < expected["r1_t2i"] < 100
    for block_images, block_captions in ((1, 1), (3, 7), (8, 40)):
        sims = similarity_matrix(
            Tokens(regions, region_lengths),
            Tokens(words, word_lengths),
            block_images=block_images,
            block_captions=block_captions,
        )
        assert evaluate(sims) == expected


@needs_cpu_kernel
def test_float16_memmap_stays_float16_and_float32(tmp_path, monkeypatch):
    regions, region_lengths, words, word_lengths = make_features()
    paths = {}
    for name, x in (("regions", regions), ("words", words)):
        paths[name] = tmp_path / f"{name}.npy"
        stored = np.lib.format.open_memmap(
            paths[name], mode="w+", dtype=np.float16, shape=tuple(x.shape)
        )
        stored[:] = x.numpy()
        stored.flush()
        del stored
    region_memmap = np.load(paths["regions"], mmap_mode="r")
    word_memmap = np.load(paths["words"], mmap_mode="r")

    seen = []  # (dtype, padded words) of every block the fused operator receives
    original = evaluation.region_word_similarity

    def recording(block_regions, block_words, *args, **kwargs):
        seen.append((block_regions.dtype, block_words.dtype, block_words.shape[1], args[1]))
        return original(block_regions, block_words, *args, **kwargs)

    monkeypatch.setattr(evaluation, "region_word_similarity", recording)
    with RecordDtypes() as mode:
        got = similarity_matrix(
            Tokens(region_memmap, region_lengths.numpy()),
            Tokens(word_memmap, word_lengths.tolist()),
            block_images=4,
            block_captions=6,
        )
    assert torch.float64 not in mode.dtypes
    assert got.dtype == torch.float32
    assert region_memmap.dtype == word_memmap.dtype == np.float16  # read, never converted
    assert len(seen) == 4 * 5
    for regions_dtype, words_dtype, padded, block_lengths in seen:
        assert regions_dtype == words_dtype == torch.float32
        assert padded == int(block_lengths.max())  # blocks cropped to their longest caption
    expected = fastalign.region_word_similarity(
        torch.from_numpy(np.array(region_memmap)).float(),
        torch.from_numpy(np.array(word_memmap)).float(),
        region_lengths,
        word_lengths,
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@needs_cpu_kernel
def test_no_float64_in_the_whole_evaluation(monkeypatch):
    regions, region_lengths, words, word_lengths = make_features(n_images=6, n_captions=30)
    half = (Tokens(regions.half(), region_lengths), Tokens(words.half(), word_lengths))
    with RecordDtypes() as mode:
        results = evaluate(similarity_matrix(*half, block_images=2, block_captions=4))
        evaluate_folds(similarity_matrix(*half), n_folds=3)
    assert torch.float64 not in mode.dtypes
    assert set(results) == set(RESULT_KEYS)

    # float64 features are down-cast block by block: the operator sees float32 only.
    seen = []
    original = evaluation.region_word_similarity

    def recording(block_regions, block_words, *args, **kwargs):
        seen.append((block_regions.dtype, block_words.dtype))
        return original(block_regions, block_words, *args, **kwargs)

    monkeypatch.setattr(evaluation, "region_word_similarity", recording)
    got = similarity_matrix(
        Tokens(regions.double(), region_lengths),
        Tokens(words.double(), word_lengths),
        block_captions=7,
    )
    assert got.dtype == torch.float32
    assert set(seen) == {(torch.float32, torch.float32)} and len(seen) == 5
    expected = original(regions, words, region_lengths, word_lengths)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@needs_cpu_kernel
def test_similarity_matrix_progress(capsys, monkeypatch):
    regions, region_lengths, words, word_lengths = make_features()
    images, captions = Tokens(regions, region_lengths), Tokens(words, word_lengths)
    similarity_matrix(images, captions, block_captions=10, progress=True)
    assert capsys.readouterr().err == ""  # stderr is no terminal here: no bar
    monkeypatch.setattr(fastalign.progress, "_interactive", lambda: True)
    similarity_matrix(images, captions, block_captions=10, progress=False)
    assert capsys.readouterr().err == ""
    similarity_matrix(images, captions, block_captions=10, progress=True)
    err = capsys.readouterr().err
    assert "similarity_matrix" in err and "0/3" in err  # 29 captions in blocks of 10


def test_encoding_and_scoring_show_progress(tiny_data, capsys, monkeypatch):
    vocab = Vocabulary.build(read_captions(tiny_data, "train"))
    dataset = PrecompDataset(tiny_data, "test", vocab)
    config = TrainConfig(
        model=ModelConfig(feature_dim=dataset.feature_dim, embed_dim=8, word_dim=8)
    )
    model = MatchingModel(len(vocab), config.model)
    method = get_method("baseline")(config)
    monkeypatch.setattr(fastalign.progress, "_interactive", lambda: True)
    monkeypatch.setattr(evaluation, "_BLOCK_PAIRS", 12 * 20)  # 12 x 60 scores: 4 blocks
    quiet = evaluate_trained(method, model, dataset)
    assert capsys.readouterr().err == ""
    assert evaluate_trained(method, model, dataset, progress=True) == quiet
    err = capsys.readouterr().err
    for bar in ("encoding images", "encoding captions", "streaming_ranks"):
        assert bar in err, err
    assert "0/4" in err  # 12 x 60 scores in aligned blocks of 6 images x 30 captions
    encode_dataset(model, dataset, batch_size=20, progress=True)  # 60 captions: 3 batches
    assert "0/3" in capsys.readouterr().err


def test_similarity_matrix_errors():
    regions, region_lengths, words, word_lengths = make_features()
    images, captions = Tokens(regions, region_lengths), Tokens(words, word_lengths)
    bad_lengths = word_lengths.clone()
    bad_lengths[3] = 0
    with pytest.raises(ValueError, match=r"captions\.lengths\[3\] = 0, expected 1 <= length <= 9"):
        similarity_matrix(images, Tokens(words, bad_lengths))
    with pytest.raises(TypeError, match=r"images\.lengths must hold integers"):
        similarity_matrix(Tokens(regions, region_lengths.float()), captions)
    with pytest.raises(ValueError, match=r"captions\.lengths must have shape \(29,\)"):
        similarity_matrix(images, Tokens(words, word_lengths[:5]))
    with pytest.raises(ValueError, match="share the feature size D"):
        similarity_matrix(images, Tokens(words[..., :5], word_lengths))
    with pytest.raises(ValueError, match=r"captions\.embs must be 3-D"):
        similarity_matrix(images, Tokens(words[0], None))
    with pytest.raises(TypeError, match=r"images\.embs must be a torch\.Tensor or numpy"):
        similarity_matrix(Tokens(regions.tolist(), region_lengths), captions)
    with pytest.raises(TypeError, match=r"captions\.embs must hold float16"):
        similarity_matrix(images, Tokens(words.numpy().astype(np.int32), word_lengths))
    with pytest.raises(TypeError, match="images must be a Tokens"):
        similarity_matrix(regions.tolist(), captions)
    with pytest.raises(ValueError, match="block_images must be >= 1"):
        similarity_matrix(images, captions, block_images=0)
    with pytest.raises(TypeError, match="block_captions must be an int"):
        similarity_matrix(images, captions, block_captions=2.5)
    with pytest.raises(ValueError, match="memory_budget_mb must be positive"):
        similarity_matrix(images, captions, memory_budget_mb=0)
    with pytest.raises(TypeError, match="must not contain 'regions'"):
        similarity_matrix(images, Tokens(words, None), regions=regions)


def pooled_cosine(images: Tokens, captions: Tokens) -> torch.Tensor:
    """A custom SimilarityFn: the cosine of the mean-pooled valid tokens."""
    image = F.normalize(images.mean_pooled(), dim=-1)
    text = F.normalize(captions.mean_pooled(), dim=-1)
    return image @ text.T


def test_similarity_matrix_with_a_custom_similarity(monkeypatch):
    regions, region_lengths, words, word_lengths = make_features()
    images, captions = Tokens(regions, region_lengths), Tokens(words, word_lengths)
    full = pooled_cosine(images, captions)
    assert full.shape == (13, 29)

    def fused_operator(*args, **kwargs):
        raise AssertionError("similarity= given: the fused operator must not be called")

    monkeypatch.setattr(evaluation, "region_word_similarity", fused_operator)
    calls = []

    def recording(block_images: Tokens, block_captions: Tokens) -> torch.Tensor:
        assert isinstance(block_images, Tokens) and isinstance(block_captions, Tokens)
        calls.append((block_images.count, block_captions.count))
        return pooled_cosine(block_images, block_captions)

    for block_images, block_captions in ((1, 1), (3, 7), (5, None), (None, 4), (13, 29)):
        calls.clear()
        got = similarity_matrix(
            images,
            captions,
            similarity=recording,
            block_images=block_images,
            block_captions=block_captions,
        )
        assert got.dtype == torch.float32 and got.shape == (13, 29)
        torch.testing.assert_close(got, full, rtol=0, atol=1e-6)
        if block_images is not None and block_captions is not None:
            n_blocks = math.ceil(13 / block_images) * math.ceil(29 / block_captions)
            assert len(calls) == n_blocks
            assert sum(ni * nt for ni, nt in calls) == 13 * 29
    # Converted inputs (float64 numpy, cropped to each block's longest item) and bare
    # embeddings (every token valid) go through the same function.
    got = similarity_matrix(
        Tokens(regions.double().numpy(), region_lengths.numpy()),
        Tokens(words.double(), word_lengths.tolist()),
        similarity=pooled_cosine,
        block_images=4,
        block_captions=6,
    )
    torch.testing.assert_close(got, full, rtol=0, atol=1e-6)
    dense = pooled_cosine(Tokens.dense(regions), Tokens.dense(words))
    got = similarity_matrix(regions, words, similarity=pooled_cosine, block_captions=5)
    torch.testing.assert_close(got, dense, rtol=0, atol=1e-6)
    assert not torch.allclose(dense, full, atol=1e-3)  # the lengths did matter above
    # Options of the default score do not combine with a given similarity.
    with pytest.raises(TypeError, match="apply to the default score only"):
        similarity_matrix(images, captions, similarity=pooled_cosine, direction="both")
    with pytest.raises(TypeError, match="align, backend"):
        similarity_matrix(images, captions, similarity=pooled_cosine, backend="cpu", align="lse")


def test_block_plan_respects_the_budget():
    # In-place float32 inputs cost nothing: all images, captions bounded by the pairs per
    # block (a progress bar of tens of steps on the f30k test matrix), else by the scores.
    assert evaluation._plan_blocks(1000, 5000, None, None, 0, 0, 4, 256 * 2**20) == (1000, 262)
    assert evaluation._plan_blocks(5000, 25000, None, None, 0, 0, 4, 256 * 2**20) == (5000, 52)
    plan = evaluation._plan_blocks(1000, 5000, None, None, 0, 0, 4, 256 * 2**20, 10**9)
    assert plan == (1000, 5000)
    assert evaluation._plan_blocks(5000, 25000, None, None, 0, 0, 4, 256 * 2**20, 10**9) == (
        5000,
        13421,
    )
    assert evaluation._plan_blocks(1000, 5000, None, 400, 0, 0, 4, 256 * 2**20) == (655, 400)
    image, caption, pair = 36 * 1024 * 4, 40 * 1024 * 4, 4
    budget = 64 * 2**20
    for given in ((None, None), (100, None), (None, 300)):
        images, captions = evaluation._plan_blocks(1000, 5000, *given, image, caption, pair, budget)
        assert images * image + captions * caption + images * captions * pair <= budget
        assert images >= 1 and captions >= 1
