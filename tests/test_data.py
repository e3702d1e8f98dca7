"""fastalign.data: vocabulary, precomputed-feature datasets, loaders, word vectors."""

import json
import pickle

import numpy as np
import pytest
import torch

from fastalign.data import (
    PAD_ID,
    UNK_ID,
    CaptionSet,
    PairBatch,
    PrecompDataset,
    Vocabulary,
    collate_pairs,
    load_word_vectors,
    make_loader,
    read_captions,
    tokenize,
)

# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def caption_lines(n_images, cpi=5):
    return [
        f"image {i} caption {c} with a dog" + " x" * (c % 3)
        for i in range(n_images)
        for c in range(cpi)
    ]


def write_folder(
    root, split="train", n_images=4, regions=3, dim=5, cpi=5, dtype=np.float32, captions=None
):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ims = rng.standard_normal((n_images, regions, dim)).astype(dtype)
    np.save(root / f"{split}_ims.npy", ims)
    lines = caption_lines(n_images, cpi) if captions is None else captions
    (root / f"{split}_caps.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ims


@pytest.fixture
def vocab():
    return Vocabulary.build(caption_lines(4) + ["cat"])


# ---------------------------------------------------------------------------------------
# tokenizer and vocabulary
# ---------------------------------------------------------------------------------------


def test_tokenize():
    assert tokenize("A man's dog, on-the-run!") == ["a", "man's", "dog", "on", "the", "run"]
    assert tokenize("  'Quoted' dogs' 2 CATS_x ") == ["quoted", "dogs", "2", "cats", "x"]
    assert tokenize("Café déjà-vu") == ["café", "déjà", "vu"]
    assert tokenize("!!! ' --") == []
    with pytest.raises(TypeError):
        tokenize(3)


def test_vocabulary_build_is_deterministic():
    captions = ["the dog", "The cat and the dog.", "a bird"]
    vocab = Vocabulary.build(captions)
    assert vocab.words == ("<pad>", "<unk>", "the", "dog", "a", "and", "bird", "cat")
    assert Vocabulary.build(reversed(captions)) == vocab
    assert Vocabulary.build(captions, min_count=2).words == ("<pad>", "<unk>", "the", "dog")
    assert Vocabulary.build(captions, max_size=1).words == ("<pad>", "<unk>", "the")
    assert len(vocab) == 8 and vocab.token_to_id("<pad>") == PAD_ID == 0
    ids = vocab.encode("The zebra and dog")
    assert ids == [2, UNK_ID, 5, 3]
    assert vocab.decode(ids + [PAD_ID, PAD_ID]) == "the <unk> and dog"
    assert vocab.decode(torch.tensor([3, 0])) == "dog"
    assert vocab.encode("...") == []
    with pytest.raises(ValueError, match="out of range"):
        vocab.decode([99])
    with pytest.raises(ValueError, match="min_count"):
        Vocabulary.build(captions, min_count=0)
    with pytest.raises(TypeError, match="caption 1"):
        Vocabulary.build(["ok", 3])
    with pytest.raises(ValueError, match="repeated"):
        Vocabulary(["a", "a"])


def test_vocabulary_round_trip(tmp_path):
    vocab = Vocabulary.build(["the dog", "a café"])
    path = vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(path) == vocab
    assert Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]  # no temporary file left


