"""The method interface: what the trainer, the config loader and the evaluator ask of one."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from fastalign import distributed
from fastalign.models import MatchingModel
from fastalign.tokens import Tokens

if TYPE_CHECKING:
    from fastalign.config import TrainConfig
    from fastalign.data import PairBatch


@dataclass
class NoOptions:
    """The section of a method that has no options of its own."""


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

    batch: PairBatch
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
    """

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    base: ClassVar[str | None] = None
    additions_off: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.options = config.options

    @classmethod
    def options_without_additions(cls, options: Any) -> Any:
        """``options`` with :attr:`additions_off` applied."""
        return dataclasses.replace(options, **cls.additions_off)

    def build_model(self, vocab_size: int, word_vectors: Tensor | None = None) -> nn.Module:
        """The model to train; its ``forward(regions, region_lengths, captions,
        caption_lengths)`` returns (image tokens, caption tokens)."""
        return MatchingModel(vocab_size, self.config.model, word_vectors)

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
