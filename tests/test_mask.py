"""MASK and MACK: the three MASK loss terms against plain formulas written out here (values
and gradients), the knowledge they build (prototypes against numpy / a direct per-word
mean), the word table (concepts, words out of the knowledge mixed by the reference top-m
mixture, dropped words) and its cache, caption compaction against a per-caption loop, and
both methods through the trainer and a checkpoint.

Random inputs come from the test seed (FASTALIGN_TEST_SEED draws new ones; every message
names it) and have odd sizes."""

import numpy as np
import pytest
import torch

from fastalign.checkpoint import load_checkpoint, restore_trained
from fastalign.config import load_config
from fastalign.data import Vocabulary, map_caption_words, open_knowledge
from fastalign.methods.base import RunData
from fastalign.methods.mack import Mack, RawFeatureModel
from fastalign.methods.mask import (
    Mask,
    MaskModel,
    MaskOptions,
    MaskOutputs,
    prototype_contrastive_loss,
    restoration_loss,
    transfer_loss,
)
from fastalign.model_evaluation import evaluate_trained
from fastalign.nn import KnowledgeBase
from fastalign.ops.prototypes import prototype_topk_mix_reference
from fastalign.training import Trainer

FEATURE_DIM = 7
WORD_DIM = 5
N_CONCEPTS = 6
N_ROWS = 23
OOV_M, OOV_TAU = 3, 0.7
# Caption words out of the knowledge: three with a word vector, one without.
OOV_WORDS = ("zebra", "kite", "fog")
NO_VECTOR = "blorp"
# The vocabulary in an order of its own (not the order of the OOV slots), "w05" left out:
# a concept of the knowledge that is no vocabulary word still serves as a mixing key.
VOCAB_WORDS = ("kite", "w03", NO_VECTOR, "w00", "zebra", "w01", "fog", "w02", "w04")
MASK_SMALL = ["mask.embed_dim=9", "mask.heads=3", "mask.layers=1"]


def generator(seed, case):
    return torch.Generator().manual_seed(1000 * seed + case)


def seed_message(seed, case=0):
    return f"FASTALIGN_TEST_SEED={seed}, case {case}"