@pytest.mark.parametrize(
    "content, message",
    [
        (
            '{"format": "fastalign.vocabulary", "version": 1, "words": ["<pad',
            "not valid UTF-8 JSON",
        ),
        ("[1, 2]", "expected a JSON object"),
        ('{"format": "other"}', "not a fastalign vocabulary"),
        (
            '{"format": "fastalign.vocabulary", "version": 9, "tokenizer": "x", "words": []}',
            "version 9",
        ),
        (
            '{"format": "fastalign.vocabulary", "version": 1, "tokenizer": "x", "words": []}',
            "tokenizer 'x'",
        ),
        (
            '{"format": "fastalign.vocabulary", "version": 1, '
            '"tokenizer": "lower-alnum-apostrophe-v1", "words": ["a", "b"]}',
            "first words must be",
        ),
    ],
)
def test_vocabulary_corrupt_file(tmp_path, content, message):
    path = tmp_path / "vocab.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        Vocabulary.load(path)
    assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Vocabulary.load(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------
# precomputed-feature dataset
# ---------------------------------------------------------------------------------------


def test_dataset_items_and_memmap(tmp_path, vocab):
    ims = write_folder(tmp_path, n_images=4, regions=3, dim=5)
    (tmp_path / "train_ids.txt").write_text("10\n11\n12\n13\n")
    ds = PrecompDataset(tmp_path, "train", vocab)
    assert len(ds) == 20 and ds.n_images == 4 and ds.n_regions == 3 and ds.feature_dim == 5
    assert isinstance(ds.images, np.memmap) and ds.images.dtype == np.float32
    assert ds.images.shape == (4, 3, 5)
    assert ds.image_ids == ["10", "11", "12", "13"]
    regions, ids, i, j = ds[13]
    assert (i, j) == (2, 13) and ds.image_of_caption(13) == 2
    assert list(ds.captions_of_image(2)) == [10, 11, 12, 13, 14]
    assert regions.dtype == torch.float32 and regions.shape == (3, 5)
    assert torch.equal(regions, torch.from_numpy(ims[2]))
    assert ids.dtype == torch.int64 and ids.tolist() == vocab.encode(caption_lines(4)[13])
    assert isinstance(ds.captions, CaptionSet) and ds.captions[13] == ids.tolist()
    assert len(ds.captions) == 20 and list(ds.captions.lengths) == [len(c) for c in ds.captions]
    padded, lengths = ds.captions.padded([0, 1, 2])
    assert padded.shape == (3, int(lengths.max())) and padded[0, lengths[0] :].eq(0).all()
    assert ds.image_tensor(1, 3).shape == (2, 3, 5)
    # pickling (worker processes) reopens the memory map instead of copying the array
    clone = pickle.loads(pickle.dumps(ds))
    assert isinstance(clone.images, np.memmap) and torch.equal(clone[13][0], regions)
    # max_images
    small = PrecompDataset(tmp_path, "train", vocab, max_images=2)
    assert len(small) == 10 and small.images.shape[0] == 2 and small.image_ids == ["10", "11"]


def test_dataset_float16_stays_float16_on_disk(tmp_path, vocab):
    ims = write_folder(tmp_path, dtype=np.float16)
    ds = PrecompDataset(tmp_path, "train", vocab)
    assert isinstance(ds.images, np.memmap) and ds.images.dtype == np.float16
    regions = ds[0][0]
    assert regions.dtype == torch.float32
    assert torch.equal(regions, torch.from_numpy(ims[0].astype(np.float32)))


def test_dataset_ids_per_caption_and_wrong_count(tmp_path, vocab):
    write_folder(tmp_path, n_images=2)
    (tmp_path / "train_ids.txt").write_text("\n".join(str(k // 5 + 7) for k in range(10)))
    assert PrecompDataset(tmp_path, "train", vocab).image_ids == ["7", "8"]
    (tmp_path / "train_ids.txt").write_text("1\n2\n3\n")
    with pytest.raises(ValueError, match=r"train_ids.txt: 3 ids"):
        PrecompDataset(tmp_path, "train", vocab)


def test_dataset_missing_files(tmp_path, vocab):
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        PrecompDataset(tmp_path / "nowhere", "train", vocab)
    write_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="test_caps.txt"):
        PrecompDataset(tmp_path, "test", vocab)
    (tmp_path / "train_ims.npy").unlink()
    with pytest.raises(FileNotFoundError, match="train_ims.npy"):
        PrecompDataset(tmp_path, "train", vocab)
    with pytest.raises(TypeError, match="Vocabulary"):
        PrecompDataset(tmp_path, "train", {"a": 1})


def test_dataset_caption_count_mismatch(tmp_path, vocab):
    write_folder(tmp_path, n_images=4, captions=caption_lines(3))
    with pytest.raises(ValueError, match=r"15 captions.*4 images x 5 captions per image = 20"):
        PrecompDataset(tmp_path, "train", vocab)
    write_folder(tmp_path, n_images=4, captions=caption_lines(4, cpi=2))
    with pytest.raises(ValueError, match=r"8 captions.*looks like 2 captions per image"):
        PrecompDataset(tmp_path, "train", vocab)
    assert len(PrecompDataset(tmp_path, "train", vocab, captions_per_image=2)) == 8


def test_dataset_bad_arrays(tmp_path, vocab):
    write_folder(tmp_path)
    np.save(tmp_path / "train_ims.npy", np.zeros((4, 15), np.float32))
    with pytest.raises(ValueError, match=r"train_ims.npy.*shape \(4, 15\)"):
        PrecompDataset(tmp_path, "train", vocab)
    np.save(tmp_path / "train_ims.npy", np.zeros((4, 3, 5), np.int32))
    with pytest.raises(ValueError, match=r"train_ims.npy.*floating.*int32"):
        PrecompDataset(tmp_path, "train", vocab)
    (tmp_path / "train_ims.npy").write_bytes(b"not an npy file")
    with pytest.raises(ValueError, match=r"train_ims.npy: cannot memory-map"):
        PrecompDataset(tmp_path, "train", vocab)


@pytest.mark.parametrize("bad_line", ["", "   ", "?!."])
def test_dataset_empty_caption_names_the_line(tmp_path, vocab, bad_line):
    lines = caption_lines(2)
    lines[6] = bad_line
    write_folder(tmp_path, n_images=2, captions=lines)
    with pytest.raises(ValueError, match=r"train_caps.txt:7: empty caption"):
        PrecompDataset(tmp_path, "train", vocab)


def test_trailing_blank_lines_are_ignored(tmp_path, vocab):
    write_folder(tmp_path, n_images=2, captions=caption_lines(2) + ["", "  "])
    assert len(PrecompDataset(tmp_path, "train", vocab)) == 10
    assert len(read_captions(tmp_path / "train_caps.txt")) == 10
    assert read_captions(tmp_path, "train") == caption_lines(2)


def test_coco_1k_folds(tmp_path):
    vocab = Vocabulary.build(["image caption"])
    captions = [f"image {i} caption {c}" for i in range(2500) for c in range(5)]
    ims = write_folder(tmp_path, "testall", n_images=2500, regions=1, dim=2, captions=captions)
    full = PrecompDataset(tmp_path, "testall", vocab)
    assert full.num_folds() == 2
    fold = full.fold_1k(1)
    assert fold.n_images == 1000 and len(fold) == 5000
    assert isinstance(fold.images, np.memmap)
    assert np.array_equal(fold.images, ims[1000:2000])
    assert fold.captions[0] == full.captions[5000] and fold.captions[4999] == full.captions[9999]
    regions, ids, i, j = fold[7]
    assert (i, j) == (1, 7) and torch.equal(regions, full[5007][0])
    assert torch.equal(ids, full[5007][1])
    clone = pickle.loads(pickle.dumps(fold))
    assert np.array_equal(clone.images, ims[1000:2000])
    with pytest.raises(ValueError, match=r"fold 2 does not exist: 2500 images make 2 complete"):
        full.fold_1k(2)


# ---------------------------------------------------------------------------------------
# collate and loader
# ---------------------------------------------------------------------------------------


def test_collate_pads_captions_and_regions():
    items = [
        (torch.ones(4, 3), torch.tensor([5, 6, 7]), 0, 0),
        (torch.ones(4, 3, dtype=torch.float64), torch.tensor([8]), 0, 1),
        (torch.ones(2, 3), torch.tensor([9, 10, 11, 12, 13]), 1, 5),
    ]
    batch = collate_pairs(items)
    assert isinstance(batch, PairBatch)
    assert batch.regions.shape == (3, 4, 3) and batch.regions.dtype == torch.float32
    assert batch.region_lengths.tolist() == [4, 4, 2]
    assert batch.regions[2, 2:].eq(0).all()
    assert batch.captions.tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0], [9, 10, 11, 12, 13]]
    assert batch.caption_lengths.tolist() == [3, 1, 5]
    assert batch.image_index.tolist() == [0, 0, 1] and batch.caption_index.tolist() == [0, 1, 5]
    for t in batch:
        assert t.dtype in (torch.float32, torch.int64)
    assert batch.to("cpu").captions.equal(batch.captions)
    with pytest.raises(ValueError, match="empty batch"):
        collate_pairs([])
    with pytest.raises(ValueError, match="at least one token"):
        collate_pairs([(torch.ones(2, 3), torch.tensor([], dtype=torch.int64), 0, 0)])


def test_loader_batches_and_determinism(tmp_path, vocab):
    write_folder(tmp_path, n_images=3)  # 15 captions
    ds = PrecompDataset(tmp_path, "train", vocab)

    def epochs(loader, n):
        return [torch.cat([b.caption_index for b in loader]).tolist() for _ in range(n)]

    loader = make_loader(ds, batch_size=4, shuffle=True, seed=3)
    batches = list(make_loader(ds, batch_size=4, shuffle=True, seed=3))
    assert [len(b.caption_index) for b in batches] == [4, 4, 4, 3]
    first = batches[0]
    assert first.regions.shape == (4, 3, 5) and first.region_lengths.tolist() == [3] * 4
    assert torch.equal(first.image_index, first.caption_index // 5)
    a = epochs(loader, 3)
    assert a == epochs(make_loader(ds, 4, True, seed=3), 3)
    assert sorted(a[0]) == list(range(15)) and a[0] != a[1] != a[2]
    again = make_loader(ds, 4, True, seed=3)
    again.sampler.set_epoch(2)
    assert epochs(again, 1)[0] == a[2]
    assert epochs(make_loader(ds, 4, True, seed=4), 1)[0] != a[0]
    assert epochs(make_loader(ds, 4, False, seed=3), 1)[0] == list(range(15))
    assert len(list(make_loader(ds, 4, True, seed=3, drop_last=True))) == 3


# ---------------------------------------------------------------------------------------
# word vectors
# ---------------------------------------------------------------------------------------


def test_word_vectors(tmp_path):
    vocab = Vocabulary(["the", "dog", "zebra", "paris"])
    path = tmp_path / "glove.txt"
    path.write_text(
        "the 1 2 3\nother 0 0 0\nParis 7 8 9\ndog 4 5 6\nthe 9 9 9\n. . . 1 1 1\n\n",
        encoding="utf-8",
    )
    vectors, n_found = load_word_vectors(path, vocab)
    assert vectors.shape == (6, 3) and vectors.dtype == torch.float32
    assert n_found == 3  # the, dog, paris (through its cased line); zebra missing
    assert vectors[PAD_ID].eq(0).all()
    assert vectors[2].tolist() == [1, 2, 3] and vectors[3].tolist() == [4, 5, 6]
    assert vectors[5].tolist() == [7, 8, 9]
    assert 0 < vectors[4].norm() < 3  # small random vector
    again, _ = load_word_vectors(path, vocab, dim=3)
    assert torch.equal(again, vectors)  # seeded
    other, _ = load_word_vectors(path, vocab, seed=1)
    assert not torch.equal(other[4], vectors[4])
    header = tmp_path / "header.txt"
    header.write_text("2 3\nthe 1 2 3\ndog 4 5 6\n", encoding="utf-8")
    assert load_word_vectors(header, vocab)[1] == 2


@pytest.mark.parametrize(
    "content, dim, message",
    [
        ("", None, "empty word vector file"),
        ("\n  \n", None, "empty word vector file"),
        ("the 1 2 3\ndog 4 5\n", None, r":2: expected 3 values \(the vector on line 1\), got 2"),
        ("the 1 2 3\ndog 4 5 6 7\n", None, r":2: expected 3 values .*got 4"),
        ("the 1 2 3\ndog 4 x 6\n", None, r":2: non-numeric value 'x'"),
        ("the 1 2 3\ndog 4 nan 6\n", None, r":2: non-finite"),
        ("the\n", None, r":1: expected 'word v1 ... vD'"),
        ("the 1 2 3\n", 4, r":1: expected 4 values \(dim=4\), got 3"),
        ("2 3\nthe 1 2 3\ndog 1 2\n", None, r":3: expected 3 values \(the header on line 1\)"),
    ],
)
def test_word_vector_errors(tmp_path, content, dim, message):
    path = tmp_path / "bad.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        load_word_vectors(path, Vocabulary(["the", "dog"]), dim=dim)
    assert "bad.txt" in str(info.value)


def test_word_vectors_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.txt"):
        load_word_vectors(tmp_path / "nothing.txt", Vocabulary(["a"]))
