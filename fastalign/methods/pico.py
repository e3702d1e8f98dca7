"""PICO (arXiv 2510.11175): semantic column weights from prototypes built iteratively with
performance feedback.

"Reliable Cross-modal Alignment via Prototype Iterative Construction" holds that embeddings
carry style (non-semantic) information along with semantics, gives every feature column d
a probability p_d of carrying semantics and weights the region-word interaction with it
[paper]:

    s(v_r, t_w) = sum_d p_d v_rd t_wd

inside the base score (LAPS's: both directions, max / mean on leaky-ReLU scores, from the
``model`` section), i.e. ``region_word_similarity(regions * p, words, ...)``. How p is built
is not public; what follows is our reconstruction [inferred], every part an option:

- Interaction statistics: with the global embeddings g^v_i, g^t_j (masked means of the
  region / word embeddings of the global batch) and e_ij,d = g^v_i,d g^t_j,d, the
  separation z_d = (mean of e over matched pairs - mean over unmatched pairs) / (std over
  all pairs + eps), from column sums in O(N D) (:func:`column_separation`). Pairs of the
  same image are matched.
- Pseudo-style prototypes: ``num_prototypes`` prototypes of the pair residuals
  u_i = g^v_i - g^t_i (what two views of the same semantics do not share), assigned by
  Sinkhorn and moved by EMA, owned by :class:`fastalign.nn.FeedbackPrototypes`.
- Performance feedback: prototype k's weight omega_k = softmax_k(beta Delta_k), Delta_k
  the EMA over steps of the decrease of the matching loss of its samples since they were
  last seen (a per-sample loss buffer over the training set); each sample's contribution
  to the prototype update is scaled by its prototypes' weights.
- Semantic probability: the style energy S_d = sum_k omega_k P_kd^2 / sum_k omega_k and
  p_d = sigmoid((zhat_d - lambda Shat_d) / tau_p), zhat and Shat standardised over the D
  columns; p is an EMA over steps (``p_momentum``) without gradient, starting at 1.
- Schedule: p = 1 and nothing is built during ``warmup_epochs``; afterwards every
  training step rebuilds the statistics, prototypes, omega and p from the global batch
  (gathered under torchrun, so that every rank holds the same state).

Ablation switches (fields of :class:`PicoOptions`, the ``pico`` config section):
``semantic_weights: false`` gives p = 1 and computes nothing (LAPS exactly, step for step);
``style_weight: 0`` gives p from z alone (no prototypes are built);
``feedback: false`` keeps omega uniform (no loss buffer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from fastalign.fields import check_fields, setting
from fastalign.methods import register_method
from fastalign.methods.base import LossContext, Method
from fastalign.nn import FeedbackPrototypes
from fastalign.tokens import Tokens

if TYPE_CHECKING:
    from fastalign.config import TrainConfig

# Columns the evaluation report names.
REPORTED_COLUMNS = 10


@dataclass
class PicoOptions:
    """The ``pico`` config section.

    ``semantic_weights``: weight the interaction by p (false: p = 1, LAPS). ``style_weight``
    (lambda): the style energy's weight in p (0: p from the separation z alone, no
    prototypes). ``feedback``: omega from the loss decreases (false: uniform).
    ``num_prototypes``, ``assign_tau``, ``sinkhorn_iters``, ``prototype_momentum``: the
    prototypes (Sinkhorn temperature and iterations, EMA momentum). ``beta``,
    ``feedback_momentum``: omega = softmax(beta Delta), Delta's EMA momentum. ``tau_p``,
    ``p_momentum``: p's temperature and EMA momentum. ``warmup_epochs``: epochs with p = 1
    before anything is built. ``eps``: added to the standard deviations.
    """

    semantic_weights: bool = True
    style_weight: float = setting(1.0, minimum=0)
    feedback: bool = True
    num_prototypes: int = setting(32, minimum=1)
    assign_tau: float = setting(0.1, above=0)
    sinkhorn_iters: int = setting(3, minimum=1)
    prototype_momentum: float = setting(0.9, minimum=0, maximum=1)
    beta: float = setting(10.0, minimum=0)
    feedback_momentum: float = setting(0.9, minimum=0, maximum=1)
    tau_p: float = setting(1.0, above=0)
    p_momentum: float = setting(0.9, minimum=0, maximum=1)
    warmup_epochs: int = setting(1, minimum=0)
    eps: float = setting(1e-6, above=0)

    def __post_init__(self) -> None:
        check_fields(self, "pico.")


def column_separation(
    image: Tensor, text: Tensor, image_index: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    """Per-column separation of matched from unmatched interactions, in O(N D).

    With e_ij,d = image_i,d * text_j,d over all N x N pairs (i, j):
    z_d = (mean over matched pairs - mean over unmatched pairs) / (std over all pairs + eps),
    the std biased. Pair (i, j) is matched when ``image_index[i] == image_index[j]`` (i == j
    when None). Every sum over pairs factorises into per-column sums over the rows (by
    image, for the matched ones), so no N x N x D tensor is formed.

    Args:
        image: (N, D) global image embeddings, row i of pair i.
        text: (N, D) global caption embeddings, row j of pair j.
        image_index: (N,) integer image id of each pair, or None (all distinct).
        eps: added to the standard deviation.

    Returns:
        (D,) z, in the inputs' dtype.

    Raises:
        ValueError: mismatched shapes, or every pair matched (no unmatched pair).
    """
    if image.dim() != 2 or image.shape != text.shape:
        raise ValueError(
            f"image and text must both be (N, D), got {tuple(image.shape)} and {tuple(text.shape)}"
        )
    n = image.shape[0]
    if image_index is None:
        groups = torch.arange(n, device=image.device)
    else:
        groups = torch.unique(
            torch.as_tensor(image_index, device=image.device), return_inverse=True
        )[1]
    n_groups = int(groups.max()) + 1
    n_matched = int(torch.bincount(groups).square().sum())
    n_unmatched = n * n - n_matched
    if n_unmatched == 0:
        raise ValueError("column_separation needs an unmatched pair: every pair has one image")
    total = image.sum(0) * text.sum(0)
    total_square = image.square().sum(0) * text.square().sum(0)
    by_image = image.new_zeros(n_groups, image.shape[1]).index_add_(0, groups, image)
    by_caption = text.new_zeros(n_groups, text.shape[1]).index_add_(0, groups, text)
    matched = (by_image * by_caption).sum(0)
    mean_all = total / (n * n)
    std = (total_square / (n * n) - mean_all.square()).clamp(min=0).sqrt()
    return (matched / n_matched - (total - matched) / n_unmatched) / (std + eps)


def standardised(x: Tensor, eps: float = 1e-6) -> Tensor:
    """(D,) -> (x - mean) / (biased std + eps) over the D entries."""
    return (x - x.mean()) / (x.std(correction=0) + eps)


def semantic_probability(
    z: Tensor,
    style_energy: Tensor | None,
    style_weight: float = 1.0,
    tau: float = 1.0,
    eps: float = 1e-6,
) -> Tensor:
    """p_d = sigmoid((zhat_d - style_weight * Shat_d) / tau), zhat and Shat the separation
    z (D,) and the style energy (D,) standardised over the D columns; z alone when
    ``style_energy`` is None."""
    logits = standardised(z, eps)
    if style_energy is not None:
        logits = logits - style_weight * standardised(style_energy, eps)
    return torch.sigmoid(logits / tau)


class PicoState(nn.Module):
    """What PICO keeps between steps: the semantic probability ``p`` (D,) and, when the
    style energy is used, the :class:`~fastalign.nn.FeedbackPrototypes` ``prototypes``."""

    p: Tensor

    def __init__(self, dim: int, options: PicoOptions, seed: int, backend: str) -> None:
        super().__init__()
        self.register_buffer("p", torch.ones(dim))
        self.prototypes = None
        if options.style_weight > 0:
            self.prototypes = FeedbackPrototypes(
                options.num_prototypes,
                dim,
                tau=options.assign_tau,
                iters=options.sinkhorn_iters,
                momentum=options.prototype_momentum,
                beta=options.beta,
                feedback_momentum=options.feedback_momentum,
                feedback=options.feedback,
                seed=seed,
                backend=backend,
            )


@register_method
class Pico(Method):
    """PICO: the base (LAPS) score with every embedding column weighted by its semantic
    probability p, built from interaction statistics and feedback-weighted style
    prototypes."""

    name = "pico"
    Options = PicoOptions
    base = "baseline"
    additions_off = {"semantic_weights": False}

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        self.state = PicoState(
            config.model.embed_dim, self.options, config.seed, config.model.backend
        )

    def similarity(self, model: nn.Module, images: Tokens, captions: Tokens) -> Tensor:
        if not self.options.semantic_weights:
            return super().similarity(model, images, captions)
        # p scales the image side of every product: sum_d p_d v_rd t_wd.
        weighted = Tokens(images.embs * self.state.p.to(images.embs), images.lengths)
        return super().similarity(model, weighted, captions)

    def loss_terms(
        self, model: nn.Module, images: Tokens, captions: Tokens, context: LossContext
    ) -> dict[str, Tensor]:
        if not self.options.semantic_weights:
            return super().loss_terms(model, images, captions, context)
        self.state.to(images.embs.device)
        match, pair_losses = self.matching_losses(model, images, captions, context)
        if context.epoch >= self.options.warmup_epochs:
            self._update(images, captions, pair_losses, context)
        return {"match": match}

    @torch.no_grad()
    def _update(
        self, images: Tokens, captions: Tokens, pair_losses: Tensor, context: LossContext
    ) -> None:
        """One step of the statistics, prototypes, omega and p on the global batch."""
        o, batch = self.options, context.batch
        dim = images.embs.shape[2]
        # One gather for all that the step reads (float64 holds the ids exactly), so that
        # every rank updates the same state from the same global batch.
        local = torch.cat(
            [
                Tokens(images.embs.detach(), images.lengths).mean_pooled().double(),
                Tokens(captions.embs.detach(), captions.lengths).mean_pooled().double(),
                pair_losses.double()[:, None],
                batch.caption_index.to(pair_losses.device).double()[:, None],
                batch.image_index.to(pair_losses.device).double()[:, None],
            ],
            dim=1,
        )
        gathered = context.gather(local)
        image, text = gathered[:, :dim], gathered[:, dim : 2 * dim]
        losses, sample_ids, image_index = gathered[:, 2 * dim :].T
        # A non-finite step (stopped or skipped by the trainer) and a batch of one image
        # (no unmatched pair) leave the state as it was.
        if not bool(gathered.isfinite().all()) or bool((image_index == image_index[0]).all()):
            return
        z = column_separation(image, text, image_index, o.eps)
        energy = None
        if self.state.prototypes is not None:
            prototypes = self.state.prototypes
            prototypes.step((image - text).float(), sample_ids.long(), losses.float())
            energy = prototypes.column_energy().double()
        p = semantic_probability(z, energy, o.style_weight, o.tau_p, o.eps)
        # A new tensor, not an in-place update: this step's graph holds the old p.
        self.state.p = o.p_momentum * self.state.p + (1 - o.p_momentum) * p.to(self.state.p)

    def epoch_logs(self) -> dict[str, float | Tensor]:
        if not self.options.semantic_weights:
            return {}
        p = self.state.p.detach().cpu()
        return {"p_min": p.min().item(), "p_mean": p.mean().item(), "p_max": p.max().item(), "p": p}

    def eval_report(self) -> str:
        if not self.options.semantic_weights:
            return ""
        p = self.state.p.detach().cpu()
        count = min(REPORTED_COLUMNS, p.numel())
        lowest = torch.argsort(p, stable=True)[:count].tolist()
        columns = ", ".join(f"{d} ({p[d].item():.3f})" for d in lowest)
        return (
            f"PICO semantic probability p over {p.numel()} columns: min {p.min().item():.3f}, "
            f"mean {p.mean().item():.3f}, max {p.max().item():.3f}\n"
            f"the {count} columns with the most style (lowest p): {columns}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().cpu().clone() for k, v in self.state.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state)
