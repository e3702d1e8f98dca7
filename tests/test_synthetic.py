"""fastalign.data.synthetic (presets, folder identity, knowledge) and data_fingerprint."""

import hashlib
import json
import re

import numpy as np
import pytest

from fastalign.data import (
    PRESETS,
    PrecompDataset,
    Vocabulary,
    data_fingerprint,
    ensure_synthetic,
    generate_synthetic,
    load_word_vectors,
    read_captions,
    synthetic,
    synthetic_folder,
)

SMALL = dict(
    n_train=24,
    n_val=6,
    n_test=8,
    n_concepts=12,
    n_regions=10,
    feature_dim=256,
    word_dim=32,
)
HARD_SMALL = dict(n_train=60, n_val=10, n_test=40, n_regions=12, feature_dim=128, word_dim=24)

# the data files of generate_synthetic(root, seed=5, **SMALL) as the generator wrote them
# before the presets: the easy preset must keep writing the same bytes
EASY_SMALL_SEED5_DIGEST = "0f3ba5a5ae502e2a466a2dcc674b17c624cb750ad43f76f84e2a254c878acc1e"
NEW_FILES = ("meta.json", "README.txt", "knowledge/regions.npy", "knowledge/words.txt")


def folder_bytes(root):
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def words_of(path):
    return [line.split() for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("hard") / "h", "hard", seed=2, **HARD_SMALL)


def test_easy_bytes_unchanged(tmp_path):
    root = generate_synthetic(tmp_path / "a", seed=5, **SMALL)
    files = folder_bytes(root)
    lines = "".join(
        f"{name}:{hashlib.sha256(data).hexdigest()}\n"
        for name, data in sorted(files.items())
        if name not in NEW_FILES
    )
    assert set(files) >= set(NEW_FILES)
    assert hashlib.sha256(lines.encode()).hexdigest() == EASY_SMALL_SEED5_DIGEST
    assert generate_synthetic(tmp_path / "b", "easy", 5, **SMALL) == tmp_path / "b"
    assert folder_bytes(tmp_path / "b") == files


def test_synthetic_is_deterministic_and_atomic(tmp_path):
    a = generate_synthetic(tmp_path / "a", seed=5, **SMALL)
    b = generate_synthetic(tmp_path / "b", seed=5, **SMALL)
    c = generate_synthetic(tmp_path / "c", seed=6, **SMALL)
    files_a = folder_bytes(a)
    assert files_a == folder_bytes(b)
    assert files_a["train_ims.npy"] != folder_bytes(c)["train_ims.npy"]
    assert files_a["train_caps.txt"] != folder_bytes(c)["train_caps.txt"]
    for split in ("train", "dev", "test"):
        for suffix in ("_ims.npy", "_caps.txt", "_ids.txt"):
            assert split + suffix in files_a
    assert {"glove_synthetic.txt", "meta.json", "README.txt"} <= set(files_a)
    meta = json.loads(files_a["meta.json"])
    assert meta["seed"] == 5 and meta["params"]["n_train"] == 24
    assert meta["preset"] == "easy" and meta["params"]["preset"] == "easy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp folders
    ims = np.load(a / "train_ims.npy", mmap_mode="r")
    assert ims.dtype == np.float32 and ims.shape == (24, 10, 256)
    # regenerating over an existing synthetic folder replaces it with the same bytes
    generate_synthetic(a, seed=5, **SMALL)
    assert folder_bytes(a) == files_a
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_presets_and_errors(tmp_path):
    assert set(PRESETS) == {"easy", "hard"}
    assert set(PRESETS["easy"]) == set(PRESETS["hard"])
    with pytest.raises(ValueError, match="easy, hard"):
        generate_synthetic(tmp_path / "x", "medium")
    with pytest.raises(ValueError, match="easy, hard"):
        synthetic_folder(tmp_path, "medium")
    with pytest.raises(ValueError, match="easy, hard"):
        ensure_synthetic(tmp_path, preset="medium")
    with pytest.raises(TypeError, match="unknown"):
        generate_synthetic(tmp_path / "x", n_images=3)
    with pytest.raises(ValueError, match="style_fraction"):
        generate_synthetic(tmp_path / "x", style_fraction=1.5)
    with pytest.raises(ValueError, match="synonyms"):
        generate_synthetic(tmp_path / "x", synonyms=(3, 1))
    assert not (tmp_path / "x").exists()


