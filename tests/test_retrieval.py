"""Streaming evaluation and top-k search against the full score matrix.

Ties are the point of most cases: integer-valued embeddings make every score an exact
small integer (whatever blocks the products run in), so many negatives tie with their
positive and many gallery items tie at the k-th place. Failure messages carry the seed:
``FASTALIGN_TEST_SEED`` re-draws every input.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fastalign
import fastalign.progress
from fastalign.config import TrainConfig
from fastalign.data import PrecompDataset, Vocabulary, read_captions
from fastalign.evaluation import (
    BlockScorer,
    compute_ranks,
    evaluate,
    evaluate_folds,
    similarity_matrix,
)
from fastalign.methods import get_method
from fastalign.model_evaluation import encode_dataset, evaluate_trained
from fastalign.models import MatchingModel, ModelConfig
from fastalign.retrieval import (
    evaluate_streaming,
    evaluate_streaming_folds,
    streaming_ranks,
    streaming_topk,
)
from fastalign.tokens import Tokens

# Exact integer scores: t2i, max over regions, summed over words, on integer embeddings.
INTEGER_SCORE = dict(direction="t2i", align="max", aggregate="sum")
# The float score of the benchmarks (CHAN-style: max over regions, log-sum-exp over words).
FLOAT_SCORE = dict(direction="t2i", align="max", aggregate="lse")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: the blocks here are tiny, and on a loaded machine the OpenMP
    barriers of two threads made each tiny call up to 100x slower (the file took a minute)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tokens(n_images, per_image, seed, integer, n_regions=7, n_words=9, dim=6):
    """Images (n_images, 7, D) and captions (n_images * per_image, 9, D) with random valid
    lengths (the rest is padding, filled with garbage no score may read); embeddings in
    {-1, 0, 1} when ``integer``, else unit-norm Gaussian."""
    g = torch.Generator().manual_seed(seed)
    n_captions = n_images * per_image

    def draw(n, tokens):
        if integer:
            return torch.randint(-1, 2, (n, tokens, dim), generator=g).float()
        return F.normalize(torch.randn(n, tokens, dim, generator=g), dim=-1)

    regions, words = draw(n_images, n_regions), draw(n_captions, n_words)
    region_lengths = torch.randint(1, n_regions + 1, (n_images,), generator=g)
    word_lengths = torch.randint(1, n_words + 1, (n_captions,), generator=g)
    region_lengths[0], word_lengths[-1] = n_regions, n_words
    regions[torch.arange(n_regions) >= region_lengths[:, None]] = 1e4  # padding
    words[torch.arange(n_words) >= word_lengths[:, None]] = -1e4
    return Tokens(regions, region_lengths), Tokens(words, word_lengths)


def full_matrix(images, captions, options):
    return fastalign.region_word_similarity(
        images.embs, captions.embs, images.lengths, captions.lengths, **options
    )


def case_seed(test_seed, *parts) -> int:
    return test_seed * 1000 + sum(31**k * p for k, p in enumerate(parts))


def has_ties(sims: torch.Tensor, per_image: int) -> bool:
    """Some caption's positive is tied by another image's score (so the tie rule matters)."""
    captions = torch.arange(sims.shape[1])
    positives = sims[captions // per_image, captions]
    return bool(((sims == positives).sum(0) > 1).any())


# Block sizes: the default (aligned), one image, aligned sizes that straddle folds, sizes
# given one side only, unaligned sizes (positives of an image spread over caption blocks,
# captions of a block over image blocks) and blocks larger than the data.
BLOCKS = [
    dict(),
    dict(block_images=1),
    dict(block_images=1, block_captions=1),
    dict(block_images=4),
    dict(block_captions=10),
    dict(block_images=3, block_captions=7),
    dict(block_images=5, block_captions=4),
    dict(block_images=2, block_captions=25),
    dict(block_images=100, block_captions=1000),
]


# --------------------------------------------------------------------------- ranks
@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("n_images, per_image", [(13, 5), (11, 1), (6, 3)])
def test_streaming_ranks_equal_the_full_matrix_with_ties(test_seed, n_images, per_image, blocks):
    seed = case_seed(test_seed, n_images, per_image, len(blocks))
    images, captions = make_tokens(n_images, per_image, seed, integer=True)
    sims = full_matrix(images, captions, INTEGER_SCORE)
    assert torch.equal(sims, sims.round()), f"seed {seed}: scores must be exact integers"
    expected = compute_ranks(sims, per_image)
    got = streaming_ranks(images, captions, None, per_image, **blocks, **INTEGER_SCORE)
    assert got[0].dtype == got[1].dtype == torch.int64
    assert torch.equal(got[0], expected[0]), f"seed {seed}: i2t ranks"
    assert torch.equal(got[1], expected[1]), f"seed {seed}: t2i ranks"
    table = evaluate_streaming(images, captions, None, per_image, **blocks, **INTEGER_SCORE)
    assert table == evaluate(sims, per_image), f"seed {seed}"


def test_the_tie_cases_are_ties(test_seed):
    # The integer inputs above do tie positives with negatives (else the rule is untested).
    seed = case_seed(test_seed, 13, 5, 0)
    images, captions = make_tokens(13, 5, seed, integer=True)
    assert has_ties(full_matrix(images, captions, INTEGER_SCORE), 5), f"seed {seed}"


@pytest.mark.parametrize(
    "blocks", [dict(), dict(block_images=2), dict(block_images=3, block_captions=7)]
)
@pytest.mark.parametrize("options", [FLOAT_SCORE, dict(direction="both", aggregate="mean")])
def test_bit_identical_to_similarity_matrix_with_the_same_blocks(test_seed, options, blocks):
    # Float scores: blocks can change a score's last bit, but the same blocks give the same
    # numbers, so the streamed ranks equal evaluate(similarity_matrix) exactly.
    seed = case_seed(test_seed, 7, len(options), len(blocks))
    images, captions = make_tokens(9, 5, seed, integer=False)
    plan = BlockScorer(images, captions).plan(
        blocks.get("block_images"), blocks.get("block_captions"), captions_per_image=5
    )
    sims = similarity_matrix(
        images, captions, block_images=plan[0], block_captions=plan[1], **options
    )
    expected = compute_ranks(sims)
    got = streaming_ranks(images, captions, **blocks, **options)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), f"seed {seed}"
    assert evaluate_streaming(images, captions, **blocks, **options) == evaluate(sims)
    # The default similarity_matrix plan differs, the recalls of continuous scores do not.
    assert evaluate_streaming(images, captions, **options) == evaluate(
        full_matrix(images, captions, options)
    ), f"seed {seed}"


def test_a_custom_similarity_and_numpy_inputs(test_seed):
    seed = case_seed(test_seed, 3)
    images, captions = make_tokens(8, 5, seed, integer=True)

    def pooled_sum(block_images: Tokens, block_captions: Tokens) -> torch.Tensor:
        """Integer scores from a method-like similarity: summed valid tokens, dot product."""
        image = (block_images.embs * block_images.valid_mask()[..., None]).sum(1)
        text = (block_captions.embs * block_captions.valid_mask()[..., None]).sum(1)
        return image @ text.T

    sims = pooled_sum(images, captions)
    as_numpy = (
        Tokens(images.embs.numpy(), images.lengths.numpy()),
        Tokens(captions.embs.double().numpy(), captions.lengths.tolist()),
    )
    for inputs in ((images, captions), as_numpy):
        for blocks in (dict(), dict(block_images=3, block_captions=4)):
            got = evaluate_streaming(*inputs, pooled_sum, **blocks)
            assert got == evaluate(sims), f"seed {seed}, blocks {blocks}"


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("n_folds", [1, 3, 5])
def test_folds_from_one_pass_equal_evaluate_folds(test_seed, n_folds, blocks):
    seed = case_seed(test_seed, n_folds, len(blocks), 11)
    images, captions = make_tokens(15, 5, seed, integer=True)
    sims = full_matrix(images, captions, INTEGER_SCORE)
    mean, per_fold = evaluate_folds(sims, n_folds=n_folds)
    got = evaluate_streaming_folds(images, captions, n_folds=n_folds, **blocks, **INTEGER_SCORE)
    assert got.whole == evaluate(sims), f"seed {seed}"
    assert got.folds == per_fold, f"seed {seed}"
    assert got.mean == mean, f"seed {seed}"
    whole, fold_mean, folds = got  # a plain tuple too
    assert whole is got.whole and fold_mean is got.mean and folds is got.folds


def test_each_block_is_scored_once_with_aligned_blocks(test_seed):
    images, captions = make_tokens(13, 5, case_seed(test_seed, 5), integer=True)
    calls = []

    def recording(block_images: Tokens, block_captions: Tokens) -> torch.Tensor:
        calls.append((block_images.count, block_captions.count))
        return full_matrix(block_images, block_captions, INTEGER_SCORE)

    for block_images in (1, 4, 13, None):
        calls.clear()
        evaluate_streaming_folds(images, captions, recording, n_folds=1, block_images=block_images)
        plan_images = block_images or BlockScorer(images, captions).plan(None, None, 5)[0]
        assert len(calls) == math.ceil(13 / plan_images) ** 2, block_images
        assert sum(ni * nt for ni, nt in calls) == 13 * 65  # every pair scored once
        assert calls[0] == (plan_images, 5 * plan_images)  # aligned blocks
    # Unaligned blocks: those holding positives needed elsewhere are scored again, no more.
    calls.clear()
    streaming_ranks(images, captions, recording, block_images=3, block_captions=7)
    blocks = math.ceil(13 / 3) * math.ceil(65 / 7)
    assert blocks < len(calls) <= 2 * blocks


def test_aligned_default_plan():
    # 1000 x 5000 (Flickr30K): blocks of at most 262144 scores, 200 images x 1000 captions.
    assert fastalign.evaluation._plan_blocks(
        1000, 5000, None, None, 0, 0, 4, 256 * 2**20, captions_per_image=5
    ) == (200, 1000)
    # COCO 5K: 228 images at most (5 x 228^2 <= 262144), 22 blocks evened out.
    assert fastalign.evaluation._plan_blocks(
        5000, 25000, None, None, 0, 0, 4, 256 * 2**20, captions_per_image=5
    ) == (228, 1140)
    # A small budget bounds the blocks too: converted items and the scores fit it.
    image, caption, pair, budget = 36 * 1024 * 4, 40 * 1024 * 4, 4, 16 * 2**20
    images, captions = fastalign.evaluation._plan_blocks(
        1000, 5000, None, None, image, caption, pair, budget, captions_per_image=5
    )
    assert captions == 5 * images
    assert images * image + captions * caption + images * captions * pair <= budget


# --------------------------------------------------------------------------- top-k
def reference_topk(sims: torch.Tensor, k: int):
    """The k best of each row, equal scores in increasing index order."""
    order = sims.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return sims.gather(1, order), order


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("queries", ["captions", "images"])
def test_topk_equals_a_stable_sort_of_the_full_matrix(test_seed, queries, blocks):
    seed = case_seed(test_seed, len(queries), len(blocks), 17)
    images, captions = make_tokens(13, 5, seed, integer=True)
    sims = full_matrix(images, captions, INTEGER_SCORE)
    rows = sims.T if queries == "captions" else sims
    for k in (1, 4, rows.shape[1]):
        scores, indices = streaming_topk(
            images, captions, k=k, queries=queries, **blocks, **INTEGER_SCORE
        )
        expected_scores, expected_indices = reference_topk(rows, k)
        assert scores.dtype == torch.float32 and indices.dtype == torch.int64
        assert torch.equal(scores, expected_scores), f"seed {seed}, k {k}"
        assert torch.equal(indices, expected_indices), f"seed {seed}, k {k}"
        # The same values as torch.topk; its order among ties is its own.
        assert torch.equal(scores, rows.topk(k, dim=1).values), f"seed {seed}, k {k}"
    # Ties at the k-th place happened: the tie-break was exercised.
    kth = rows.sort(dim=1, descending=True).values[:, 3:5]
    assert bool((kth[:, 0] == kth[:, 1]).any()), f"seed {seed}"


def test_topk_of_float_scores(test_seed):
    seed = case_seed(test_seed, 23)
    images, captions = make_tokens(10, 3, seed, integer=False)
    sims = full_matrix(images, captions, FLOAT_SCORE)
    scores, indices = streaming_topk(images, captions, k=5, **FLOAT_SCORE)
    expected_scores, expected_indices = reference_topk(sims.T, 5)
    assert torch.equal(indices, expected_indices), f"seed {seed}"
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-6)


def test_topk_memory_is_one_block_and_the_running_lists(test_seed, monkeypatch):
    # The merge never sees more than one block plus k entries per query of the block.
    images, captions = make_tokens(13, 5, case_seed(test_seed, 29), integer=True)
    seen = []
    merge = fastalign.retrieval._merge_topk

    def recording(scores, index, block, first, k):
        seen.append((scores.shape[1], block.shape))
        return merge(scores, index, block, first, k)

    monkeypatch.setattr(fastalign.retrieval, "_merge_topk", recording)
    streaming_topk(images, captions, k=3, block_images=4, block_captions=6, **INTEGER_SCORE)
    assert all(running <= 3 and rows <= 6 and width <= 4 for running, (rows, width) in seen)


# --------------------------------------------------------------------------- trained
def test_evaluate_trained_streams_the_numbers_of_the_full_matrix(tiny_data, monkeypatch):
    vocab = Vocabulary.build(read_captions(tiny_data, "train"))
    dataset = PrecompDataset(tiny_data, "test", vocab)
    config = TrainConfig(
        model=ModelConfig(feature_dim=dataset.feature_dim, embed_dim=8, word_dim=8)
    )
    model = MatchingModel(len(vocab), config.model)
    method = get_method("baseline")(config)
    images, captions = encode_dataset(model, dataset)

    def similarity(block_images, block_captions):
        return method.similarity(model, block_images, block_captions)

    monkeypatch.setattr(fastalign.evaluation, "_BLOCK_PAIRS", 12 * 20)  # 4 blocks of 6 x 30
    plan = BlockScorer(images, captions, similarity).plan(None, None, captions_per_image=5)
    assert plan == (6, 30)
    sims = similarity_matrix(
        images, captions, similarity=similarity, block_images=6, block_captions=30
    )
    assert evaluate_trained(method, model, dataset) == evaluate(sims)
    # coco1k and coco5k need COCO's 5000 test images; their streaming path is the folds'.
    mean, _ = evaluate_folds(sims, n_folds=3)
    assert evaluate_streaming_folds(images, captions, similarity, n_folds=3).mean == mean


# --------------------------------------------------------------------------- progress
def test_progress_bars(test_seed, capsys, monkeypatch):
    images, captions = make_tokens(6, 5, case_seed(test_seed, 31), integer=True)
    streaming_ranks(images, captions, block_images=2, progress=True)
    streaming_topk(images, captions, k=2, block_images=2, progress=True)
    assert capsys.readouterr().err == ""  # stderr is no terminal here: no bar
    monkeypatch.setattr(fastalign.progress, "_interactive", lambda: True)
    streaming_ranks(images, captions, block_images=2, progress=True)
    err = capsys.readouterr().err
    assert "streaming_ranks" in err and "0/9" in err  # 3 x 3 aligned blocks
    streaming_topk(images, captions, k=2, block_images=2, block_captions=30, progress=True)
    err = capsys.readouterr().err
    assert "streaming_topk" in err and "0/3" in err


# --------------------------------------------------------------------------- errors
def test_errors(test_seed):
    images, captions = make_tokens(4, 5, case_seed(test_seed, 37), integer=True)
    with pytest.raises(ValueError, match=r"got 4 images and 20 captions.*captions_per_image = 3"):
        streaming_ranks(images, captions, captions_per_image=3)
    with pytest.raises(TypeError, match="captions_per_image must be an int"):
        evaluate_streaming(images, captions, None, 5.0)
    with pytest.raises(ValueError, match="captions_per_image must be >= 1"):
        streaming_ranks(images, captions, captions_per_image=0)
    with pytest.raises(ValueError, match="n_folds = 3 must divide"):
        evaluate_streaming_folds(images, captions, n_folds=3)
    with pytest.raises(TypeError, match="n_folds must be an int"):
        evaluate_streaming_folds(images, captions, n_folds="5")
    with pytest.raises(ValueError, match="block_images must be >= 1"):
        streaming_ranks(images, captions, block_images=0)
    with pytest.raises(TypeError, match="block_captions must be an int"):
        streaming_topk(images, captions, k=1, block_captions=2.5)
    with pytest.raises(ValueError, match="memory_budget_mb must be positive"):
        streaming_ranks(images, captions, memory_budget_mb=-1)
    with pytest.raises(ValueError, match=r"captions\.lengths\[2\] = 0"):
        lengths = captions.lengths.clone()
        lengths[2] = 0
        streaming_ranks(images, Tokens(captions.embs, lengths))
    with pytest.raises(TypeError, match="apply to the default score only"):
        streaming_ranks(images, captions, lambda i, t: None, aggregate="sum")
    with pytest.raises(ValueError, match=r"the similarity returned \(4, 1\).*shape \(4, 20\)"):
        streaming_ranks(images, captions, lambda i, t: torch.zeros(i.count, 1))
    with pytest.raises(ValueError, match="k must be >= 1"):
        streaming_topk(images, captions, k=0)
    with pytest.raises(TypeError, match="k must be an int"):
        streaming_topk(images, captions, k=2.0)
    with pytest.raises(ValueError, match="k must be at most the gallery's size, 4 images, got 5"):
        streaming_topk(images, captions, k=5)
    with pytest.raises(ValueError, match="k must be at most the gallery's size, 20 captions"):
        streaming_topk(images, captions, k=21, queries="images")
    with pytest.raises(ValueError, match=r"queries must be one of \('captions', 'images'\)"):
        streaming_topk(images, captions, k=1, queries="text")


def test_nan_scores_name_the_pair(test_seed):
    images, captions = make_tokens(4, 5, case_seed(test_seed, 41), integer=True)

    def with_nan(block_images: Tokens, block_captions: Tokens) -> torch.Tensor:
        return torch.where(
            block_captions.embs[:, 0, 0] > 5, torch.nan, torch.zeros(block_images.count, 1)
        ).expand(block_images.count, block_captions.count)

    embs = captions.embs.clone()
    embs[13, 0, 0] = 9.0
    bad = Tokens(embs, captions.lengths)
    for blocks in (dict(), dict(block_images=1, block_captions=3)):
        with pytest.raises(ValueError, match=r"image \d x caption 13 NaN"):
            streaming_ranks(images, bad, with_nan, **blocks)
        with pytest.raises(ValueError, match=r"image 0 x caption 13 NaN"):
            streaming_topk(images, bad, with_nan, k=2, **blocks)