def write_knowledge(root, seed, dtype=np.float16):
    """A knowledge folder of N_ROWS rows of N_CONCEPTS words and a GloVe file with a vector
    for every concept and for OOV_WORDS; returns (knowledge, glove path, regions in float64,
    row words)."""
    rng = np.random.default_rng(seed)
    folder = root / "knowledge"
    folder.mkdir(parents=True)
    regions = rng.standard_normal((N_ROWS, FEATURE_DIM)).astype(dtype)
    np.save(folder / "regions.npy", regions)
    names = [f"w{k:02d}" for k in range(N_CONCEPTS)]
    picks = np.concatenate(
        [np.arange(N_CONCEPTS), rng.integers(0, N_CONCEPTS, N_ROWS - N_CONCEPTS)]
    )
    words = [names[k] for k in rng.permutation(picks)]
    (folder / "words.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    glove = root / "glove.txt"
    lines = [
        w + " " + " ".join(repr(float(x)) for x in rng.standard_normal(WORD_DIM))
        for w in (*names, *OOV_WORDS)
    ]
    glove.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return open_knowledge(folder, glove), glove, regions.astype(np.float64), words


def knowledge_model(tmp_path, seed):
    """A RawFeatureModel given the hand-made knowledge with random prototypes, the words out
    of the knowledge found by map_caption_words (slots in their sorted order, not the
    vocabulary's); returns (model, vocab, knowledge, prototypes, caption words)."""
    knowledge, glove, _, _ = write_knowledge(tmp_path, seed)
    captions = ["a zebra and a kite in the fog", f"w00 {NO_VECTOR} w03"]
    words = map_caption_words(knowledge, captions, glove)
    vocab = Vocabulary(VOCAB_WORDS)
    model = RawFeatureModel(len(vocab), oov_m=OOV_M, oov_tau=OOV_TAU)
    prototypes = torch.randn(N_CONCEPTS, 11, generator=generator(seed, 7))
    model.set_knowledge(vocab, knowledge, prototypes, words.oov, words.oov_vectors)
    return model, vocab, knowledge, prototypes, words


def expected_table(vocab, knowledge, prototypes, words):
    """{word: its expected row} for the words kept: a concept's prototype, or the reference
    top-m mixture of the prototypes for a word out of the knowledge with a vector."""
    mixed = prototype_topk_mix_reference(
        words.oov_vectors, knowledge.word_vectors, prototypes, OOV_M, OOV_TAU
    )
    rows = {}
    for word in vocab.words:
        if word in knowledge.words:
            rows[word] = prototypes[knowledge.words.index(word)]
        elif word in words.oov:
            rows[word] = mixed[words.oov.index(word)]
    return rows


# --------------------------------------------------------------------------- plain formulas
def plain_restoration(regions, mu, logvar, restored):
    """KL(N(mu, sigma^2) || N(0, I)) summed then divided by its size, plus the squared
    restoration error summed then divided by its size."""
    sigma = torch.exp(0.5 * logvar)
    kl = 0.5 * torch.sum(sigma**2 + mu**2 - 1 - torch.log(sigma**2)) / mu.numel()
    error = torch.zeros((), dtype=regions.dtype)
    for i in range(regions.shape[0]):
        for f in range(regions.shape[1]):
            error = error + (regions[i, f] - restored[i, f]) ** 2
    return kl + error / regions.numel()


def plain_cosine(a, b):
    return (a * b).sum() / (torch.sqrt((a * a).sum()) * torch.sqrt((b * b).sum()))


def plain_transfer(mu, transferred, word_vectors):
    """mean_i (1 - cos(w_i, f_i)) + mean over all (i, j) of (cos(f_i, f_j) - cos(mu_i, mu_j))^2."""
    b = mu.shape[0]
    alignment = sum(1 - plain_cosine(transferred[i], word_vectors[i]) for i in range(b)) / b
    relations = 0
    for i in range(b):
        for j in range(b):
            gap = plain_cosine(transferred[i], transferred[j]) - plain_cosine(mu[i], mu[j])
            relations = relations + gap**2
    return alignment + relations / b**2


def plain_contrastive(mu, concepts, prototypes, tau):
    """For each concept present: -log(sum over its regions of e^{cos / tau} / the sum over
    every region), the mean over the concepts present."""
    present = sorted(set(concepts.tolist()))
    terms = []
    for k in present:
        logits = torch.stack([plain_cosine(prototypes[k], mu[i]) / tau for i in range(len(mu))])
        positive = torch.tensor([c == k for c in concepts.tolist()])
        terms.append(-torch.log(logits[positive].exp().sum() / logits.exp().sum()))
    return torch.stack(terms).mean()


def assert_same_value_and_gradient(library, plain, inputs, message):
    """Forward values and the gradients in every input (autograd of each formula), then
    gradcheck of the library's formula (float64)."""
    got, want = library(*inputs), plain(*inputs)
    torch.testing.assert_close(got, want, msg=message)
    got_grads = torch.autograd.grad(got, inputs)
    want_grads = torch.autograd.grad(want, inputs)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got_grad, want_grad, msg=message)
    assert torch.autograd.gradcheck(library, inputs), message


