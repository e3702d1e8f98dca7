"""fastalign.data.knowledge (MASK / MACK knowledge folders) and read_word_vectors.

Random data are drawn from the test seed (FASTALIGN_TEST_SEED draws new ones; every
message names it) and written to tmp_path in the on-disk format of SPEC section 3.
"""

import dataclasses
import re

import numpy as np
import pytest
import torch

from fastalign.data import (
    GLOVE_FILE,
    CaptionWords,
    Knowledge,
    KnowledgeBatch,
    KnowledgeLoader,
    Vocabulary,
    ensure_synthetic,
    load_word_vectors,
    map_caption_words,
    open_knowledge,
    read_captions,
    read_word_vectors,
    word_prototypes,
)

WORD_DIM = 4

# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def draw_words(rng, n_rows, n_words):
    """Row words naming every one of ``n_words`` concepts at least once, in random order."""
    words = [f"w{k:02d}" for k in range(n_words)]
    rows = np.concatenate([np.arange(n_words), rng.integers(0, n_words, n_rows - n_words)])
    return [words[k] for k in rng.permutation(rows)]


def write_glove(path, words, rng, dim=WORD_DIM, extra=()):
    """A GloVe file with a vector for each of ``words`` (and ``extra``); returns them."""
    vectors = {w: rng.standard_normal(dim).astype(np.float32) for w in [*words, *extra]}
    lines = [w + " " + " ".join(repr(float(x)) for x in v) for w, v in vectors.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return vectors


def write_knowledge(root, rng, n_rows=57, feature_dim=13, n_words=9, dtype=np.float32):
    """A knowledge folder and a word-vector file; returns (folder, glove path, regions in
    float64, row words, {word: vector})."""
    folder = root / "knowledge"
    folder.mkdir(parents=True)
    regions = rng.standard_normal((n_rows, feature_dim)).astype(dtype)
    np.save(folder / "regions.npy", regions)
    words = draw_words(rng, n_rows, n_words)
    (folder / "words.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    glove = root / "glove.txt"
    vectors = write_glove(glove, sorted(set(words)), rng, extra=("zebra", "kite"))
    return folder, glove, regions.astype(np.float64), words, vectors


def direct_means(features, words):
    """The per-word mean on the full array, by boolean masks: the reference."""
    names = sorted(set(words))
    column = np.array(words)
    return np.stack([features[column == w].mean(axis=0) for w in names])


class RecordingArray(np.ndarray):
    """A regions array that records the keys it is indexed with (read-pattern checks)."""

    def __getitem__(self, key):
        self.keys.append(key)
        return np.asarray(self)[key]


def recording(knowledge):
    regions = np.asarray(knowledge.regions).view(RecordingArray)
    regions.keys = []
    return dataclasses.replace(knowledge, regions=regions), regions.keys


@pytest.fixture
def knowledge(tmp_path, test_seed):
    rng = np.random.default_rng([test_seed, 1])
    folder, glove, regions, words, vectors = write_knowledge(tmp_path, rng, n_rows=101)
    return open_knowledge(folder, glove), regions, words, vectors


# ---------------------------------------------------------------------------------------
# open_knowledge
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_open_knowledge(tmp_path, test_seed, dtype):
    rng = np.random.default_rng([test_seed, 2])
    folder, glove, regions, words, vectors = write_knowledge(tmp_path, rng, dtype=dtype)
    k = open_knowledge(folder, glove, dim=WORD_DIM)
    message = f"FASTALIGN_TEST_SEED={test_seed}"
    assert isinstance(k, Knowledge) and k.folder == folder
    assert isinstance(k.regions, np.memmap) and k.regions.dtype == dtype, message
    assert not k.regions.flags.writeable
    assert (k.n_rows, k.feature_dim, k.n_concepts) == (57, 13, 9)
    assert k.words == tuple(sorted(set(words)))
    assert k.row_concepts.dtype == np.int64 and k.counts.dtype == np.int64
    assert [k.words[c] for c in k.row_concepts] == words, message
    assert k.counts.tolist() == [words.count(w) for w in k.words]
    assert k.word_index == {w: i for i, w in enumerate(k.words)}
    assert k.word_vectors.dtype == torch.float32 and k.word_vectors.shape == (9, WORD_DIM)
    assert torch.equal(k.word_vectors, torch.from_numpy(np.stack([vectors[w] for w in k.words])))
    assert np.array_equal(k.regions, regions.astype(dtype))
    assert "57 rows x 13" in repr(k) and "9 concepts" in repr(k)


def test_open_knowledge_tolerates_spaces_and_trailing_blank_lines(tmp_path, test_seed):
    rng = np.random.default_rng([test_seed, 3])
    folder, glove, _, words, _ = write_knowledge(tmp_path, rng)
    (folder / "words.txt").write_text(
        "\n".join(f"  {w}\t" for w in words) + "\n\n \n", encoding="utf-8"
    )
    k = open_knowledge(folder, glove)
    assert [k.words[c] for c in k.row_concepts] == words


def _break(case, folder, glove):
    """Damage a good knowledge folder (57 rows, 9 words w00..w08) as ``case`` says."""
    regions, words = folder / "regions.npy", folder / "words.txt"
    lines = words.read_text().splitlines()
    if case == "missing folder":
        return folder.parent / "nowhere", glove
    if case == "missing regions":
        regions.unlink()
    elif case == "missing words":
        words.unlink()
    elif case == "missing word vectors":
        glove = glove.parent / "nothing.txt"
    elif case == "empty regions file":
        regions.write_bytes(b"")
    elif case == "zero rows":
        np.save(regions, np.zeros((0, 13), np.float16))
    elif case == "3-D regions":
        np.save(regions, np.zeros((57, 1, 13), np.float16))
    elif case == "float64 regions":
        np.save(regions, np.zeros((57, 13), np.float64))
    elif case == "int regions":
        np.save(regions, np.zeros((57, 13), np.int8))
    elif case == "fortran order":
        np.save(regions, np.asfortranarray(np.zeros((57, 13), np.float32)))
    elif case == "empty words file":
        words.write_text("")
    elif case == "more words than rows":
        words.write_text("\n".join([*lines, "w00"]) + "\n")
    elif case == "fewer words than rows":
        words.write_text("\n".join(lines[:-2]) + "\n")
    elif case == "blank line":
        words.write_text("\n".join([*lines[:4], "   ", *lines[5:]]) + "\n")
    elif case == "not utf-8":
        words.write_bytes(b"w00\n\xff\xfe\n")
    elif case == "words without a vector":
        text = glove.read_text().splitlines()
        glove.write_text("\n".join(t for t in text if not t.startswith(("w03 ", "w07 "))) + "\n")
    elif case == "many words without a vector":
        glove.write_text("zebra 1 2 3 4\n")
    elif case == "wrong dim":
        pass
    return folder, glove


MALFORMED = {
    "missing folder": (FileNotFoundError, r"knowledge folder not found: .*nowhere"),
    "missing regions": (FileNotFoundError, r"regions file not found: .*regions\.npy"),
    "missing words": (FileNotFoundError, r"words file not found: .*words\.txt"),
    "missing word vectors": (FileNotFoundError, r"word vector file not found: .*nothing\.txt"),
    "empty regions file": (ValueError, r"regions\.npy: cannot memory-map .*expected an \(n_rows"),
    "zero rows": (ValueError, r"regions\.npy: empty region array of shape \(0, 13\)"),
    "3-D regions": (ValueError, r"regions\.npy: expected an \(n_rows, .*\(57, 1, 13\) \(3-D\)"),
    "float64 regions": (
        ValueError,
        r"regions\.npy: expected dtype float16 or float32, got float64",
    ),
    "int regions": (ValueError, r"regions\.npy: expected dtype float16 or float32, got int8"),
    "fortran order": (ValueError, r"regions\.npy: stored in Fortran"),
    "empty words file": (ValueError, r"words\.txt: no words"),
    "more words than rows": (ValueError, r"regions\.npy has 57 rows but words\.txt has 58 words"),
    "fewer words than rows": (ValueError, r"regions\.npy has 57 rows but words\.txt has 55 words"),
    "blank line": (ValueError, r"words\.txt:5: empty word"),
    "not utf-8": (ValueError, r"words\.txt: not valid UTF-8"),
    "words without a vector": (ValueError, r"glove\.txt: 2 of the 9 concept words .*'w03', 'w07'"),
    "many words without a vector": (
        ValueError,
        r"9 of the 9 concept words .*have no vector: 'w00', .*'w08'; expected",
    ),
    "wrong dim": (ValueError, r"glove\.txt:1: expected 5 values \(dim=5\), got 4"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_knowledge(tmp_path, test_seed, case):
    rng = np.random.default_rng([test_seed, 4])
    folder, glove, *_ = write_knowledge(tmp_path, rng, dtype=np.float16)
    folder, glove = _break(case, folder, glove)
    error, message = MALFORMED[case]
    with pytest.raises(error, match=message):
        open_knowledge(folder, glove, dim=5 if case == "wrong dim" else None)


def test_missing_vectors_named_up_to_ten(tmp_path, test_seed):
    rng = np.random.default_rng([test_seed, 5])
    folder, glove, *_ = write_knowledge(tmp_path, rng, n_rows=40, n_words=14)
    glove.write_text("zebra 1 2 3 4\n")
    with pytest.raises(ValueError, match=r"14 of the 14 .*'w09', \.\.\. \(4 more\)") as info:
        open_knowledge(folder, glove)
    assert "w10" not in str(info.value)


# ---------------------------------------------------------------------------------------
# word_prototypes
# ---------------------------------------------------------------------------------------


def tanh_projection(seed, feature_dim, out_dim):
    weight = torch.randn(feature_dim, out_dim, generator=torch.Generator().manual_seed(seed))
    return lambda chunk: torch.tanh(chunk @ weight), weight


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("n_rows, feature_dim, n_words", [(1, 3, 1), (97, 13, 11), (250, 7, 31)])
def test_word_prototypes_match_direct_mean(
    tmp_path, test_seed, dtype, n_rows, feature_dim, n_words
):
    rng = np.random.default_rng([test_seed, 6, n_rows])
    folder, glove, regions, words, _ = write_knowledge(
        tmp_path, rng, n_rows, feature_dim, n_words, dtype
    )
    k = open_knowledge(folder, glove)
    want = direct_means(regions, words)
    transform, weight = tanh_projection(test_seed, feature_dim, 5)
    projected = torch.tanh(torch.from_numpy(regions).float() @ weight).double().numpy()
    want_transformed = direct_means(projected, words)
    for chunk_rows in (1, 2, 16, n_rows, n_rows + 3):
        message = f"FASTALIGN_TEST_SEED={test_seed}, {dtype.__name__}, chunk_rows={chunk_rows}"
        got = word_prototypes(k, chunk_rows=chunk_rows)
        assert got.dtype == torch.float32 and got.shape == (n_words, feature_dim), message
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6, err_msg=message)
        got = word_prototypes(k, transform, chunk_rows=chunk_rows)
        assert got.shape == (n_words, 5), message
        np.testing.assert_allclose(got.numpy(), want_transformed, atol=2e-6, err_msg=message)


def test_word_prototypes_reads_in_file_order(knowledge):
    # sequential reads are the point: one forward pass of contiguous slices, never a gather
    k, regions, words, _ = knowledge
    spy, keys = recording(k)
    chunks = []
    got = word_prototypes(spy, lambda x: chunks.append(len(x)) or x, chunk_rows=30)
    assert keys == [slice(0, 30), slice(30, 60), slice(60, 90), slice(90, 101)]
    assert chunks == [30, 30, 30, 11]
    np.testing.assert_allclose(got.numpy(), direct_means(regions, words), atol=1e-6)


def test_word_prototypes_progress_and_grad(knowledge):
    k, regions, words, _ = knowledge
    linear = torch.nn.Linear(k.feature_dim, 3)
    got = word_prototypes(k, linear, chunk_rows=8, progress=True)  # no bar: not a terminal
    assert not got.requires_grad and got.shape == (k.n_concepts, 3)
    with torch.no_grad():
        want = direct_means(linear(torch.from_numpy(regions).float()).double().numpy(), words)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


@pytest.mark.parametrize(
    "transform, chunk_rows, message",
    [
        (None, 0, r"chunk_rows must be an int >= 1, got 0"),
        (None, True, r"chunk_rows must be an int >= 1, got True"),
        (None, 2.5, r"chunk_rows must be an int >= 1, got 2.5"),
        (lambda x: x.numpy(), 8, r"transform must return a Tensor, got ndarray"),
        (lambda x: x[:-1], 8, r"transform must return shape \(8, D'\) for a chunk of 8 rows, got"),
        (lambda x: x.sum(1), 8, r"shape \(8, D'\) for a chunk of 8 rows, got \(8,\)"),
        (lambda x: x.long(), 8, r"floating-point tensor, got torch.int64"),
        (lambda x: x[:, : 1 + (len(x) < 8)], 8, r"returned 2 columns, expected 1 as for the first"),
    ],
)
def test_word_prototypes_errors(knowledge, transform, chunk_rows, message):
    with pytest.raises(ValueError, match=message):
        word_prototypes(knowledge[0], transform, chunk_rows=chunk_rows)
    with pytest.raises(TypeError, match="knowledge must be a Knowledge"):
        word_prototypes(knowledge[0].regions)


# ---------------------------------------------------------------------------------------
# KnowledgeLoader
# ---------------------------------------------------------------------------------------


def epoch_rows(loader):
    return torch.cat([batch.rows for batch in loader]).tolist()


@pytest.mark.parametrize("batch_size, chunk_rows", [(7, 16), (16, 16), (40, 9), (1, 1), (200, 500)])
def test_loader_visits_every_row_once(knowledge, test_seed, batch_size, chunk_rows):
    k, regions, words, _ = knowledge
    loader = KnowledgeLoader(k, batch_size, seed=test_seed, chunk_rows=chunk_rows)
    message = f"FASTALIGN_TEST_SEED={test_seed}, batch_size={batch_size}, chunk_rows={chunk_rows}"
    assert len(loader) == -(-101 // batch_size)
    batches = list(loader)
    assert len(batches) == len(loader), message
    assert all(len(b.rows) == batch_size for b in batches[:-1]), message
    rows = torch.cat([b.rows for b in batches])
    assert sorted(rows.tolist()) == list(range(101)), message
    for b in batches:
        assert isinstance(b, KnowledgeBatch)
        assert b.regions.dtype == torch.float32 and b.regions.shape == (len(b.rows), 13)
        assert b.concepts.dtype == torch.int64 and b.rows.dtype == torch.int64
        assert np.array_equal(b.regions.numpy(), np.asarray(k.regions)[b.rows.numpy()]), message
        assert [k.words[c] for c in b.concepts] == [words[r] for r in b.rows], message


def test_loader_order_is_a_function_of_seed_and_epoch(knowledge, test_seed):
    k = knowledge[0]
    loader = KnowledgeLoader(k, 10, seed=test_seed, chunk_rows=16)
    first, second = epoch_rows(loader), epoch_rows(loader)  # epochs 0 and 1
    message = f"FASTALIGN_TEST_SEED={test_seed}"
    assert first != second and sorted(first) == sorted(second), message
    again = KnowledgeLoader(k, 10, seed=test_seed, chunk_rows=16)
    again.set_epoch(1)
    assert epoch_rows(again) == second and again.epoch == 2, message
    again.set_epoch(0)
    assert epoch_rows(again) == first, message
    assert epoch_rows(KnowledgeLoader(k, 10, seed=test_seed + 1, chunk_rows=16)) != first
    # the batch size cuts the same stream of rows
    assert epoch_rows(KnowledgeLoader(k, 33, seed=test_seed, chunk_rows=16)) == first
    assert first != list(range(101))
    assert epoch_rows(KnowledgeLoader(k, 10, test_seed, shuffle=False)) == list(range(101))


def test_loader_reads_whole_blocks_once(knowledge, test_seed):
    # each block of chunk_rows rows is read once, with one contiguous slice, and its rows are
    # used before the next block's: memory O(chunk_rows * F), reads sequential
    spy, keys = recording(knowledge[0])
    loader = KnowledgeLoader(spy, 10, seed=test_seed, chunk_rows=16)
    batches = list(loader)
    starts = [key.start for key in keys]
    assert all(isinstance(key, slice) and key.step is None for key in keys)
    assert sorted(starts) == list(range(0, 101, 16))
    assert all(key.stop == min(key.start + 16, 101) for key in keys)
    assert starts != sorted(starts), f"FASTALIGN_TEST_SEED={test_seed}: blocks in file order"
    # the stream of rows is the blocks one after the other, in the order they were read
    blocks = (torch.cat([b.rows for b in batches]) // 16).tolist()
    runs = [b for i, b in enumerate(blocks) if i == 0 or b != blocks[i - 1]]
    assert runs == [start // 16 for start in starts]


def test_loader_drop_last(knowledge, test_seed):
    k = knowledge[0]
    loader = KnowledgeLoader(k, 25, seed=test_seed, drop_last=True, chunk_rows=16)
    batches = list(loader)
    assert len(loader) == len(batches) == 4 and {len(b.rows) for b in batches} == {25}
    kept = KnowledgeLoader(k, 25, seed=test_seed, chunk_rows=16)
    assert (
        len(kept) == 5 and epoch_rows(kept)[:100] == torch.cat([b.rows for b in batches]).tolist()
    )
    assert list(KnowledgeLoader(k, 200, seed=0, drop_last=True)) == []


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(batch_size=0), r"batch_size must be an int >= 1, got 0"),
        (dict(chunk_rows=-1), r"chunk_rows must be an int >= 1, got -1"),
        (dict(seed=1.5), r"seed must be an int, got 1.5"),
    ],
)
def test_loader_errors(knowledge, options, message):
    with pytest.raises(ValueError, match=message):
        KnowledgeLoader(knowledge[0], **{"batch_size": 4, "seed": 0, **options})
    with pytest.raises(ValueError, match="epoch must be an int >= 0"):
        KnowledgeLoader(knowledge[0], 4, seed=0).set_epoch(-1)


# ---------------------------------------------------------------------------------------
# map_caption_words
# ---------------------------------------------------------------------------------------


def test_map_caption_words(knowledge, tmp_path):
    k, _, _, vectors = knowledge
    glove = tmp_path / "glove.txt"
    with glove.open("a", encoding="utf-8") as f:
        f.write("Kite 9 9 9 9\nBoat 1 2 3 4\n")  # kite: exact line first; boat: lower-cased
    captions = ["W00 and a zebra, w01!", "the kite w00 w00", "a boat near a thing", "..."]
    got = map_caption_words(k, captions, glove)
    assert isinstance(got, CaptionWords)
    assert got.known == ("w00", "w01")
    assert got.oov == ("boat", "kite", "zebra")
    assert got.oov_vectors.dtype == torch.float32
    assert got.oov_vectors[0].tolist() == [1, 2, 3, 4]
    assert torch.equal(got.oov_vectors[1], torch.from_numpy(vectors["kite"]))
    assert torch.equal(got.oov_vectors[2], torch.from_numpy(vectors["zebra"]))
    assert got.dropped == {"a": 3, "and": 1, "the": 1, "near": 1, "thing": 1}
    counts = (got.n_tokens, got.n_known_tokens, got.n_oov_tokens, got.n_dropped_tokens)
    assert counts == (14, 4, 3, 7)
    assert got.summary() == (
        "caption words: 2 known (28.6% of tokens), 3 out of the knowledge with a word vector "
        "(21.4%), 5 dropped (50.0%; most frequent: a, and, near)"
    )

    plain = map_caption_words(k, captions, None, oov=False)
    assert plain.known == got.known and plain.oov == () and plain.oov_vectors.shape == (0, 4)
    assert plain.dropped == {**got.dropped, "boat": 1, "kite": 1, "zebra": 1}
    assert (plain.n_oov_tokens, plain.n_dropped_tokens) == (0, 10)

    empty = map_caption_words(k, [], glove)
    assert empty.summary() == (
        "caption words: 0 known (0.0% of tokens), 0 out of the knowledge with a word vector "
        "(0.0%), 0 dropped (0.0%)"
    )


def test_map_caption_words_errors(knowledge, tmp_path):
    k = knowledge[0]
    with pytest.raises(TypeError, match="got a single str"):
        map_caption_words(k, "a caption", tmp_path / "glove.txt")
    with pytest.raises(TypeError, match="caption 1 must be a str"):
        map_caption_words(k, ["a", 3], tmp_path / "glove.txt")
    with pytest.raises(ValueError, match="word_vectors_path is needed"):
        map_caption_words(k, ["a"], None)
    other = tmp_path / "other.txt"
    other.write_text("boat 1 2 3\n")
    with pytest.raises(ValueError, match=r"other\.txt:1: expected 4 values \(dim=4\), got 3"):
        map_caption_words(k, ["a boat"], other)


# ---------------------------------------------------------------------------------------
# read_word_vectors
# ---------------------------------------------------------------------------------------


def test_read_word_vectors_agrees_with_load_word_vectors(tmp_path, test_seed):
    rng = np.random.default_rng([test_seed, 7])
    lines = ["300 4"]  # word2vec header (count ignored)
    for k in range(60):
        word = f"w{k}" if k % 4 else f"W{k}"  # cased lines: matched through lower-casing
        lines.append(word + " " + " ".join(f"{x:.4f}" for x in rng.standard_normal(4)))
        if k % 7 == 0:
            lines.append(f"w{k} 0 0 0 0")  # a second line for a word: the first wins
    lines.insert(10, "new york 1 2 3 4")  # a word with a space
    path = tmp_path / "glove.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    wanted = [f"w{k}" for k in rng.permutation(80)] + ["W0", "new", "w3"]
    got = read_word_vectors(path, wanted, dim=4)
    vocab = Vocabulary(dict.fromkeys(wanted))
    matrix, n_found = load_word_vectors(path, vocab)
    message = f"FASTALIGN_TEST_SEED={test_seed}"
    assert len(got) == n_found == 61, message  # w0..w59 and W0
    assert list(got) == [w for w in dict.fromkeys(wanted) if w in got], message  # first order
    for word, vector in got.items():
        assert vector.dtype == np.float32 and vector.shape == (4,)
        assert np.array_equal(vector, matrix[vocab.token_to_id(word)].numpy()), (message, word)
    assert "new" not in got and "w70" not in got
    assert read_word_vectors(path, []) == {}


@pytest.mark.parametrize(
    "content, dim, message",
    [
        ("", None, "empty word vector file"),
        ("the 1 2 3\ndog 4 5\n", None, r":2: expected 3 values \(the vector on line 1\), got 2"),
        ("the 1 2 3\ndog 4 x 6\n", None, r":2: non-numeric value 'x'"),
        ("the 1 2 3\n", 4, r":1: expected 4 values \(dim=4\), got 3"),
    ],
)
def test_read_word_vectors_errors_match_load_word_vectors(tmp_path, content, dim, message):
    path = tmp_path / "bad.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as read:
        read_word_vectors(path, ["the", "dog"], dim=dim)
    with pytest.raises(ValueError) as load:
        load_word_vectors(path, Vocabulary(["the", "dog"]), dim=dim)
    assert str(read.value) == str(load.value)
    with pytest.raises(TypeError, match="single str"):
        read_word_vectors(path, "the")
    with pytest.raises(ValueError, match="dim must be None or an int >= 1"):
        read_word_vectors(path, ["the"], dim=0)
    with pytest.raises(FileNotFoundError, match="word vector file not found"):
        read_word_vectors(tmp_path / "none.txt", ["the"])


# ---------------------------------------------------------------------------------------
# the synthetic dataset's knowledge folder
# ---------------------------------------------------------------------------------------


def test_synthetic_knowledge(tmp_path):
    root = ensure_synthetic(
        tmp_path,
        "easy",
        seed=3,
        n_train=12,
        n_val=2,
        n_test=2,
        n_concepts=6,
        n_regions=6,
        feature_dim=16,
        word_dim=8,
        captions_per_image=2,
    )
    k = open_knowledge(root / "knowledge", root / GLOVE_FILE, dim=8)
    assert k.regions.dtype == np.float16 and k.feature_dim == 16 and k.n_concepts >= 1
    assert int(k.counts.sum()) == k.n_rows
    prototypes = word_prototypes(k, chunk_rows=5)
    want = direct_means(np.asarray(k.regions, np.float64), [k.words[c] for c in k.row_concepts])
    np.testing.assert_allclose(prototypes.numpy(), want, atol=1e-6)
    batches = list(KnowledgeLoader(k, 8, seed=0, chunk_rows=4))
    assert sorted(torch.cat([b.rows for b in batches]).tolist()) == list(range(k.n_rows))
    # every caption word has a vector in glove_synthetic.txt: nothing is dropped
    words = map_caption_words(k, read_captions(root, "train"), root / GLOVE_FILE)
    assert words.n_dropped_tokens == 0 and words.n_known_tokens > 0
    assert set(words.known) <= set(k.words) and not set(words.oov) & set(k.words)
    assert re.match(r"caption words: \d+ known \(\d+\.\d% of tokens\)", words.summary())
