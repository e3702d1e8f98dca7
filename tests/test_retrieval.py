"""Streaming evaluation and top-k search against the full score matrix.

Ties are the point of most cases: integer-valued embeddings make every score an exact
small integer (whatever blocks the products run in), so many negatives tie with their
positive and many gallery items tie at the k-th place. Failure messages carry the seed:
``FASTALIGN_TEST_SEED`` re-draws every input.
"""

import datetime
import itertools
import math
import os
import time
from contextlib import redirect_stdout

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _helpers.distributed import WORLD, as_torchrun_rank, free_port, spawn
from _helpers.scores import FLOAT_SCORE, INTEGER_SCORE
from conftest import SEED

import fastalign
import fastalign.progress
from fastalign import distributed as fd
from fastalign.cli import main
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
    shard_range,
    streaming_ranks,
    streaming_topk,
)
from fastalign.tokens import Tokens


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


# --------------------------------------------------------------------------- sharded
# Sharded runs: 2 gloo processes (one spawn for the module, see sharded_ranks), each holding
# a contiguous shard of the gallery, against one process on the whole gallery. Cases: name
# -> (n_images, captions per image, score, block sizes, the block the shards are whole
# blocks of). Integer scores where a block is cut by a shard boundary (its two parts score
# alike to the last bit only with exact scores); float scores bit for bit with whole blocks.
SHARDED_RANKS = {
    "whole blocks": (13, 5, INTEGER_SCORE, dict(block_images=4), 4),
    "floats, whole blocks": (9, 5, FLOAT_SCORE, dict(block_images=2), 2),
    "7 images, a block cut": (7, 5, INTEGER_SCORE, dict(), 1),
    "unaligned blocks": (13, 5, INTEGER_SCORE, dict(block_images=3, block_captions=7), 3),
    "unaligned, cut": (9, 1, INTEGER_SCORE, dict(block_images=2, block_captions=3), 1),
    "an empty shard": (4, 5, INTEGER_SCORE, dict(block_images=4), 4),
}
# name -> (n_folds, block sizes, shards' block): 15 images, fold boundaries inside shards.
SHARDED_FOLDS = {
    "folds, whole blocks": (5, dict(block_images=2), 2),
    "folds, unaligned, cut": (3, dict(block_images=3, block_captions=7), 1),
}
# name -> (queries, n_images, block sizes, shards' block): 13 or 4 images of 5 captions.
SHARDED_TOPK = {
    "t2i, whole blocks": ("captions", 13, dict(block_images=3), 3),
    "t2i, cut": ("captions", 13, dict(block_images=3, block_captions=7), 1),
    "i2t, whole blocks": ("images", 13, dict(block_captions=10), 10),
    "i2t, a block cut": ("images", 13, dict(), 1),
    "t2i, an empty shard": ("captions", 4, dict(block_images=4), 4),
}
# The eval runs' most scores a block: None, the default (one block of the 12 test images:
# rank 1 holds none), and 80 (4 images x 20 captions: rank 0 holds 8 images, rank 1 4).
EVAL_BLOCK_PAIRS = [None, 80]


def sharded_case(name: str, seed: int):
    """(images, captions, per_image, score options, blocks, shard block) of a ranks case."""
    n_images, per_image, score, blocks, shard_block = SHARDED_RANKS[name]
    images, captions = make_tokens(
        n_images, per_image, case_seed(seed, n_images, per_image, 43), score is INTEGER_SCORE
    )
    return images, captions, per_image, score, blocks, shard_block


def folds_inputs(seed: int):
    return make_tokens(15, 5, case_seed(seed, 15, 47), integer=True)


def topk_inputs(n_images: int, seed: int):
    return make_tokens(n_images, 5, case_seed(seed, n_images, 53), integer=True)


def topk_ks(queries: str, n_images: int) -> list[int]:
    """Gallery items per query: 1, some, and the whole gallery (more than a shard holds)."""
    n_gallery = n_images if queries == "captions" else 5 * n_images
    return [1, min(4, n_gallery), n_gallery]