def test_folder_naming(tmp_path, monkeypatch):
    easy = PRESETS["easy"]
    default = synthetic_folder(tmp_path, "easy", 0)
    sizes = f"{easy['n_train']}x{easy['n_val']}x{easy['n_test']}"
    assert re.fullmatch(rf"easy-seed0-{sizes}-[0-9a-f]{{8}}", default.name)
    assert default.parent == tmp_path
    assert synthetic_folder(tmp_path, "easy", 0, n_train=easy["n_train"]) == default
    hard = synthetic_folder(tmp_path, "hard", 3, n_train=10, n_val=2, n_test=4)
    assert re.fullmatch(r"hard-seed3-10x2x4-[0-9a-f]{8}", hard.name)
    small = synthetic_folder(tmp_path, "easy", 1, **SMALL)
    assert re.fullmatch(r"easy-seed1-24x6x8-[0-9a-f]{8}", small.name)
    assert small == synthetic_folder(tmp_path, seed=1, **SMALL)
    other = synthetic_folder(tmp_path, "easy", 1, **dict(SMALL, word_dim=16))
    assert other.name.startswith("easy-seed1-24x6x8-") and other != small
    # another release's preset values or generator: another folder, never the old one
    changed = dict(easy, region_noise=easy["region_noise"] + 0.5)
    monkeypatch.setitem(PRESETS, "easy", changed)
    assert synthetic_folder(tmp_path, "easy", 1, **SMALL) != small
    monkeypatch.setitem(PRESETS, "easy", easy)
    assert synthetic_folder(tmp_path, "easy", 1, **SMALL) == small
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    assert synthetic_folder(tmp_path, "easy", 1, **SMALL) != small


