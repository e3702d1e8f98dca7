"""The optional BERT text encoder, on a tiny randomly initialised local BERT."""

import dataclasses
import sys

import pytest
import torch
from _helpers.training import tiny_config

from fastalign.data import read_captions, tokenize
from fastalign.training import Trainer, build_model, evaluate_model, load_checkpoint

transformers = pytest.importorskip("transformers")

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tiny_bert(folder, words) -> None:
    """A 2-layer, 32-wide BERT with random weights and a WordPiece vocabulary of ``words``."""
    folder.mkdir(parents=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(SPECIAL + sorted(set(words))) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab_file)).save_pretrained(folder)
    config = transformers.BertConfig(
        vocab_size=len(SPECIAL) + len(set(words)),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_bert(tiny_data, tmp_path_factory):
    words = [w for line in read_captions(tiny_data, "train") for w in tokenize(line)]
    folder = tmp_path_factory.mktemp("bert") / "tiny-bert"
    write_tiny_bert(folder, words)
    return folder


def bert_config(root, out, bert, **changes):
    config = tiny_config(root, out, **changes)
    model = dataclasses.replace(config.model, text_encoder="bert", bert_path=str(bert))
    return dataclasses.replace(config, model=model)


def test_tokenizer_adds_cls_sep_and_pads_with_zero(tiny_bert):
    from fastalign.bert import BertCaptionTokenizer

    tokenizer = BertCaptionTokenizer(tiny_bert)
    reference = transformers.AutoTokenizer.from_pretrained(tiny_bert)
    text = "The dog, THE cat!"
    assert tokenizer.encode(text) == reference(text)["input_ids"]
    assert tokenizer.encode(text)[0] == reference.cls_token_id
    assert tokenizer.encode(text)[-1] == reference.sep_token_id
    assert tokenizer.encode("  \t ") == []  # punctuation is a token to BERT; blanks are not
    assert len(tokenizer) == len(reference)
    assert reference.pad_token_id == 0


def test_encoder_ignores_padding_and_normalises(tiny_bert):
    from fastalign.bert import BertCaptionTokenizer, BertTextEncoder

    tokenizer = BertCaptionTokenizer(tiny_bert)
    encoder = BertTextEncoder(tiny_bert, embed_dim=8).eval()
    ids = [tokenizer.encode(t) for t in ("a dog runs", "the cat", "a man on a horse")]
    lengths = torch.tensor([len(x) for x in ids])
    width = int(lengths.max()) + 3  # wider than any caption: padding must not matter
    batch = torch.zeros(len(ids), width, dtype=torch.long)
    for row, x in enumerate(ids):
        batch[row, : len(x)] = torch.tensor(x)
    with torch.no_grad():
        together = encoder(batch, lengths)
        for row, x in enumerate(ids):
            alone = encoder(torch.tensor([x]), torch.tensor([len(x)]))
            torch.testing.assert_close(together[row, : len(x)], alone[0], atol=1e-5, rtol=1e-4)
    assert together.shape == (3, width, 8)
    torch.testing.assert_close(together.norm(dim=-1), torch.ones(3, width))


def test_clear_errors(tiny_bert, tmp_path, monkeypatch):
    from fastalign.bert import BertCaptionTokenizer, BertTextEncoder

    with pytest.raises(ValueError, match="model.bert_path"):
        BertTextEncoder(None, 8)
    with pytest.raises(FileNotFoundError, match="no BERT model at"):
        BertCaptionTokenizer(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="pip install transformers"):
        BertTextEncoder(tiny_bert, 8)


def test_trains_saves_and_evaluates(tiny_data, tiny_bert, tmp_path):
    trainer = Trainer(bert_config(tiny_data, tmp_path / "run", tiny_bert, epochs=1), progress=False)
    trainer.fit()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in trainer.history)
    model, tokenizer = build_model(load_checkpoint(tmp_path / "run" / "last.pt"))
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    results = evaluate_model(model, trainer.val_set)
    assert 0 <= results["rsum"] <= 600
    assert tokenizer.encode("a dog") == trainer.vocab.encode("a dog")
