"""Two-stage search against plain references, the on-disk index and its commands.

Integer-valued embeddings make every fine-grained score an exact small integer (whatever
batch it is computed in), so results compare bit for bit, ties included; float embeddings
compare indices exactly and scores to rounding. Failure messages carry the seed:
``FASTALIGN_TEST_SEED`` re-draws every input.
"""

import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers.cli import one_error_line, run_main
from _helpers.scores import FLOAT_SCORE, INTEGER_SCORE

import fastalign.progress
import fastalign.search
from fastalign.checkpoint import load_checkpoint, restore_trained
from fastalign.cli import main
from fastalign.data import PrecompDataset, read_captions
from fastalign.index import encode_images, encode_texts, open_index, write_index
from fastalign.model_evaluation import encode_dataset
from fastalign.retrieval import streaming_topk
from fastalign.search import (
    PackedTokens,
    global_embeddings,
    global_shortlist,
    topk_recall,
    two_stage_search,
)
from fastalign.tokens import Tokens
from fastalign.training import Trainer

try:
    import faiss  # noqa: F401

    HAS_FAISS = True
except ImportError:
    HAS_FAISS = False
needs_faiss = pytest.mark.skipif(
    not HAS_FAISS, reason="faiss is not installed (pip install faiss-cpu)"
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: the calls here are tiny (see tests/test_retrieval.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tokens(n, tokens, seed, integer, dim=6):
    """(n, tokens, dim) embeddings with random valid lengths, the padding filled with garbage
    that no score may read: in {-1, 0, 1} when ``integer``, else unit-norm Gaussian."""
    g = torch.Generator().manual_seed(seed)
    if integer:
        embs = torch.randint(-1, 2, (n, tokens, dim), generator=g).float()
    else:
        embs = F.normalize(torch.randn(n, tokens, dim, generator=g), dim=-1)
    lengths = torch.randint(1, tokens + 1, (n,), generator=g)
    lengths[0] = tokens
    embs[torch.arange(tokens) >= lengths[:, None]] = 1e4
    return Tokens(embs, lengths)


def full_matrix(images, captions, options):
    return fastalign.region_word_similarity(
        images.embs, captions.embs, images.lengths, captions.lengths, **options
    )


def stable_topk(rows: torch.Tensor, k: int):
    """The k best of each row, equal scores in increasing index order."""
    order = rows.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return rows.gather(1, order), order


def plain_global(tokens: Tokens) -> torch.Tensor:
    """The mean of the valid tokens, L2-normalised, one sequence at a time."""
    rows = [tokens.embs[n, : tokens.lengths[n]].double().mean(0) for n in range(len(tokens.embs))]
    return F.normalize(torch.stack(rows), dim=-1).float()


def case_seed(test_seed, *parts) -> int:
    return test_seed * 1000 + sum(31**k * p for k, p in enumerate(parts))


# --------------------------------------------------------------------------- packed tokens
def test_packed_rows_are_the_padded_rows(test_seed):
    tokens = make_tokens(9, 5, case_seed(test_seed, 1), integer=False)
    packed = PackedTokens.pack(tokens, torch.float32)
    assert packed.count == 9 and packed.dim == 6 and packed.longest == 5
    assert packed.flat.shape[0] == int(tokens.lengths.sum())
    memmap_like = PackedTokens(packed.flat.numpy(), packed.offsets)  # read as a numpy array
    for indices in (np.array([0]), np.array([2, 3, 7]), np.arange(9)):
        for source in (packed, memmap_like):
            rows = source.rows(indices)
            longest = int(tokens.lengths[indices].max())
            assert torch.equal(rows.lengths, tokens.lengths[indices])
            expected = tokens.embs[indices, :longest] * rows.valid_mask()[..., None]
            assert torch.equal(rows.embs, expected), f"seed {test_seed}, {indices}"


@pytest.mark.parametrize(
    "offsets, error, match",
    [
        ([0, 2, 2, 4], ValueError, r"sequence 1 spans 2 \.\. 2"),
        ([0, 2, 3], ValueError, "from 0 to the 4 rows"),
        ([1, 2, 4], ValueError, "from 0 to the 4 rows"),
        ([0.0, 4.0], TypeError, "offsets must hold integers"),
        ([4], ValueError, r"\(N \+ 1,\) with N >= 1"),
    ],
)
def test_packed_tokens_errors(offsets, error, match):
    with pytest.raises(error, match=match):
        PackedTokens(torch.zeros(4, 3), offsets)


def test_packed_tokens_flat_errors():
    with pytest.raises(TypeError, match="flat must hold floating-point"):
        PackedTokens(torch.zeros(4, 3, dtype=torch.int64), [0, 4])
    with pytest.raises(ValueError, match="flat must be 2-D"):
        PackedTokens(torch.zeros(4), [0, 4])


# --------------------------------------------------------------------------- stage 1
def test_global_embeddings_are_the_normalised_means(test_seed):
    tokens = make_tokens(11, 7, case_seed(test_seed, 2), integer=False)
    expected = plain_global(tokens)
    half = Tokens(tokens.embs.half().numpy(), tokens.lengths)  # a float16 numpy array
    for source, atol in (
        (tokens, 1e-6),
        (PackedTokens.pack(tokens, torch.float32), 1e-6),
        (half, 2e-3),
    ):
        # A budget of about one sequence a block: the blocks' seams are crossed.
        result = global_embeddings(source, memory_budget_mb=7 * 6 * 4 * 1.5 / 2**20)
        assert result.dtype == torch.float32 and result.shape == (11, 6)
        torch.testing.assert_close(result, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("budget", [None, 1e-4])
def test_exact_shortlist_is_a_stable_sort_of_every_inner_product(test_seed, monkeypatch, budget):
    # Integer vectors: exact inner products, with ties at the size-th place to break.
    g = torch.Generator().manual_seed(case_seed(test_seed, 3))
    queries = torch.randint(-1, 2, (13, 4), generator=g).float()
    gallery = torch.randint(-1, 2, (57, 4), generator=g).float()
    monkeypatch.setattr(fastalign.search, "_QUERY_BLOCK", 5)  # query blocks too
    options = {} if budget is None else dict(memory_budget_mb=budget)  # 1e-4: 2-item blocks
    products = queries @ gallery.T
    for size in (1, 6, 57):
        for source in (gallery, gallery.numpy()):
            scores, indices = global_shortlist(queries, source, size, **options)
            expected_scores, expected_indices = stable_topk(products, size)
            assert torch.equal(indices, expected_indices), f"seed {test_seed}, size {size}"
            assert torch.equal(scores, expected_scores), f"seed {test_seed}, size {size}"
    kth = products.sort(dim=1, descending=True).values[:, 5:7]
    assert bool((kth[:, 0] == kth[:, 1]).any()), f"seed {test_seed}: no tie at the 6th place"


@needs_faiss
def test_faiss_flat_shortlist_equals_the_exact_one(test_seed):
    g = torch.Generator().manual_seed(case_seed(test_seed, 4))
    queries = F.normalize(torch.randn(9, 8, generator=g), dim=-1)
    gallery = F.normalize(torch.randn(200, 8, generator=g), dim=-1)
    exact_scores, exact_indices = global_shortlist(queries, gallery, 10)
    scores, indices = global_shortlist(queries, gallery.numpy(), 10, index="faiss")
    assert torch.equal(indices, exact_indices), f"seed {test_seed}"  # no ties among floats
    torch.testing.assert_close(scores, exact_scores, rtol=0, atol=1e-5)
    # An approximate index answers with valid, distinct items of high recall here.
    _, approximate = global_shortlist(queries, gallery, 10, index="faiss:HNSW8")
    assert approximate.shape == (9, 10) and int(approximate.min()) >= 0
    assert all(len(set(row.tolist())) == 10 for row in approximate)
    assert topk_recall(approximate, exact_indices) >= 0.8, f"seed {test_seed}"


def test_faiss_without_faiss_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        global_shortlist(torch.zeros(1, 2), torch.zeros(3, 2), 2, index="faiss")


# --------------------------------------------------------------------------- two stages
@pytest.mark.parametrize("queries", ["captions", "images"])
@pytest.mark.parametrize("packed", [False, True])
def test_a_whole_gallery_shortlist_is_streaming_topk(test_seed, queries, packed):
    seed = case_seed(test_seed, 5, len(queries), packed)
    images = make_tokens(13, 7, seed, integer=True)
    captions = make_tokens(21, 9, seed + 1, integer=True)
    sides = (
        (PackedTokens.pack(images), PackedTokens.pack(captions)) if packed else (images, captions)
    )
    n_gallery = 13 if queries == "captions" else 21
    for k in (1, 4, n_gallery):
        expected = streaming_topk(images, captions, k=k, queries=queries, **INTEGER_SCORE)
        for shortlist in (n_gallery, n_gallery + 5):
            # A budget of one gallery row at a time: the scoring chunks' seams are crossed.
            result = two_stage_search(
                *sides,
                k=k,
                queries=queries,
                shortlist=shortlist,
                memory_budget_mb=9 * 6 * 4 / 2**20,
                **INTEGER_SCORE,
            )
            assert torch.equal(result[1], expected[1]), f"seed {seed}, k {k}"
            assert torch.equal(result[0], expected[0]), f"seed {seed}, k {k}"
    # Ties at the k-th place happened: the tie-break was exercised.
    sims = full_matrix(images, captions, INTEGER_SCORE)
    rows = sims.T if queries == "captions" else sims
    kth = rows.sort(dim=1, descending=True).values[:, 3:5]
    assert bool((kth[:, 0] == kth[:, 1]).any()), f"seed {seed}"


@pytest.mark.parametrize("queries", ["captions", "images"])
def test_two_stages_equal_the_plain_shortlist_then_rerank(test_seed, queries):
    seed = case_seed(test_seed, 6, len(queries))
    images = make_tokens(40, 7, seed, integer=False)
    captions = make_tokens(25, 9, seed + 1, integer=False)
    sims = full_matrix(images, captions, FLOAT_SCORE)
    query_tokens, gallery_tokens = (
        (captions, images) if queries == "captions" else (images, captions)
    )
    rows = sims.T if queries == "captions" else sims
    # The plain way: every global inner product, the 8 best, their fine scores, the 3 best.
    products = plain_global(query_tokens) @ plain_global(gallery_tokens).T
    expected = []
    for q, shortlist in enumerate(stable_topk(products, 8)[1]):
        candidates = shortlist.sort().values  # ties of the fine scores to the lower index
        expected.append(candidates[stable_topk(rows[q, candidates][None], 3)[1][0]])
    expected = torch.stack(expected)
    scores, indices = two_stage_search(
        images, captions, k=3, queries=queries, shortlist=8, **FLOAT_SCORE
    )
    assert torch.equal(indices, expected), f"seed {seed}"
    torch.testing.assert_close(scores, rows.gather(1, expected), rtol=0, atol=1e-6)
    # The stored global embeddings of an index give the same result.
    stored = global_embeddings(gallery_tokens).numpy()
    again = two_stage_search(
        images, captions, k=3, queries=queries, shortlist=8, gallery_global=stored, **FLOAT_SCORE
    )
    assert torch.equal(again[1], indices)
    # The shortlist lost some of the exact top 3 here, and topk_recall counts them.
    exact = stable_topk(rows, 3)[1]
    recall = topk_recall(indices, exact)
    plain = (
        sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(indices, exact)) / exact.numel()
    )
    assert recall == plain and recall < 1, f"seed {seed}"


def test_a_custom_similarity_on_the_shortlist(test_seed):
    # Every method's similarity takes (images, captions) tokens: here a global cosine.
    images = make_tokens(30, 5, case_seed(test_seed, 7), integer=False)
    captions = make_tokens(6, 4, case_seed(test_seed, 8), integer=False)

    def cosine(block_images: Tokens, block_captions: Tokens) -> torch.Tensor:
        return (
            F.normalize(block_images.mean_pooled(), dim=-1)
            @ F.normalize(block_captions.mean_pooled(), dim=-1).T
        )

    scores, indices = two_stage_search(images, captions, cosine, k=4, shortlist=10)
    # Its score is the shortlist's own: the two stages agree on the order.
    expected_scores, expected = stable_topk(plain_global(captions) @ plain_global(images).T, 4)
    assert torch.equal(indices, expected), f"seed {test_seed}"
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-6)
    # Equal fine scores go to the lower gallery index, whatever the shortlist's order.
    shortlists = global_shortlist(global_embeddings(captions), global_embeddings(images), 10)[1]
    constant = two_stage_search(
        images, captions, lambda i, t: torch.zeros(i.count, t.count), k=4, shortlist=10
    )
    assert torch.equal(constant[1], shortlists.sort(dim=1).values[:, :4])


def test_topk_recall_counts_the_reference_entries_found():
    found = torch.tensor([[3, 1, 4], [0, 2, 5]])
    assert topk_recall(found, torch.tensor([[1, 3], [7, 0]])) == 3 / 4
    assert topk_recall(found, found) == 1.0
    assert topk_recall(found[:, :1], torch.tensor([[4], [9]])) == 0.0
    with pytest.raises(ValueError, match="the same queries"):
        topk_recall(found, found[:1])
    with pytest.raises(TypeError, match="reference must be a 2-D integer tensor"):
        topk_recall(found, found.float())


def test_progress_bars(test_seed, capsys, monkeypatch):
    images = make_tokens(8, 4, case_seed(test_seed, 9), integer=True)
    captions = make_tokens(3, 4, case_seed(test_seed, 10), integer=True)
    two_stage_search(images, captions, k=2, shortlist=4, progress=True)
    assert capsys.readouterr().err == ""  # stderr is no terminal here: no bar
    monkeypatch.setattr(fastalign.progress, "_interactive", lambda: True)
    two_stage_search(images, captions, k=2, shortlist=4, progress=True)
    err = capsys.readouterr().err
    for bar in ("global embeddings", "global shortlist", "two-stage search", "0/3"):
        assert bar in err, err


def test_errors(test_seed):
    images = make_tokens(5, 3, case_seed(test_seed, 11), integer=True)
    captions = make_tokens(4, 3, case_seed(test_seed, 12), integer=True)
    cases = [
        (dict(k=6), ValueError, "k must be at most the gallery's size, 5 images, got 6"),
        (dict(k=5, queries="images"), ValueError, "gallery's size, 4 captions, got 5"),
        (dict(k=0), ValueError, "k must be >= 1"),
        (dict(k=3, shortlist=2), ValueError, "shortlist must be at least k = 3, got 2"),
        (dict(k=1, shortlist=2.0), TypeError, "shortlist must be an int"),
        (dict(k=1, queries="text"), ValueError, "queries must be one of"),
        (dict(k=1, shortlist_index="hnsw"), ValueError, "shortlist_index must be 'exact'"),
        (dict(k=1, shortlist=2, gallery_global=np.zeros((4, 6))), ValueError, "one row per"),
        (dict(k=1, shortlist=2, gallery_global=np.zeros((5, 2))), ValueError, r"shape \(N, 6\)"),
        (dict(k=1, memory_budget_mb=0), ValueError, "memory_budget_mb must be a finite"),
        (dict(k=1, aggregate="median"), ValueError, "aggregate must be one of"),
    ]
    for arguments, error, match in cases:
        with pytest.raises(error, match=match):
            two_stage_search(images, captions, **arguments)
    with pytest.raises(TypeError, match="apply to the default score only"):
        two_stage_search(images, captions, lambda i, t: None, k=1, aggregate="sum")
    with pytest.raises(ValueError, match=r"the similarity returned \(1, 1\).*shape \(5, 1\)"):
        two_stage_search(images, captions, lambda i, t: torch.zeros(1, 1), k=1)
    with pytest.raises(ValueError, match="image and caption embeddings must share"):
        two_stage_search(images, make_tokens(4, 3, 0, True, dim=5), k=1)
    with pytest.raises(ValueError, match=r"captions\.lengths\[1\] = 0"):
        two_stage_search(images, Tokens(captions.embs, torch.tensor([1, 0, 1, 1])), k=1)
    with pytest.raises(ValueError, match="size must be at most the gallery's 3 items"):
        global_shortlist(torch.zeros(1, 2), torch.zeros(3, 2), 4)


def test_nan_scores_name_the_query_and_the_item(test_seed):
    images = make_tokens(6, 3, case_seed(test_seed, 13), integer=True)
    captions = make_tokens(4, 3, case_seed(test_seed, 14), integer=True)

    def nan_at_image_4(block_images: Tokens, block_captions: Tokens) -> torch.Tensor:
        scores = torch.zeros(block_images.count, block_captions.count)
        scores[(block_images.embs[:, 0, 0] == 7).nonzero()[:, 0]] = torch.nan
        return scores

    embs = images.embs.clone()
    embs[4, 0, 0] = 7.0
    with pytest.raises(ValueError, match="query caption 0 x image 4 NaN"):
        two_stage_search(Tokens(embs, images.lengths), captions, nan_at_image_4, k=2, shortlist=6)


# --------------------------------------------------------------------------- the index
def write_random_index(path, seed, n=10, tokens=6, dim=4, batch=3, **options):
    """An index of n random integer-valued items (exact in float16) in batches of ``batch``;
    returns the Tokens written."""
    items = make_tokens(n, tokens, seed, integer=True, dim=dim)
    items = Tokens(items.embs.masked_fill(~items.valid_mask()[..., None], 0), items.lengths)
    batches = (items.rows(start, start + batch) for start in range(0, n, batch))
    ids = [f"item{i}" for i in range(n)]
    source = {"model": {"checkpoint": "none", "sha256": "0"}, "data": {"split": "test"}}
    write_index(path, batches, ids, gallery="images", source=source, **options)
    return items


def test_an_index_holds_the_packed_tokens_globals_and_ids(test_seed, tmp_path):
    items = write_random_index(tmp_path / "index", case_seed(test_seed, 20))
    index = open_index(tmp_path / "index")
    assert index.gallery == "images" and index.count == 10 and index.ids[3] == "item3"
    assert isinstance(index.tokens.flat, np.memmap) and index.tokens.flat.dtype == np.float16
    assert np.array_equal(index.tokens.lengths, items.lengths.numpy())
    rows = index.tokens.rows(np.arange(10))
    assert torch.equal(rows.embs, items.embs[:, : rows.embs.shape[1]])
    torch.testing.assert_close(
        torch.from_numpy(np.array(index.global_embeddings)), plain_global(items), rtol=0, atol=1e-6
    )
    manifest = index.manifest
    assert manifest["tokens"] == int(items.lengths.sum()) and manifest["dim"] == 4
    assert manifest["longest"] == 6 and manifest["data"] == {"split": "test"}
    assert not [p.name for p in tmp_path.iterdir() if p.name != "index"]  # nothing beside it
    # Searched from the memory map, the index gives the in-memory search's results.
    queries = make_tokens(5, 3, case_seed(test_seed, 21), integer=True, dim=4)
    for shortlist in (4, 10):
        expected = two_stage_search(items, queries, k=3, shortlist=shortlist, **INTEGER_SCORE)
        found = two_stage_search(
            index.tokens,
            queries,
            k=3,
            shortlist=shortlist,
            gallery_global=index.global_embeddings,
            **INTEGER_SCORE,
        )
        assert torch.equal(found[1], expected[1]) and torch.equal(found[0], expected[0])


def test_an_index_is_written_whole_or_not_at_all(test_seed, tmp_path):
    path = tmp_path / "index"

    def failing():
        yield make_tokens(2, 3, 0, integer=True)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=f"cannot write {path}: no space left on device"):
        write_index(path, failing(), ["a", "b", "c"], gallery="images", source={})
    assert not list(tmp_path.iterdir())  # no index, no partial folder
    with pytest.raises(ValueError, match="the batches hold 2 items, expected 3"):
        write_index(path, iter([make_tokens(2, 3, 0, True)]), "abc", gallery="images", source={})
    assert not list(tmp_path.iterdir())
    first = write_random_index(path, case_seed(test_seed, 22))
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        write_random_index(path, case_seed(test_seed, 23))
    assert torch.equal(open_index(path).tokens.rows(np.arange(10)).embs[:, :6], first.embs)
    second = write_random_index(path, case_seed(test_seed, 23), overwrite=True)
    assert torch.equal(open_index(path).tokens.rows(np.arange(10)).embs[:, :6], second.embs)
    assert [p.name for p in tmp_path.iterdir()] == ["index"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no fastalign index"):
        write_random_index(other, 0, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_index_names_the_file(test_seed, tmp_path):
    path = tmp_path / "index"
    write_random_index(path, case_seed(test_seed, 24))
    _flip_byte(path / "tokens.f16", 7)
    with pytest.raises(ValueError, match=r"tokens\.f16 does not match its sha256"):
        open_index(path)
    open_index(path, verify=False)  # sizes and shapes only: a flipped byte passes
    with open(path / "global.npy", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match=r"global\.npy holds \d+ bytes, the manifest says"):
        open_index(path, verify=False)
    write_random_index(path, case_seed(test_seed, 24), overwrite=True)
    (path / "ids.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks ids\.json"):
        open_index(path, verify=False)
    # Offsets that do not fit the tokens, the manifest rewritten to match them.
    write_random_index(path, case_seed(test_seed, 24), overwrite=True)
    np.save(path / "offsets.npy", np.array([0, *range(2, 12)], dtype=np.int64))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["offsets.npy"]["bytes"] = (path / "offsets.npy").stat().st_size
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"offsets\.npy does not fit tokens\.f16"):
        open_index(path, verify=False)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest\.json is not valid JSON"):
        open_index(path)
    (path / "manifest.json").write_text(json.dumps(manifest | {"format": "other-1"}))
    with pytest.raises(ValueError, match="is not a fastalign-index-1 index"):
        open_index(path)
    (path / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no manifest\.json"):
        open_index(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_index(tmp_path / "nowhere")


# --------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def trained(tiny_data, tiny_config, tmp_path_factory):
    """A one-epoch run of CHAN's similarity on the tiny data: its checkpoint."""
    out = tmp_path_factory.mktemp("search") / "run"
    Trainer(tiny_config(tiny_data, out, epochs=1), progress=False).fit()
    return out / "best.pt"


@pytest.fixture(scope="module")
def indexes(trained, tmp_path_factory):
    """Indexes of the tiny test split's 12 images and 60 captions."""
    out = tmp_path_factory.mktemp("indexes")
    for gallery in ("images", "captions"):
        argv = ["index", str(trained), "--split", "test", "--out", str(out / gallery)]
        main([*argv, "--gallery", gallery, "--no-progress"])
    return out / "images", out / "captions"


def reference_search(checkpoint, gallery, queries, k):
    """The plain way: every item of the test split encoded and rounded to float16 as the
    index stores it, every pair scored by the method's similarity, a stable sort."""
    method, model, tokenizer = restore_trained(load_checkpoint(checkpoint))
    dataset = PrecompDataset(load_checkpoint(checkpoint)["data"]["root"], "test", tokenizer)
    images, captions = encode_dataset(model, dataset)
    if gallery == "images":
        images = Tokens(images.embs.half().float(), images.lengths)
        query_tokens = encode_texts(model, tokenizer, queries)
        scores = method.similarity(model, images, query_tokens).T
    else:
        captions = Tokens(captions.embs.half().float(), captions.lengths)
        query_tokens = encode_images(model, dataset.images[np.array(queries)])
        scores = method.similarity(model, query_tokens, captions)
    return stable_topk(scores, k), dataset


def printed_results(out: str) -> list[list[tuple[int, float, str, int]]]:
    """Each query's (rank, score, id, index) lines of the search's text output."""
    queries = []
    for line in out.splitlines():
        if line.startswith("query "):
            queries.append([])
        elif line.startswith("  ") and queries:
            rank, score, item, _, index = line.split()  # 1  0.4903  ID  (index 4)
            queries[-1].append((int(rank), float(score), item, int(index.strip(")"))))
    return queries


def test_search_an_image_index_by_text(capsys, trained, indexes, tiny_data):
    images, _ = indexes
    texts = read_captions(tiny_data, "test")[3:13:5]  # captions of images 0 and 2
    (scores, expected), dataset = reference_search(trained, "images", texts, 5)
    main(["search", str(images), "--text", texts[0], "--k", "5", "--no-progress"])
    (printed,) = printed_results(capsys.readouterr().out)
    assert [hit[3] for hit in printed] == expected[0].tolist()
    assert [hit[2] for hit in printed] == [dataset.image_ids[i] for i in expected[0]]
    assert [hit[1] for hit in printed] == pytest.approx(scores[0].tolist(), abs=1e-4)
    # Several queries from a file, as JSON: the same results, every score in full.
    queries = images.parent / "queries.txt"
    queries.write_text("\n".join(texts) + "\n\n")
    main(["search", str(images), "--queries", str(queries), "--k", "5", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["gallery"] == "images" and len(report["queries"]) == 2
    for row, query in enumerate(report["queries"]):
        assert query["query"] == texts[row]
        assert [hit["index"] for hit in query["results"]] == expected[row].tolist()
        assert [hit["rank"] for hit in query["results"]] == [1, 2, 3, 4, 5]
        got = [hit["score"] for hit in query["results"]]
        torch.testing.assert_close(torch.tensor(got), scores[row], rtol=0, atol=1e-5)


def test_search_a_caption_index_by_image_and_the_recall(capsys, trained, indexes):
    _, captions = indexes
    (scores, expected), _ = reference_search(trained, "captions", [2], 7)
    main(["search", str(captions), "--image-index", "2", "--k", "7", "--json", "--recall"])
    report = json.loads(capsys.readouterr().out)
    (query,) = report["queries"]
    assert [hit["index"] for hit in query["results"]] == expected[0].tolist()
    assert query["results"][0]["id"].endswith(f"#{int(expected[0, 0]) % 5}")
    assert report["recall_vs_exact"] == 1.0  # 60 captions: the shortlist of 200 is all
    # A shortlist of 8 of 60 captions: the recall printed is that of its top 7.
    argv = ["search", str(captions), "--image-index", "2", "--k", "7", "--shortlist", "8"]
    main([*argv, "--recall"])
    out = capsys.readouterr().out
    found = torch.tensor([[hit[3] for hit in printed_results(out)[0]]])
    recall = re.search(r"recall of the top 7 against the exact search .*: ([\d.]+)", out)
    assert float(recall.group(1)) == pytest.approx(topk_recall(found, expected), abs=1e-4)


def test_search_errors(capsys, trained, indexes, tmp_path):
    images, captions = indexes
    cases = [
        ([str(images)], ["one of --text"]),
        ([str(images), "--text", "a", "--image-index", "1"], ["one of --text"]),
        ([str(images), "--image-index", "1"], ["holds images", "--text"]),
        ([str(captions), "--text", "a dog"], ["holds captions", "--image-index"]),
        ([str(captions), "--image-index", "12"], ["image index 12", "12 images"]),
        ([str(images), "--text", "a", "--shortlist", "3", "--k", "4"], ["shortlist", "k = 4"]),
        ([str(images), "--text", "a", "--shortlist-index", "annoy"], ["'faiss:FACTORY'"]),
        ([str(tmp_path), "--text", "a"], ["has no manifest.json"]),
    ]
    for argv, names in cases:
        code, lines = run_main(capsys, "search", *argv)
        assert code == 2, argv
        one_error_line(lines, "search", *names)


def test_a_damaged_or_mismatched_index_is_one_error_line(capsys, trained, indexes, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(indexes[0], damaged)
    _flip_byte(damaged / "tokens.f16", 100)
    code, lines = run_main(capsys, "search", str(damaged), "--text", "a")
    assert code == 2
    one_error_line(lines, "search", str(damaged), "tokens.f16", "sha256", "rebuild")
    # Another model's checkpoint: its queries would not be the gallery's embeddings.
    checkpoint = torch.load(trained, weights_only=False)
    name = next(iter(checkpoint["model"]))
    checkpoint["model"][name] = checkpoint["model"][name] + 1
    other = tmp_path / "other.pt"
    torch.save(checkpoint, other)
    argv = ["search", str(indexes[0]), "--text", "a", "--checkpoint", str(other)]
    code, lines = run_main(capsys, *argv)
    assert code == 2
    one_error_line(lines, "search", str(other), "is not the model of index", "fastalign index")


def test_index_errors_and_overwrite(capsys, trained, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    argv = ["index", str(trained), "--split", "test", "--no-progress", "--out"]
    code, lines = run_main(capsys, *argv, str(taken), "--overwrite")
    assert code == 2
    one_error_line(lines, "index", str(taken), "holds no fastalign index")
    out = tmp_path / "index"
    main([*argv, str(out)])
    assert "index of the 12 images" in capsys.readouterr().out
    code, lines = run_main(capsys, *argv, str(out))
    assert code == 2
    one_error_line(lines, "index", str(out), "--overwrite")
    main([*argv, str(out), "--overwrite", "--gallery", "captions"])
    assert open_index(out).gallery == "captions"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "taken"]  # no partials


def test_index_and_search_progress_bars(capsys, monkeypatch, trained, tmp_path):
    monkeypatch.setattr(fastalign.progress, "_interactive", lambda: True)
    out = tmp_path / "index"
    main(["index", str(trained), "--split", "test", "--out", str(out)])
    err = capsys.readouterr().err
    for bar in ("encoding images", "sha256 tokens.f16"):
        assert bar in err, err
    main(["search", str(out), "--text", "a", "--shortlist", "5", "--k", "2"])
    err = capsys.readouterr().err
    for bar in ("sha256 tokens.f16", "global embeddings", "global shortlist", "two-stage"):
        assert bar in err, err
    main(["search", str(out), "--text", "a", "--no-progress"])
    assert capsys.readouterr().err == ""
