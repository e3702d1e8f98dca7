"""The method interface: what the trainer, the config loader and the evaluator ask of one."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from fastalign import distributed
from fastalign.data import PrecompDataset, load_word_vectors, make_loader
from fastalign.encoders import caption_tokenizer
from fastalign.models import MatchingModel
from fastalign.tokens import Tokens

if TYPE_CHECKING:
    from fastalign.config import TrainConfig
    from fastalign.data import PairBatch


@dataclass
class NoOptions:
    """The section of a method that has no options of its own."""


@dataclass
class RunData:
    """The data of a training run, as the trainer hands them to a method.

    Attributes:
        root: the dataset folder (resolved).
        word_vectors: the run's word-vector file (``word_vectors``, or the synthetic set's
            ``glove_synthetic.txt``), or None.
        train_set: the paired train split; None for a method that trains on other data
            (:attr:`Method.paired_training` False).
    """

    root: Path
    word_vectors: Path | None
    train_set: PrecompDataset | None = None


@dataclass
class LossContext:
    """What a method's loss sees besides the embeddings.

    Attributes:
        batch: this process's share of the global batch, on the training device.
        epoch: the 0-based epoch being trained.
        gather: maps a (B, ...) tensor of this process to the global batch's (W * B, ...),
            differentiably (the identity on one process): terms that need the whole batch
            (statistics over pairs) gather their inputs with it.
    """

    batch: PairBatch | Any  # what the method's train_loader yields
    epoch: int
    gather: Callable[[Tensor], Tensor] = distributed.all_gather_with_grad


class Method:
    """A method: its name, options section, model, loss terms, similarity and state.

    Subclasses set ``name`` and ``Options`` and override what they change; the defaults are
    the shared backbone's (:class:`~fastalign.models.MatchingModel`, its fine-grained score,
    the matching loss alone). Register a subclass with
    :func:`fastalign.methods.register_method`.

    The loss contract: :meth:`loss_terms` returns unweighted scalars, one per term, and
    :meth:`loss_weights` their weights; the trainer differentiates ``sum weight * term``
    and logs every term. Under ``torch.distributed`` each process returns its terms such
    that DDP's averaging of the gradients gives the gradient of the loss on the global batch
    and the mean over processes of a term's value is its value on the global batch
    (:func:`fastalign.distributed.global_batch_loss` for the matching loss; terms computed
    on gathered inputs are the same on every process).

    Class attributes:
        name: the registry key, the config's ``method:`` value and the name of its section.
        Options: the dataclass of its section (``name.key=value`` overrides).
        base: the method this one adds to, or None.
        additions_off: option values that switch every addition off; the method then
            trains exactly as ``base`` (same losses, step by step: tested for every method).
        paired_training: whether it trains on the paired train split (the default batches
            of :meth:`train_loader`); when False the trainer never opens that split.
        training_free: True for a method with nothing to train (run with ``epochs: 0``; its
            model has no optimiser): :meth:`prepare` makes the model.

    A run asks, in this order: :meth:`tokenizer`, :meth:`initial_word_vectors` and
    :meth:`build_model`, :meth:`prepare` (new runs only), then per epoch
    :meth:`train_loader` and per batch :meth:`batch_terms`.
    """

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    base: ClassVar[str | None] = None
    additions_off: ClassVar[dict[str, Any]] = {}
    paired_training: ClassVar[bool] = True
    training_free: ClassVar[bool] = False

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.options = config.options

    @classmethod
    def options_without_additions(cls, options: Any) -> Any:
        """``options`` with :attr:`additions_off` applied."""
        return dataclasses.replace(options, **cls.additions_off)

    def tokenizer(self, data: RunData | None, state: dict | None = None) -> Any:
        """The captions' tokenizer: the one saved in ``state`` (a checkpoint's), else one
        built for ``data``. Default: the text encoder's
        (:func:`fastalign.encoders.caption_tokenizer`, a vocabulary of the train captions)."""
        root = data.root if data is not None else None
        return caption_tokenizer(self.config.model, state, root, self.config.train_split)

    def initial_word_vectors(self, data: RunData, tokenizer: Any) -> Tensor | None:
        """(len(tokenizer), word_dim) vectors that initialise a new model's word embedding,
        or None. Default: the run's word-vector file for the BiGRU text encoder."""
        if data.word_vectors is None or self.config.model.text_encoder != "bigru":
            return None
        return load_word_vectors(data.word_vectors, tokenizer, dim=self.config.model.word_dim)[0]

    def build_model(self, vocab_size: int, word_vectors: Tensor | None = None) -> nn.Module:
        """The model to train; its ``forward(regions, region_lengths, captions,
        caption_lengths)`` returns (image tokens, caption tokens)."""
        return MatchingModel(vocab_size, self.config.model, word_vectors)

    def prepare(self, model: nn.Module, data: RunData, tokenizer: Any) -> None:
        """Called once when a new run starts (not on resume), after :meth:`build_model`:
        fills what the model holds from the data beyond its weights. Default: nothing."""

    def train_loader(self, data: RunData, epoch: int, world_size: int) -> Iterable:
        """The global batches of the 0-based ``epoch`` (an iterable with ``len``), in an
        order that depends on (seed, epoch) only. Default: the train split's pairs
        (:class:`~fastalign.data.PairBatch`), shuffled."""
        c = self.config
        loader = make_loader(
            data.train_set, c.batch_size, shuffle=True, seed=c.seed, drop_last=world_size > 1
        )
        loader.sampler.set_epoch(epoch)
        return loader

    def train_features_file(self, data: RunData) -> Path:
        """The file whose rows ``batch.source_rows()`` of :meth:`train_loader`'s batches
        name (in error messages). Default: the train split's features."""
        return data.train_set.features_file

    def batch_terms(
        self, model: nn.Module, forward: nn.Module, batch: Any, context: LossContext
    ) -> dict[str, Tensor]:
        """The unweighted loss terms of one training batch (this process's share of it).
        ``forward`` is ``model`` or its DistributedDataParallel wrapper: call it for the
        forward pass so that gradients are synchronised. Default: the pairs encoded, then
        :meth:`loss_terms`."""
        images, captions = forward(
            batch.regions, batch.region_lengths, batch.captions, batch.caption_lengths
        )
        return self.loss_terms(model, images, captions, context)

    def similarity(self, model: nn.Module, images: Tokens, captions: Tokens) -> Tensor:
        """(Ni, Nt) scores of image and caption tokens: what training and evaluation rank."""
        return model.similarity(images, captions)

    def matching_loss(
        self, model: nn.Module, images: Tokens, captions: Tokens, context: LossContext
    ) -> Tensor:
        """The trainer's matching loss (hinge with the hardest negative after the warm-up
        epochs, or InfoNCE) on :meth:`similarity`, over the global batch."""
        return self.matching_losses(model, images, captions, context)[0]

    def matching_losses(
        self, model: nn.Module, images: Tokens, captions: Tokens, context: LossContext
    ) -> tuple[Tensor, Tensor]:
        """:meth:`matching_loss` and the (B,) detached matching losses of this process's
        pairs (see :func:`fastalign.distributed.global_batch_losses`), from one scoring."""
        c = self.config
        return distributed.global_batch_losses(
            images,
            captions,
            context.batch.image_index,
            lambda i, t: self.similarity(model, i, t).float(),
            loss=c.loss,
            margin=c.margin,
            max_violation=context.epoch >= c.warmup_epochs,
            temperature=c.temperature,
        )

    def loss_terms(
        self, model: nn.Module, images: Tokens, captions: Tokens, context: LossContext
    ) -> dict[str, Tensor]:
        """The unweighted loss terms of a batch, by name (scalars)."""
        return {"match": self.matching_loss(model, images, captions, context)}

    def loss_weights(self) -> dict[str, float]:
        """The weight of every term :meth:`loss_terms` may return."""
        return {"match": 1.0}

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        """Called after each training epoch (1-based ``epoch``), before validation."""

    def epoch_logs(self) -> dict[str, float | Tensor]:
        """What the method reports after each epoch (after :meth:`on_epoch_end`): a float
        goes to the epoch line, ``log.csv`` (the epoch's row) and TensorBoard
        (``method/<name>``), a tensor to TensorBoard as a histogram. None by default."""
        return {}

    def eval_report(self) -> str:
        """Text that ``fastalign eval`` prints after the recall table ("" for none)."""
        return ""

    def state_dict(self) -> dict[str, Any]:
        """What the method keeps beyond the model's weights (saved in checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"method {self.name!r} keeps no state, got keys {sorted(state)}")