# --------------------------------------------------------------------------- loss terms
@pytest.mark.parametrize("case, b, d, f", [(0, 7, 5, 11), (1, 1, 3, 2), (2, 5, 1, 13)])
def test_restoration_loss_is_the_plain_kl_plus_the_squared_error(case, b, d, f, test_seed):
    g = generator(test_seed, case)

    def draw(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    inputs = (draw(b, f), draw(b, d), draw(b, d), draw(b, f))
    unused = torch.zeros(b, 1, dtype=torch.float64)  # the transfer: no part of L_ir

    def library(regions, mu, logvar, restored):
        return restoration_loss(regions, MaskOutputs(mu, logvar, restored, unused))

    assert_same_value_and_gradient(
        library, plain_restoration, inputs, seed_message(test_seed, case)
    )


@pytest.mark.parametrize("case, b, d, dw", [(0, 7, 5, 3), (1, 3, 1, 4), (2, 1, 3, 3)])
def test_transfer_loss_is_the_plain_alignment_plus_relations(case, b, d, dw, test_seed):
    g = generator(test_seed, case)

    def draw(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    inputs = (draw(b, d), draw(b, dw), draw(b, dw))
    assert_same_value_and_gradient(transfer_loss, plain_transfer, inputs, seed_message(test_seed))


@pytest.mark.parametrize("case, b, k, d, tau", [(0, 9, 6, 5, 0.37), (1, 5, 3, 1, 0.1)])
def test_prototype_contrastive_loss_is_the_plain_per_concept_info_nce(
    case, b, k, d, tau, test_seed
):
    g = generator(test_seed, case)
    # Repeated concepts (several positives), and concepts absent from the batch, whose
    # prototypes get no term and no gradient.
    concepts = torch.randint(0, k - 1, (b,), generator=g)
    concepts[0] = concepts[-1]
    mu = torch.randn(b, d, generator=g, dtype=torch.float64).requires_grad_()
    prototypes = torch.randn(k, d, generator=g, dtype=torch.float64).requires_grad_()

    def library(mu, prototypes):
        return prototype_contrastive_loss(mu, concepts, prototypes, tau)

    def plain(mu, prototypes):
        return plain_contrastive(mu, concepts, prototypes, tau)

    message = seed_message(test_seed, case)
    assert_same_value_and_gradient(library, plain, (mu, prototypes), message)
    (grad,) = torch.autograd.grad(library(mu, prototypes), prototypes)
    absent = [c for c in range(k) if c not in concepts.tolist()]
    assert absent and bool((grad[absent] == 0).all()), message


# --------------------------------------------------------------------------- knowledge
def test_mack_prototypes_are_the_normalised_per_word_means_of_the_raw_features(tmp_path, test_seed):
    knowledge, _, regions, words = write_knowledge(tmp_path, test_seed)
    method = Mack(load_config(None, ["method=mack"]))
    got = method.prototypes(RawFeatureModel(4), knowledge)
    column = np.array(words)
    means = np.stack([regions[column == w].mean(axis=0) for w in sorted(set(words))])
    want = means / np.linalg.norm(means, axis=1, keepdims=True)
    torch.testing.assert_close(
        got, torch.from_numpy(want).float(), rtol=1e-5, atol=1e-6, msg=seed_message(test_seed)
    )


def test_mask_prototypes_are_the_per_word_means_of_the_region_embeddings(tmp_path, test_seed):
    knowledge, _, regions, words = write_knowledge(tmp_path, test_seed)
    config = load_config(
        None,
        [
            "method=mask",
            *MASK_SMALL,
            f"model.feature_dim={FEATURE_DIM}",
            f"model.word_dim={WORD_DIM}",
        ],
    )
    method = Mask(config)
    model = method.build_model(5)
    model.train()
    got = method.prototypes(model, knowledge)
    assert model.training, "prototypes() must give the model back in the mode it found it"

    model.eval()
    with torch.no_grad():
        mu = model.embed_regions(torch.from_numpy(regions).float())
    want = []
    for word in knowledge.words:
        rows = [i for i, w in enumerate(words) if w == word]
        want.append(sum(mu[i].double() for i in rows) / len(rows))
    torch.testing.assert_close(
        got, torch.stack(want).float(), rtol=1e-5, atol=1e-6, msg=seed_message(test_seed)
    )


# --------------------------------------------------------------------------- word table
def test_word_table_holds_prototypes_oov_mixtures_and_zeros(tmp_path, test_seed):
    model, vocab, knowledge, prototypes, words = knowledge_model(tmp_path, test_seed)
    assert words.oov == tuple(sorted(OOV_WORDS)) and NO_VECTOR in words.dropped
    table, kept = model.word_table()
    rows = expected_table(vocab, knowledge, prototypes, words)
    message = seed_message(test_seed)
    assert set(rows) == {*VOCAB_WORDS} - {NO_VECTOR}
    for index, word in enumerate(vocab.words):
        if word in rows:
            assert bool(kept[index]), f"{word} must be kept; {message}"
            torch.testing.assert_close(table[index], rows[word], msg=f"{word}; {message}")
        else:  # <pad>, <unk> and the word without a vector
            assert not bool(kept[index]), f"{word} must be dropped; {message}"
            assert bool((table[index] == 0).all()), f"{word}; {message}"


def test_encode_captions_keeps_the_kept_words_first_in_caption_order(tmp_path, test_seed):
    model, vocab, knowledge, prototypes, words = knowledge_model(tmp_path, test_seed)
    rows = expected_table(vocab, knowledge, prototypes, words)
    g = generator(test_seed, 1)
    n, width = 7, 9
    captions = torch.randint(0, len(vocab), (n, width), generator=g)
    lengths = torch.randint(1, width + 1, (n,), generator=g)
    lengths[0] = width
    # Caption 1 keeps no word (pad, unk, the word without a vector) though words to keep
    # sit in its padding; caption 2 is one dropped word and then padding of kept words.
    dropped = [0, 1, vocab.token_to_id(NO_VECTOR)]
    captions[1, :4] = torch.tensor(dropped + [dropped[0]])
    captions[1, 4:] = vocab.token_to_id("zebra")
    lengths[1] = 4
    captions[2] = vocab.token_to_id("w00")
    captions[2, 0] = dropped[2]
    lengths[2] = 1

    tokens = model.encode_captions(captions, lengths)

    message = seed_message(test_seed)
    kept_words = []
    for c in range(n):
        caption = [vocab.words[i] for i in captions[c, : lengths[c]].tolist()]
        kept_words.append([w for w in caption if w in rows])
    assert tokens.embs.shape[1] == max(1, max(len(k) for k in kept_words)), message
    for c, kept in enumerate(kept_words):
        where = f"caption {c} {kept}; {message}"
        assert int(tokens.lengths[c]) == max(len(kept), 1), where
        if kept:
            want = torch.stack([rows[w] for w in kept])
            torch.testing.assert_close(tokens.embs[c, : len(kept)], want, msg=where)
        else:  # one zero vector, which ranks last
            assert bool((tokens.embs[c, 0] == 0).all()), where
    assert not kept_words[1] and not kept_words[2], message

    regions = torch.randn(3, 5, 11, generator=g)
    images = model.encode_images(regions, torch.tensor([5, 2, 4]))
    scores = model.similarity(images, tokens)
    lowest = torch.finfo(scores.dtype).min
    assert bool((scores[:, 1:3] == lowest).all()), message
    kept_columns = [c for c, kept in enumerate(kept_words) if kept]
    assert bool((scores[:, kept_columns] > lowest).all()), message


def test_word_table_follows_new_values(tmp_path, test_seed):
    model, vocab, knowledge, prototypes, words = knowledge_model(tmp_path, test_seed)
    model.word_table()
    message = seed_message(test_seed)

    def check(values, what):
        table, _ = model.word_table()
        rows = expected_table(vocab, knowledge, values, words)
        for index, word in enumerate(vocab.words):
            if word in rows:
                torch.testing.assert_close(table[index], rows[word], msg=f"{what}; {message}")

    new = torch.randn(prototypes.shape, generator=generator(test_seed, 2))
    model.knowledge.set_values(new)
    check(new, "after set_values")
    model.knowledge.values.mul_(-3.0)  # in place: the same storage, a new version
    check(-3.0 * new, "after an in-place change")


def test_word_table_follows_repeated_set_values(tmp_path, test_seed):
    # Two replacements between reads: the second copy is allocated right after the cached
    # values were freed, and the CPU allocator tends to hand that block back.
    knowledge, _, _, _ = write_knowledge(tmp_path, test_seed)
    vocab = Vocabulary(knowledge.words)
    steps, stale = 30, {}
    for width in (1024, 1536, 2048, 4096):
        model = RawFeatureModel(len(vocab))
        model.set_knowledge(vocab, knowledge, torch.zeros(N_CONCEPTS, width))
        updates = torch.randn(steps, 2, N_CONCEPTS, width, generator=generator(test_seed, 3))
        stale[width] = 0
        for first, second in updates:
            model.word_table()
            model.knowledge.set_values(first)
            model.knowledge.set_values(second)
            table, _ = model.word_table()
            stale[width] += not torch.equal(table[2:], second)
    assert not any(stale.values()), (
        f"stale tables of {steps} by width: {stale}; {seed_message(test_seed)}"
    )


# --------------------------------------------------------------------------- through the trainer
def test_mask_checkpoint_restores_knowledge_of_any_size(tiny_data, tiny_config, tmp_path):
    config = tiny_config(
        tiny_data,
        tmp_path / "run",
        "method=mask",
        "epochs=1",
        "batch_size=64",  # fewer steps: the test is about what the checkpoint holds
        "mask.embed_dim=32",
        "mask.heads=4",
        "mask.layers=1",
    )
    trainer = Trainer(config, progress=False)
    results = trainer.fit()
    trained = trainer.model.state_dict()
    assert trained["knowledge.keys"].shape[0] > OOV_M and trained["oov_vectors"].shape[0] > 0
    # The epoch's end rebuilt the prototypes from the trained encoder.
    knowledge = trainer.method.open_knowledge(trainer.data)
    rebuilt = trainer.method.prototypes(trainer.model, knowledge)
    torch.testing.assert_close(trained["knowledge.values"], rebuilt)

    method, model, tokenizer = restore_trained(load_checkpoint(tmp_path / "run" / "last.pt"))
    assert tokenizer == trainer.vocab
    restored = model.state_dict()
    assert restored.keys() == trained.keys()
    for name, value in trained.items():
        assert torch.equal(restored[name], value), name
    assert evaluate_trained(method, model, trainer.val_set) == results
    assert evaluate_trained(trainer.method, trainer.model, trainer.val_set) == results

    # A model whose knowledge was set to another size takes the saved sizes too.
    other = MaskModel(
        len(tokenizer), config.model.feature_dim, config.model.word_dim, config.options
    )
    other.knowledge.set(torch.ones(N_CONCEPTS, WORD_DIM), torch.ones(N_CONCEPTS, 32))
    other.oov_vectors = torch.ones(2, 16)
    other.word_table()  # a cached table of the small knowledge must not survive the load
    other.load_state_dict(trained)
    for name, value in trained.items():
        assert torch.equal(other.state_dict()[name], value), name
    other_table, other_kept = other.word_table()
    table, kept = trainer.model.word_table()
    assert torch.equal(other_kept, kept)
    torch.testing.assert_close(other_table, table)


def test_mack_runs_with_zero_epochs_and_refuses_more(tiny_data, tiny_config, tmp_path):
    trainer = Trainer(
        tiny_config(tiny_data, tmp_path / "run", "method=mack", "epochs=0"), progress=False
    )
    results = trainer.fit()
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "last.pt").is_file()
    assert evaluate_trained(trainer.method, trainer.model, trainer.val_set) == results
    method, model, _ = restore_trained(load_checkpoint(tmp_path / "run" / "best.pt"))
    assert evaluate_trained(method, model, trainer.val_set) == results

    # The prototypes of the run: the numpy per-word means of the raw features, normalised.
    folder = tiny_data / "knowledge"
    regions = np.load(folder / "regions.npy").astype(np.float64)
    words = np.array((folder / "words.txt").read_text(encoding="utf-8").split())
    means = np.stack([regions[words == w].mean(axis=0) for w in sorted(set(words))])
    want = torch.from_numpy(means / np.linalg.norm(means, axis=1, keepdims=True)).float()
    torch.testing.assert_close(trainer.model.knowledge.values, want, rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="epochs"):
        Trainer(
            tiny_config(tiny_data, tmp_path / "more", "method=mack", "epochs=1"), progress=False
        )


# --------------------------------------------------------------------------- bad inputs
def test_knowledge_base_refuses_rows_that_disagree():
    base = KnowledgeBase(m=2)
    with pytest.raises(ValueError, match="one row per key"):
        base.set(torch.zeros(5, 3), torch.zeros(4, 7))
    with pytest.raises(ValueError, match="one row per key"):
        base.set(torch.zeros(5), torch.zeros(5, 7))
    base.set(torch.zeros(5, 3), torch.zeros(5, 7))
    with pytest.raises(ValueError, match="one row per key"):
        base.set_values(torch.zeros(3, 7))


def test_mask_embed_dim_must_be_a_multiple_of_heads():
    with pytest.raises(ValueError, match="mask.embed_dim = 10 .*mask.heads = 4"):
        MaskOptions(embed_dim=10, heads=4)


def test_mask_config_with_embed_dim_not_a_multiple_of_heads_is_refused_when_loaded():
    with pytest.raises(ValueError, match="mask.embed_dim"):
        load_config(None, ["method=mask", "mask.embed_dim=10", "mask.heads=4"])


@pytest.mark.parametrize("oov", ["all", "listed", "off"])
def test_words_out_of_the_knowledge_kept_as_the_options_say(tiny_data, tmp_path, oov):
    """mask.oov / mask.oov_words choose which caption words out of the knowledge that have
    a word vector enter the vocabulary (reconstructed); the rest are dropped."""
    glove = tiny_data / "glove_synthetic.txt"
    knowledge = open_knowledge(tiny_data / "knowledge", glove)
    captions = [
        line
        for split in ("train", "dev", "test")
        for line in (tiny_data / f"{split}_caps.txt").read_text().splitlines()
    ]
    out_of_knowledge = map_caption_words(knowledge, captions, glove).oov
    assert len(out_of_knowledge) >= 3
    listed = tmp_path / "nouns.txt"
    listed.write_text("\n".join([*out_of_knowledge[:2], "not_a_caption_word"]) + "\n")
    overrides = {"all": [], "listed": [f"mask.oov_words={listed}"], "off": ["mask.oov=false"]}
    config = load_config(
        None, ["method=mask", f"data_root={tiny_data}", "model.word_dim=16", *overrides[oov]]
    )
    vocab = Mask(config).tokenizer(RunData(tiny_data, glove), None)
    expected = {"all": out_of_knowledge, "listed": out_of_knowledge[:2], "off": ()}[oov]
    assert set(vocab.words) - {"<pad>", "<unk>"} == {*knowledge.words, *expected}