def _sharded_cases(rank: int, seed: int) -> dict:
    out = {}
    for name in SHARDED_RANKS:
        images, captions, per_image, score, blocks, shard_block = sharded_case(name, seed)
        start, stop = shard_range(images.count, shard_block)
        ranks = streaming_ranks(
            images.rows(start, stop), captions, None, per_image, sharded=True, **blocks, **score
        )
        out[name] = dict(shard=(start, stop), ranks=ranks)
    # The blocks each process scores (ranks of "whole blocks"): (images, captions) per call.
    images, captions, per_image, score, blocks, shard_block = sharded_case("whole blocks", seed)
    start, stop = shard_range(images.count, shard_block)
    calls = []

    def recording(block_images: Tokens, block_captions: Tokens) -> torch.Tensor:
        calls.append((block_images.count, block_captions.count))
        return full_matrix(block_images, block_captions, score)

    streaming_ranks(images.rows(start, stop), captions, recording, sharded=True, **blocks)
    out["calls"] = calls
    images, captions = folds_inputs(seed)
    for name, (n_folds, blocks, shard_block) in SHARDED_FOLDS.items():
        start, stop = shard_range(images.count, shard_block)
        folds = evaluate_streaming_folds(
            images.rows(start, stop),
            captions,
            n_folds=n_folds,
            sharded=True,
            **blocks,
            **INTEGER_SCORE,
        )
        out[name] = dict(shard=(start, stop), folds=folds)
    for name, (queries, n_images, blocks, shard_block) in SHARDED_TOPK.items():
        images, captions = topk_inputs(n_images, seed)
        gallery = images if queries == "captions" else captions
        start, stop = shard_range(gallery.count, shard_block)
        shard = gallery.rows(start, stop)
        inputs = (shard, captions) if queries == "captions" else (images, shard)
        out[name] = dict(
            shard=(start, stop),
            topk={
                k: streaming_topk(
                    *inputs, k=k, queries=queries, sharded=True, **blocks, **INTEGER_SCORE
                )
                for k in topk_ks(queries, n_images)
            },
        )
    # Errors every process raises alike; the group works on after them.
    images, captions = topk_inputs(4, seed)
    start, stop = shard_range(4)
    errors = {}
    for what, call in {
        "captions differ": lambda: streaming_ranks(
            images.rows(start, stop), captions.rows(0, 20 - 5 * rank), sharded=True
        ),
        "k above the gallery": lambda: streaming_topk(
            images.rows(start, stop), captions, k=5, sharded=True
        ),
    }.items():
        try:
            call()
        except ValueError as error:
            errors[what] = str(error)
    check = torch.ones(1)
    dist.all_reduce(check)
    errors["after"] = float(check)
    out["errors"] = errors
    return out


def _failing_rank(rank: int, seed: int) -> str:
    """Rank 1's images score NaN: its error, and rank 0's when the positives it waits for
    never come (the group's timeout is 2 s)."""
    images, captions = make_tokens(4, 5, case_seed(seed, 59), integer=True)

    def nan_for_image_3(block_images: Tokens, block_captions: Tokens) -> torch.Tensor:
        scores = full_matrix(block_images, block_captions, INTEGER_SCORE)
        return torch.where(block_images.embs[:, :1, 0] > 5, torch.nan, scores)

    images.embs[3, 0, 0] = 9.0
    start, stop = shard_range(4)
    try:
        streaming_ranks(images.rows(start, stop), captions, nan_for_image_3, sharded=True)
    except (ValueError, fd.CollectiveTimeoutError) as error:
        if rank == 1:
            time.sleep(4)  # alive: rank 0 times out meanwhile
        return str(error)
    return "no error"