def test_ensure_synthetic(tmp_path):
    root = ensure_synthetic(tmp_path, seed=1, **SMALL)
    assert root == synthetic_folder(tmp_path, "easy", 1, **SMALL)
    stamp = (root / "train_ims.npy").stat().st_mtime_ns
    assert ensure_synthetic(tmp_path, seed=1, **SMALL) == root
    assert (root / "train_ims.npy").stat().st_mtime_ns == stamp  # not regenerated
    (root / "dev_caps.txt").unlink()  # incomplete: regenerated
    (root / "knowledge" / "words.txt").write_text("truncated\n")
    ensure_synthetic(tmp_path, seed=1, **SMALL)
    assert folder_bytes(root) == folder_bytes(
        generate_synthetic(tmp_path / "ref", "easy", 1, **SMALL)
    )
    # another dataset (another seed) goes to another folder; the first stays
    root2 = ensure_synthetic(tmp_path, seed=2, **SMALL)
    assert root2 != root and (root / "train_ims.npy").stat().st_mtime_ns != 0
    # a folder of that name holding another dataset is never replaced
    meta = json.loads((root2 / "meta.json").read_text())
    meta["params"]["region_noise"] = 0.1
    (root2 / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FileExistsError, match="another synthetic dataset"):
        ensure_synthetic(tmp_path, seed=2, **SMALL)
    # nor one holding something else
    foreign = synthetic_folder(tmp_path, "easy", 3, **SMALL)
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="thesis|synthetic"):
        ensure_synthetic(tmp_path, seed=3, **SMALL)
    assert (foreign / "thesis.tex").read_text() == "precious"
    with pytest.raises(TypeError, match="unknown"):
        ensure_synthetic(tmp_path, n_images=3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders


def test_synthetic_planted_structure(tmp_path):
    root = generate_synthetic(tmp_path / "syn", seed=0, **SMALL)
    meta = json.loads((root / "meta.json").read_text())
    words = meta["concept_words"]
    index = {w: k for k, w in enumerate(words)}
    directions = np.load(root / "concept_directions.npy")
    ims = np.load(root / "train_ims.npy")
    own = [[index[w] for w in line.split()] for line in (root / "train_concepts.txt").open()]
    assert all(3 <= len(o) <= 6 for o in own)

    # the mean region of an image leans towards its own concepts' directions
    projection = ims.mean(axis=1) @ directions.T
    aucs = []
    for i, concepts in enumerate(own):
        mask = np.zeros(len(words), dtype=bool)
        mask[concepts] = True
        assert projection[i, mask].mean() > projection[i, ~mask].mean()
        aucs.append((projection[i, mask][:, None] > projection[i, ~mask][None, :]).mean())
    assert np.mean(aucs) > 0.8  # ranking own concepts above the others (0.5 = chance)
    # the regions labelled with a concept are the ones most aligned with its direction
    labels = np.load(root / "train_region_concepts.npy")
    assert labels.shape == ims.shape[:2] and labels.min() == -1
    best = (ims @ directions.T).argmax(axis=2)
    assert (best[labels >= 0] == labels[labels >= 0]).mean() > 0.9

    # captions name >= 2 of their image's concepts, with filler words, 6-20 words
    vocab = Vocabulary.build(read_captions(root / "train_caps.txt"))
    ds = PrecompDataset(root, "train", vocab)
    for j in range(len(ds)):
        caption = vocab.decode(ds.captions[j]).split()
        named = [w for w in caption if w in index]
        assert 6 <= len(caption) <= 20 and len(named) >= 2
        assert {index[w] for w in named} <= set(own[ds.image_of_caption(j)])

    # word vectors cover every word, and their geometry follows the concept directions
    vectors, n_found = load_word_vectors(root / "glove_synthetic.txt", vocab, dim=32)
    assert n_found == len(vocab) - 2
    concept_vectors = vectors[[vocab.token_to_id(w) for w in words]].numpy()
    concept_vectors /= np.linalg.norm(concept_vectors, axis=1, keepdims=True)
    upper = np.triu_indices(len(words), 1)
    gram_words = (concept_vectors @ concept_vectors.T)[upper]
    gram_directions = (directions @ directions.T)[upper]
    assert np.corrcoef(gram_words, gram_directions)[0, 1] > 0.3
    groups = np.array(meta["concept_groups"])
    same_group = (groups[:, None] == groups[None, :])[upper]
    assert gram_words[same_group].mean() > gram_words[~same_group].mean() + 0.1


@pytest.mark.parametrize("preset", ["easy", "hard"])
def test_knowledge_folder(tmp_path, preset):
    sizes = SMALL if preset == "easy" else HARD_SMALL
    root = generate_synthetic(tmp_path / "k", preset, seed=4, **sizes)
    meta = json.loads((root / "meta.json").read_text())
    regions = np.load(root / "knowledge" / "regions.npy", mmap_mode="r")
    rows = (root / "knowledge" / "words.txt").read_text().splitlines()
    feature_dim = sizes["feature_dim"]
    assert regions.dtype == np.float16 and regions.shape == (len(rows), feature_dim)
    assert meta["knowledge"]["n_pairs"] == len(rows) > 0
    assert meta["knowledge"]["word_vectors"] == "glove_synthetic.txt"
    assert {"knowledge/regions.npy", "knowledge/words.txt"} <= set(meta["files"])
    # each row is a train region labelled with a concept that its word names
    synonyms = meta["concept_synonyms"]
    concept_of_word = {w: k for k, ws in enumerate(synonyms) for w in ws}
    ims = np.load(root / "train_ims.npy")
    labels = np.load(root / "train_region_concepts.npy")
    flat = ims.reshape(-1, feature_dim).astype(np.float16)
    for row in range(0, len(rows), max(1, len(rows) // 20)):
        hits = np.flatnonzero((flat == regions[row]).all(axis=1))
        assert len(hits) >= 1
        assert labels.reshape(-1)[hits[0]] == concept_of_word[rows[row]]
    glove = {line.split()[0] for line in (root / "glove_synthetic.txt").open()}
    assert set(rows) <= glove


def test_hard_preset(hard):
    meta = json.loads((hard / "meta.json").read_text())
    p = meta["params"]
    assert meta["preset"] == "hard"
    for knob, value in PRESETS["hard"].items():
        expected = HARD_SMALL.get(knob, value)
        assert p[knob] == (list(expected) if isinstance(expected, tuple) else expected), knob
    n_regions, feature_dim = HARD_SMALL["n_regions"], HARD_SMALL["feature_dim"]
    for split, key in (("train", "n_train"), ("dev", "n_val"), ("test", "n_test")):
        ims = np.load(hard / f"{split}_ims.npy", mmap_mode="r")
        assert ims.shape == (HARD_SMALL[key], n_regions, feature_dim)
        assert len(read_captions(hard / f"{split}_caps.txt")) == 5 * HARD_SMALL[key]

    synonyms = meta["concept_synonyms"]
    concept_of_word = {w: k for k, ws in enumerate(synonyms) for w in ws}
    heldout = set(meta["heldout_concepts"])
    heldout_words = {w for k, ws in enumerate(synonyms) if ws[0] in heldout for w in ws}
    assert len(heldout) == PRESETS["hard"]["n_heldout"]
    caps = {split: words_of(hard / f"{split}_caps.txt") for split in ("train", "dev", "test")}
    used = {split: {w for c in caps[split] for w in c} for split in caps}
    # held-out concepts: named in test captions only, in images of every split, not knowledge
    assert not heldout_words & (used["train"] | used["dev"])
    assert heldout_words & used["test"]
    for split in ("train", "test"):
        image_words = {w for line in words_of(hard / f"{split}_concepts.txt") for w in line}
        assert heldout & image_words
    knowledge_words = set((hard / "knowledge" / "words.txt").read_text().split())
    assert not heldout_words & knowledge_words
    assert meta["knowledge"]["excluded_concepts"] == meta["heldout_concepts"]
    glove = {line.split()[0] for line in (hard / "glove_synthetic.txt").open()}
    assert heldout_words <= glove and set(concept_of_word) <= glove

    # synonyms: concepts with 1-3 words, and captions use more than one word of a concept
    assert {len(ws) for ws in synonyms} == {1, 2, 3}
    named_by = {}
    for w in used["train"]:
        if w in concept_of_word:
            named_by.setdefault(concept_of_word[w], set()).add(w)
    assert max(len(ws) for ws in named_by.values()) >= 2
    # style words in every caption; captions name some (>= 0) of their image's concepts
    style = set(meta["style_words"])
    assert len(style) == PRESETS["hard"]["n_style_words"] and style <= glove
    assert all(style & set(c) for c in caps["train"])
    own = [set(line) for line in words_of(hard / "train_concepts.txt")]
    named_counts = []
    for j, caption in enumerate(caps["train"]):
        named = {synonyms[concept_of_word[w]][0] for w in caption if w in concept_of_word}
        assert named <= own[j // 5]
        named_counts.append(len(named) / len(own[j // 5]))
    assert np.mean(named_counts) < 0.75 and min(named_counts) < 0.5

    # scenes: images share more of their concepts with their nearest other image than
    # images whose concepts are drawn uniformly (few scenes, so that the tiny split shows it)
    def nearest_overlap(root):
        sets = [set(line) for line in words_of(root / "train_concepts.txt")]
        return np.mean(
            [
                max(len(a & b) / len(a) for k, b in enumerate(sets) if k != i)
                for i, a in enumerate(sets)
            ]
        )

    scenes = generate_synthetic(hard.parent / "scenes", "hard", 2, n_scenes=4, **HARD_SMALL)
    uniform = generate_synthetic(hard.parent / "uniform", "hard", 2, n_scenes=0, **HARD_SMALL)
    assert nearest_overlap(scenes) > nearest_overlap(uniform) + 0.1
    assert len(meta["scenes"]) == PRESETS["hard"]["n_scenes"]
    # the image style lives in the recorded subset of columns
    columns = np.array(meta["style_columns"])
    assert len(columns) == round(PRESETS["hard"]["style_fraction"] * feature_dim)
    ims = np.load(hard / "train_ims.npy")
    spread = ims.mean(axis=1).var(axis=0)
    mask = np.zeros(feature_dim, dtype=bool)
    mask[columns] = True
    assert spread[mask].mean() > 5 * spread[~mask].mean()
    assert meta["word_style_columns"] is not None


def test_fingerprint(tmp_path):
    a = generate_synthetic(tmp_path / "a", seed=5, **SMALL)
    b = generate_synthetic(tmp_path / "b", seed=5, **SMALL)
    fa = data_fingerprint(a)
    assert re.fullmatch(r"[0-9a-f]{16}", fa)
    assert data_fingerprint(b) == fa
    assert data_fingerprint(generate_synthetic(tmp_path / "c", seed=6, **SMALL)) != fa
    (b / "meta.json").write_text("{}")  # not data
    assert data_fingerprint(b) == fa
    # one changed caption
    caps = (b / "dev_caps.txt").read_text().splitlines()
    caps[3] = caps[3] + " the"
    (b / "dev_caps.txt").write_text("\n".join(caps) + "\n")
    assert data_fingerprint(b) != fa
    # changed feature bytes at the start of the data
    b2 = generate_synthetic(tmp_path / "b2", seed=5, **SMALL)
    ims = np.load(b2 / "test_ims.npy")
    ims[0, 0, 0] += 1.0
    np.save(b2 / "test_ims.npy", ims)
    assert data_fingerprint(b2) != fa
    # a feature file of another dtype
    b3 = generate_synthetic(tmp_path / "b3", seed=5, **SMALL)
    np.save(b3 / "train_ims.npy", np.load(b3 / "train_ims.npy").astype(np.float16))
    assert data_fingerprint(b3) != fa
    # a folder of real data: captions and features only, no ids
    real = tmp_path / "real"
    real.mkdir()
    np.save(real / "test_ims.npy", np.zeros((2, 3, 4), dtype=np.float32))
    (real / "test_caps.txt").write_text("a cat\n" * 10)
    assert data_fingerprint(real) != fa
    with pytest.raises(FileNotFoundError):
        data_fingerprint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        data_fingerprint(tmp_path / "empty")


def test_generation_leaves_global_state_alone(tmp_path):
    """Generating draws from its own generators only: the global ones (random, numpy,
    torch) and torch's thread settings are as they were, so a run that generates its data
    trains as one that finds them."""
    import pickle
    import random

    import torch

    def snapshot():
        return (
            pickle.dumps(random.getstate()),
            pickle.dumps(np.random.get_state()),
            torch.get_rng_state(),
            torch.get_num_threads(),
            torch.get_num_interop_threads(),
        )

    before = snapshot()
    ensure_synthetic(tmp_path, seed=4, **SMALL)
    after = snapshot()
    assert before[:2] == after[:2] and before[3:] == after[3:]
    assert torch.equal(before[2], after[2])
