"""MACK (Huang et al., NeurIPS 2022): training-free matching by word-region knowledge.

Unpaired: no image-caption pair is seen. The knowledge is a folder of word-region pairs
(:mod:`fastalign.data.knowledge`: ``regions.npy`` and ``words.txt``, plus word vectors).
A concept word's prototype is the plain mean of the raw features of its regions; a
caption keeps the words that have a prototype and drops the others (words out of the
knowledge included); the score of an image and a caption is the cosine of its regions and
the caption's prototypes, max over the regions, mean over the words
(:func:`fastalign.region_word_similarity` t2i / max / mean on L2-normalised vectors), as
in the authors' ``clip_t2i_i2t_jj.py``. A caption none of whose words has a prototype
scores the lowest finite value against every image: it ranks last both ways (the authors'
script gives it a one-hot word instead).

MACK has nothing to train: run it with ``epochs: 0``; the knowledge is built when the
run starts and stored in the checkpoint. :class:`KnowledgeMatchingModel` is the part it
shares with MASK (:mod:`fastalign.methods.mask`), which learns the region embedding and
reconstructs the prototypes of words out of the knowledge.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fastalign import distributed
from fastalign.data import read_captions
from fastalign.data.knowledge import (
    Knowledge,
    KnowledgeLoader,
    map_caption_words,
    open_knowledge,
    word_prototypes,
)
from fastalign.data.vocab import Vocabulary
from fastalign.encoders import l2_normalize
from fastalign.methods import register_method
from fastalign.methods.base import Method, RunData
from fastalign.nn import KnowledgeBase
from fastalign.ops.region_word import region_word_similarity
from fastalign.tokens import Tokens

KNOWLEDGE_FOLDER = "knowledge"  # the default knowledge folder, inside the data root


class KnowledgeMatchingModel(nn.Module):
    """Scores images against captions whose words are knowledge prototypes.

    Every vocabulary word is one of: a concept of the knowledge (its prototype), a word out
    of the knowledge with a word vector (the mixture of the prototypes of the ``oov_m``
    concepts whose word vectors are nearest, :func:`fastalign.prototype_topk_mix`; only
    when ``oov_vectors`` are set), or dropped. The word-to-concept maps and the knowledge
    are buffers: they are sized by :meth:`set_knowledge` (or by a checkpoint's state) and
    saved with the weights.

    Subclasses embed the regions (:meth:`embed_regions`); the prototypes live in the same
    space.
    """

    word_concept: Tensor
    word_oov: Tensor
    oov_vectors: Tensor

    def __init__(self, vocab_size: int, oov_m: int = 10, oov_tau: float = 1.0) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.knowledge = KnowledgeBase(m=oov_m, tau=oov_tau)
        self.register_buffer("word_concept", torch.full((vocab_size,), -1, dtype=torch.long))
        self.register_buffer("word_oov", torch.full((vocab_size,), -1, dtype=torch.long))
        self.register_buffer("oov_vectors", torch.zeros(0, 0))
        self._oov_version = 0  # bumped when the words to reconstruct change
        self._table: tuple[tuple, Tensor, Tensor] | None = None

    def embed_regions(self, regions: Tensor) -> Tensor:
        """(..., F) region features -> (..., D) embeddings in the prototypes' space."""
        raise NotImplementedError

    def set_knowledge(
        self,
        vocab: Vocabulary,
        knowledge: Knowledge,
        prototypes: Tensor,
        oov_words: tuple[str, ...] = (),
        oov_vectors: Tensor | None = None,
    ) -> None:
        """Sizes and fills the buffers: ``knowledge``'s concept word vectors as the keys,
        ``prototypes`` (K, D) as the values, each vocabulary word's concept, and the word
        vectors (O, Dw) of ``oov_words`` (the vocabulary words to reconstruct)."""
        if len(vocab) != self.vocab_size:
            raise ValueError(
                f"vocab has {len(vocab)} words, but the model was built for {self.vocab_size}"
            )
        if oov_words and self.knowledge.m > knowledge.n_concepts:
            raise ValueError(
                f"oov_m = {self.knowledge.m} concepts mix each word out of the knowledge, "
                f"but the knowledge has {knowledge.n_concepts}"
            )
        device = self.word_concept.device
        concept = knowledge.word_index
        self.word_concept = torch.tensor(
            [concept.get(w, -1) for w in vocab.words], dtype=torch.long, device=device
        )
        slot = {w: i for i, w in enumerate(oov_words)}
        self.word_oov = torch.tensor(
            [slot.get(w, -1) for w in vocab.words], dtype=torch.long, device=device
        )
        dim = knowledge.word_vectors.shape[1]
        vectors = oov_vectors if oov_vectors is not None else torch.zeros(0, dim)
        self.oov_vectors = vectors.to(device=device, dtype=torch.float32)
        self._oov_version += 1
        self.knowledge.set(knowledge.word_vectors.to(device), prototypes.to(device))

    def word_table(self) -> tuple[Tensor, Tensor]:
        """``(table (V, D), kept (V,) bool)``: every vocabulary word's prototype (zeros
        where dropped), computed again only when the knowledge changes."""
        values = self.knowledge.values
        # The knowledge's version changes when its tensors are replaced, the tensor's
        # version when they are written in place.
        key = (self.knowledge.version, values._version, self._oov_version)
        if self._table is not None and self._table[0] == key:
            return self._table[1], self._table[2]
        table = values.new_zeros(self.vocab_size, values.shape[1])
        known = self.word_concept >= 0
        table[known] = values[self.word_concept[known]]
        kept = known.clone()
        oov = self.word_oov >= 0
        if len(self.oov_vectors) and bool(oov.any()):
            mixed = self.knowledge(self.oov_vectors)
            table[oov] = mixed[self.word_oov[oov]]
            kept |= oov
        self._table = (key, table, kept)
        return table, kept

    def encode_images(self, regions: Tensor, region_lengths: Tensor) -> Tokens:
        """(B, R, F) region features -> (B, R, D) region embeddings."""
        return Tokens(self.embed_regions(regions), region_lengths)

    def encode_captions(self, captions: Tensor, caption_lengths: Tensor) -> Tokens:
        """(B, L) token ids -> (B, L', D) the prototypes of the words kept, in caption
        order (L' = the most kept by one caption; a caption that keeps none gets one zero
        vector, which :meth:`similarity` ranks last)."""
        table, kept = self.word_table()
        positions = torch.arange(captions.shape[1], device=captions.device)
        keep = kept[captions] & (positions < caption_lengths[:, None])
        lengths = keep.sum(dim=1)
        # Kept words first, in caption order: a stable sort of the dropped flags.
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
        width = max(int(lengths.max()) if len(lengths) else 1, 1)
        ids = captions.gather(1, order[:, :width])
        valid = positions[:width] < lengths[:, None]
        embs = table[ids] * valid[..., None]
        return Tokens(embs, lengths.clamp(min=1))

    def similarity(self, images: Tokens, captions: Tokens) -> Tensor:
        """(Ni, R, D) x (Nt, L, D) -> (Ni, Nt): max over the regions, mean over the words;
        a caption that kept no word (all its tokens zero) scores the lowest finite value
        against every image, so that it ranks below every caption that has evidence (a
        score of 0 would rank it above every caption whose scores are negative)."""
        scores = region_word_similarity(
            images.embs,
            captions.embs,
            images.lengths,
            captions.lengths,
            direction="t2i",
            align="max",
            aggregate="mean",
        )
        empty = captions.embs.flatten(1).abs().amax(dim=1) == 0
        return scores.masked_fill(empty[None, :], torch.finfo(scores.dtype).min)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        saved = state_dict.get(prefix + "oov_vectors")
        if saved is not None:  # any number of words to reconstruct: take the saved shape
            self.oov_vectors = self.oov_vectors.new_empty(saved.shape)
        self._oov_version += 1
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class RawFeatureModel(KnowledgeMatchingModel):
    """MACK's model: L2-normalised raw region features against raw-feature prototypes."""

    def embed_regions(self, regions: Tensor) -> Tensor:
        return l2_normalize(regions.float())


@dataclass
class KnowledgeOptions:
    """``knowledge``: the knowledge folder (``regions.npy``, ``words.txt``); None: the
    ``knowledge/`` folder of the data root (the synthetic set writes one)."""

    knowledge: str | None = None


class KnowledgeMethod(Method):
    """What MACK and MASK share: the knowledge folder, a vocabulary of the caption words
    that the knowledge can represent, and (for a new run) the model's knowledge."""

    paired_training = False
    word_dim: int | None = None  # the word vectors' dimension the model needs, if any

    def __init__(self, config) -> None:
        super().__init__(config)
        self._knowledge: Knowledge | None = None
        # The words out of the knowledge to reconstruct, and their word vectors.
        self._oov: tuple[tuple[str, ...], Tensor | None] = ((), None)

    def words_to_reconstruct(self, oov: tuple[str, ...]) -> tuple[str, ...]:
        """Which caption words out of the knowledge (with a word vector) to keep, their
        prototypes reconstructed; the others are dropped. Default: none."""
        return ()

    def knowledge_folder(self, data: RunData) -> Path:
        if self.options.knowledge is not None:
            return Path(self.options.knowledge)
        return data.root / KNOWLEDGE_FOLDER

    def open_knowledge(self, data: RunData) -> Knowledge:
        """The run's knowledge (opened once, memory-mapped)."""
        if self._knowledge is None:
            if data.word_vectors is None:
                raise ValueError(
                    f"method {self.name!r} needs word vectors for its knowledge words: set "
                    f"word_vectors"
                )
            self._knowledge = open_knowledge(
                self.knowledge_folder(data), data.word_vectors, dim=self.word_dim
            )
        return self._knowledge

    def tokenizer(self, data: RunData | None, state: dict | None = None) -> Vocabulary:
        """The saved vocabulary, else the knowledge's concept words and (when the method
        reconstructs them) the other caption words that have a word vector: the words of
        every split's captions under the data root (words only; no pair is read)."""
        if state is not None:
            return Vocabulary.from_dict(state)
        knowledge = self.open_knowledge(data)
        c = self.config
        splits = dict.fromkeys((c.train_split, c.val_split, c.test_split))
        captions = [
            caption
            for split in splits
            if (data.root / f"{split}_caps.txt").is_file()
            for caption in read_captions(data.root, split)
        ]
        words = map_caption_words(knowledge, captions, data.word_vectors, oov=True)
        if distributed.rank() == 0:
            print(words.summary(), file=sys.stderr)
        kept = set(self.words_to_reconstruct(words.oov))
        rows = [i for i, word in enumerate(words.oov) if word in kept]
        self._oov = (tuple(words.oov[i] for i in rows), words.oov_vectors[rows])
        return Vocabulary((*knowledge.words, *self._oov[0]))

    def initial_word_vectors(self, data: RunData, tokenizer) -> None:
        return None  # the knowledge's word vectors are read with it

    def prepare(self, model: nn.Module, data: RunData, tokenizer: Vocabulary) -> None:
        knowledge = self.open_knowledge(data)
        model.set_knowledge(tokenizer, knowledge, self.prototypes(model, knowledge), *self._oov)

    @torch.no_grad()
    def prototypes(self, model: nn.Module, knowledge: Knowledge) -> Tensor:
        """(K, D) the concepts' prototypes: the mean of their regions' embeddings."""
        was_training = model.training
        model.eval()
        device = model.word_concept.device
        prototypes = word_prototypes(
            knowledge, transform=lambda rows: model.embed_regions(rows.to(device)).cpu()
        )
        model.train(was_training)
        return prototypes

    def train_loader(self, data: RunData, epoch: int, world_size: int) -> KnowledgeLoader:
        c = self.config
        loader = KnowledgeLoader(
            self.open_knowledge(data), c.batch_size, seed=c.seed, drop_last=world_size > 1
        )
        loader.set_epoch(epoch)
        return loader

    def train_features_file(self, data: RunData) -> Path:
        return self.knowledge_folder(data) / "regions.npy"

    def similarity(self, model: nn.Module, images: Tokens, captions: Tokens) -> Tensor:
        return model.similarity(images, captions)


@register_method
class Mack(KnowledgeMethod):
    """MACK: raw-feature prototypes, cosine, t2i / max / mean; nothing to train."""

    name = "mack"
    Options = KnowledgeOptions
    training_free = True

    def build_model(self, vocab_size: int, word_vectors: Tensor | None = None) -> nn.Module:
        return RawFeatureModel(vocab_size)

    def prototypes(self, model: nn.Module, knowledge: Knowledge) -> Tensor:
        # The plain mean of the raw features, then normalised (the cosine of the score).
        return l2_normalize(word_prototypes(knowledge))