def _sharded_worker(rank: int, ports: list[int], seed: int, checkpoint: str, out_dir: str):
    """``fastalign eval`` as torchrun starts it (stdout to a file) with each of
    EVAL_BLOCK_PAIRS, then every sharded case in a new group, then a rank that fails in a
    last group with a 2 s timeout."""
    as_torchrun_rank(rank, ports[0])
    default_pairs = fastalign.evaluation._BLOCK_PAIRS
    for pairs, port in zip(EVAL_BLOCK_PAIRS, ports):
        os.environ["MASTER_PORT"] = str(port)
        fastalign.evaluation._BLOCK_PAIRS = pairs or default_pairs
        with open(os.path.join(out_dir, f"rank{rank}.{pairs}.out"), "w") as out:
            with redirect_stdout(out):
                main(["eval", checkpoint, "--no-progress"])
        assert not fd.is_distributed()  # eval left its group
    fastalign.evaluation._BLOCK_PAIRS = default_pairs
    results = {"eval_timeout_s": fd._group_timeout.total_seconds()}
    os.environ["MASTER_PORT"] = str(ports[-2])
    fd.setup_from_env("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        results |= _sharded_cases(rank, seed)
    finally:
        fd.cleanup()
    os.environ["MASTER_PORT"] = str(ports[-1])
    fd.setup_from_env("gloo", timeout=datetime.timedelta(seconds=2))
    try:
        results["failure"] = _failing_rank(rank, seed)
    finally:
        dist.destroy_process_group()  # no barrier: a timeout closes the group's connections
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def eval_checkpoint(tiny_data, tmp_path_factory):
    """A one-epoch run on the tiny data (its collectives time out after 1.5 min)."""
    out = tmp_path_factory.mktemp("sharded_eval") / "run"
    overrides = [
        f"data_root={tiny_data}",
        f"word_vectors={tiny_data / 'glove_synthetic.txt'}",
        f"output_dir={out}",
        "epochs=1",
        "batch_size=16",
        "model.word_dim=16",
        "model.embed_dim=32",
        "dist_timeout_minutes=1.5",
    ]
    main(["train", "--no-progress", *overrides])
    return out / "best.pt"


@pytest.fixture(scope="module")
def sharded_ranks(tmp_path_factory, eval_checkpoint) -> list[dict]:
    """Per rank of one 2-process gloo run: every sharded case's result, what ``fastalign
    eval`` printed (``out``), its group's timeout, and the failure case's error."""
    out_dir = tmp_path_factory.mktemp("sharded")
    ports = [free_port() for _ in range(len(EVAL_BLOCK_PAIRS) + 2)]
    spawn(_sharded_worker, ports, SEED, str(eval_checkpoint), str(out_dir))
    return [
        torch.load(out_dir / f"rank{r}.pt", weights_only=False)
        | {pairs: (out_dir / f"rank{r}.{pairs}.out").read_text() for pairs in EVAL_BLOCK_PAIRS}
        for r in range(WORLD)
    ]


def check_shards(sharded_ranks, name: str, n_items: int, block: int) -> None:
    """The shards of ``name``: contiguous, in rank order, whole blocks, covering the items."""
    shards = [result[name]["shard"] for result in sharded_ranks]
    assert shards[0][0] == 0 and shards[-1][1] == n_items, shards
    assert all(a[1] == b[0] for a, b in itertools.pairwise(shards)), shards
    assert all(start % block == 0 for start, _ in shards), shards


@pytest.mark.parametrize("name", list(SHARDED_RANKS))
def test_sharded_ranks_equal_one_process(sharded_ranks, test_seed, name):
    images, captions, per_image, score, blocks, shard_block = sharded_case(name, test_seed)
    check_shards(sharded_ranks, name, images.count, shard_block)
    # One process with the same block sizes: bit for bit (floats too, with whole blocks).
    expected = streaming_ranks(images, captions, None, per_image, **blocks, **score)
    if score is INTEGER_SCORE:  # ... and compute_ranks of the matrix, ties included
        sims = full_matrix(images, captions, score)
        assert has_ties(sims, per_image), f"seed {test_seed}: no tie to count"
        full = compute_ranks(sims, per_image)
        assert all(torch.equal(a, b) for a, b in zip(expected, full)), f"seed {test_seed}"
    for rank, result in enumerate(sharded_ranks):
        got = result[name]["ranks"]
        assert torch.equal(got[0], expected[0]), f"seed {test_seed}, rank {rank}: i2t"
        assert torch.equal(got[1], expected[1]), f"seed {test_seed}, rank {rank}: t2i"
    if name == "an empty shard":
        assert sharded_ranks[1][name]["shard"] == (4, 4)


def test_sharded_ranks_score_each_block_once(sharded_ranks):
    # 13 images in blocks of 4 (+ 1): rank 0 holds 2 image blocks, rank 1 the other 2; each
    # scores its blocks against the 4 caption blocks once.
    first, second = (result["calls"] for result in sharded_ranks)
    assert len(first) == len(second) == 2 * 4
    assert sum(ni * nt for ni, nt in first + second) == 13 * 65  # every pair once
    assert {ni for ni, _ in first} == {4} and {ni for ni, _ in second} == {4, 1}


@pytest.mark.parametrize("name", list(SHARDED_FOLDS))
def test_sharded_folds_equal_one_process(sharded_ranks, test_seed, name):
    n_folds, blocks, shard_block = SHARDED_FOLDS[name]
    images, captions = folds_inputs(test_seed)
    check_shards(sharded_ranks, name, 15, shard_block)
    expected = evaluate_streaming_folds(
        images, captions, n_folds=n_folds, **blocks, **INTEGER_SCORE
    )
    sims = full_matrix(images, captions, INTEGER_SCORE)
    assert (expected.mean, expected.folds) == evaluate_folds(sims, n_folds=n_folds)
    assert expected.whole == evaluate(sims), f"seed {test_seed}"
    for rank, result in enumerate(sharded_ranks):
        assert result[name]["folds"] == expected, f"seed {test_seed}, rank {rank}"


@pytest.mark.parametrize("name", list(SHARDED_TOPK))
def test_sharded_topk_equals_one_process(sharded_ranks, test_seed, name):
    queries, n_images, blocks, shard_block = SHARDED_TOPK[name]
    images, captions = topk_inputs(n_images, test_seed)
    n_gallery = n_images if queries == "captions" else 5 * n_images
    check_shards(sharded_ranks, name, n_gallery, shard_block)
    sims = full_matrix(images, captions, INTEGER_SCORE)
    rows = sims.T if queries == "captions" else sims
    for k in topk_ks(queries, n_images):
        expected = reference_topk(rows, k)
        one = streaming_topk(images, captions, k=k, queries=queries, **blocks, **INTEGER_SCORE)
        assert all(torch.equal(a, b) for a, b in zip(one, expected)), f"seed {test_seed}, k {k}"
        for rank, result in enumerate(sharded_ranks):
            scores, indices = result[name]["topk"][k]
            assert torch.equal(scores, expected[0]), f"seed {test_seed}, rank {rank}, k {k}"
            assert torch.equal(indices, expected[1]), f"seed {test_seed}, rank {rank}, k {k}"
    # Ties at a k-th place: their order across the shards was exercised.
    ordered = rows.sort(dim=1, descending=True).values
    ks = [k for k in topk_ks(queries, n_images) if k < n_gallery]
    assert any(bool((ordered[:, k - 1] == ordered[:, k]).any()) for k in ks), f"seed {test_seed}"


def test_sharded_errors_are_raised_on_every_process(sharded_ranks):
    for result in sharded_ranks:
        errors = result["errors"]
        assert (
            "the same on every process: got 20 on rank 0, 15 on rank 1" in errors["captions differ"]
        )
        assert "at most the gallery's size, 4 images, got 5" in errors["k above the gallery"]
        assert errors["after"] == WORLD


def test_a_failing_rank_does_not_hang_the_others(sharded_ranks):
    first, second = (result["failure"] for result in sharded_ranks)
    assert "image 3 x caption" in second and "NaN" in second
    assert "rank 0 of 2: the all_reduce of the positive scores timed out after 2 s" in first


@pytest.mark.parametrize("pairs", EVAL_BLOCK_PAIRS)
def test_sharded_eval_prints_one_process_table(sharded_ranks, eval_checkpoint, capsys, pairs):
    # The same blocks as the 2 processes: one process's eval prints the same.
    with pytest.MonkeyPatch.context() as patch:
        if pairs is not None:
            patch.setattr(fastalign.evaluation, "_BLOCK_PAIRS", pairs)
        main(["eval", str(eval_checkpoint), "--no-progress"])
    one = capsys.readouterr().out
    assert "rSum" in one
    first, second = (result[pairs] for result in sharded_ranks)
    assert first == one
    assert second == ""  # rank 0 prints
    # The run's dist_timeout_minutes.
    assert [result["eval_timeout_s"] for result in sharded_ranks] == [90, 90]


def test_encode_a_shard_of_the_images(tiny_data):
    vocab = Vocabulary.build(read_captions(tiny_data, "train"))
    dataset = PrecompDataset(tiny_data, "test", vocab)
    config = ModelConfig(feature_dim=dataset.feature_dim, embed_dim=8, word_dim=8)
    model = MatchingModel(len(vocab), config)
    images, captions = encode_dataset(model, dataset, batch_size=5)
    for start, stop in ((3, 9), (0, 12), (11, 12)):
        shard, all_captions = encode_dataset(model, dataset, 5, image_range=(start, stop))
        assert torch.equal(shard.embs, images.embs[start:stop]), (start, stop)
        assert torch.equal(shard.lengths, images.lengths[start:stop]), (start, stop)
        assert torch.equal(all_captions.embs, captions.embs)
    empty, _ = encode_dataset(model, dataset, image_range=(12, 12))  # a shard of none
    assert empty.embs.shape == (0, *images.embs.shape[1:]) and empty.lengths.shape == (0,)
    assert empty.embs.dtype == torch.float32 and empty.lengths.dtype == torch.int64
    with pytest.raises(ValueError, match=r"image_range must be .* <= 12 \(the images\)"):
        encode_dataset(model, dataset, image_range=(5, 13))


def test_shard_range_without_a_group():
    assert shard_range(7) == (0, 7) and shard_range(7, block=3) == (0, 7)
    with pytest.raises(ValueError, match="n_items must be >= 1"):
        shard_range(0)
    with pytest.raises(TypeError, match="block must be an int"):
        shard_range(5, block=2.0)
