"""CDDS (AAAI 2026): constrained decoupling into semantic and modality parts, and
distribution sampling.

"Aligning the True Semantics: Constrained Decoupling and Distribution Sampling" splits
every token embedding into a semantic and a modality part, finds which image feature
columns carry the same semantics as which text columns, and matches each modality's
semantics after mapping them into the other modality's distribution. What is known comes
from two secondary summaries [paper summaries]: a dual-path UNet, related-semantics
identification by the KL divergence of feature-column distributions kept by a soft
threshold mean + alpha_i std with learnable alpha_i, distribution sampling at
corresponding quantiles, the losses L_s, L_m, L_f, L_x with the total

    alpha_s L_s + alpha_m L_m + alpha_f L_f + (1 - alpha_f) L_x,

and the base score (LAPS's: both directions, max / mean on leaky-ReLU scores, from the
``model`` section). The exact forms are our reconstruction (SPEC 2.4) [inferred], each an
option of :class:`CddsOptions`:

- Decoupling: a :class:`fastalign.nn.DualPathUNet` per modality on the (B, T, D) token
  embeddings V (images) and T (text) gives the semantic parts V^s, T^s and the modality
  parts V^m, T^m, each the mean over ``draws`` noisy draws of the bottleneck during
  training and one noiseless pass at evaluation. With ``residual`` (default) the semantic
  part is the token plus its decoder's output, V^s = V + dec_s(V); without it,
  V^s = dec_s(V), which on the synthetic ``hard`` preset stayed near chance on two of
  three seeds.
- Related semantics: per column d the Gaussian N(mu_d, sigma_d^2) of the semantic parts
  over the global batch's valid tokens, for images and for text
  (:func:`column_moments`, :func:`gaussians_from_moments`); KL_ij = KL(N^v_i || N^t_j) in
  closed form (:func:`gaussian_kl_matrix`); P(j | i) = softmax_j(-KL_ij / tau) and
  W = ``sparse_select(P, select="soft", alpha=alpha, temperature=T,
  exclude_diagonal=False)`` with a learnable (D,) alpha (:func:`related_weights`).
- Distribution sampling: image column i's x-semantic Gaussian is the moment-matched
  mixture of the text columns' Gaussians with the row-normalised W
  (:func:`mixture_gaussians`); V^x maps V^s column by column onto it by the quantile map
  between two Gaussians (:func:`quantile_map`). T^x likewise, with W^T (text column j's
  mixture of the image columns related to it).
- Losses, each a term of :meth:`Cdds.loss_terms` (logged as ``loss_<name>``):
  ``match`` = L_s, the trainer's matching loss on the score
  (s(V^x, T^s) + s(V^s, T^x)) / 2, s the ``model`` section's fine-grained score of the
  L2-normalised parts (the same score ranks at evaluation);
  ``modality`` = L_m, the mean over the samples and columns of KL(sample's Gaussian of its
  modality part || the batch's), the two modalities averaged;
  ``fusion`` = L_f = ||w_s V^s + w_m V^m - V||^2 with learnable scalars w_s, w_m;
  ``sampled`` = L_x = ||V^x + V^m - V||^2, both means over valid tokens, the two
  modalities averaged.
- Evaluation: the noiseless parts, and the column Gaussians of the semantic parts kept as
  running averages over the training batches (``stats_momentum``, like batch norm's), so
  that a score does not depend on what else is scored with it.

Under ``torch.distributed`` every statistic is of the global batch (its column sums are
gathered), the noise of the global batch is drawn on every rank from the same generator,
and each rank returns its share of every term scaled as
:func:`fastalign.distributed.global_batch_loss` scales the matching loss: any number of
processes gives the numbers of one.

Ablation switches: ``decouple: false`` builds no UNet and computes none of the above
(V^s = V, the ``match`` term alone: the base LAPS model, step for step); ``noise: false``
draws no noise (one pass on H); ``sampling: false`` matches V^s with T^s directly
(V^x = V^s, T^x = T^s: no statistics, no alpha); a loss weight of 0 leaves its term
uncomputed (``alpha_f: 1`` drops L_x, ``alpha_f: 0`` drops L_f and w_s, w_m).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastalign import distributed
from fastalign.fields import check_fields, setting
from fastalign.methods import register_method
from fastalign.methods.base import LossContext, Method
from fastalign.models import MatchingModel, ModelConfig
from fastalign.nn import DualPathUNet
from fastalign.ops.sparse_spatial import sparse_select
from fastalign.tokens import Tokens

if TYPE_CHECKING:
    from fastalign.config import TrainConfig


@dataclass
class CddsOptions:
    """The ``cdds`` config section.

    Switches: ``decouple`` (false: no UNet, V^s = V: the base model exactly), ``noise``
    (false: no noise draws), ``sampling`` (false: V^x = V^s and T^x = T^s, direct matching),
    ``residual`` (false: V^s is the semantic decoder's output alone, not V plus it).
    Loss weights: ``alpha_s`` (L_s), ``alpha_m`` (L_m), ``alpha_f`` (L_f; L_x gets
    1 - alpha_f); a weight of 0 leaves its term uncomputed. The UNet: ``hidden_dim``
    (None: D / 4, a UNet's narrower bottleneck), ``draws`` (z, noise draws per token in
    training), ``sigma_n`` (the noise's std). Related semantics: ``tau`` (of P(j | i) =
    softmax(-KL / tau)), ``temperature`` (T, of the soft threshold, in units of 1 / D: P's
    rows average 1 / D, so :func:`sparse_select` gets T / D and one value fits every
    embedding size), ``alpha_init`` (alpha's initial value in every column). ``normalize``:
    L2-normalise the parts' tokens before scoring them. ``stats_momentum``: of the running
    column statistics that evaluation uses. ``eps``: added to every variance.
    """

    decouple: bool = True
    noise: bool = True
    sampling: bool = True
    residual: bool = True
    alpha_s: float = setting(1.0, minimum=0)
    alpha_m: float = setting(0.1, minimum=0)
    alpha_f: float = setting(0.5, minimum=0, maximum=1)
    hidden_dim: int | None = setting(None, minimum=1)
    draws: int = setting(3, minimum=1)
    sigma_n: float = setting(0.1, minimum=0)
    tau: float = setting(0.1, above=0)
    temperature: float = setting(0.1, above=0)
    alpha_init: float = 1.0
    normalize: bool = True
    stats_momentum: float = setting(0.9, minimum=0, maximum=1)
    eps: float = setting(1e-6, above=0)

    def __post_init__(self) -> None:
        check_fields(self, "cdds.")
        if not math.isfinite(self.alpha_init):
            raise ValueError(f"cdds.alpha_init must be finite, got {self.alpha_init}")
        if not self.decouple and self.alpha_s == 0:
            raise ValueError(
                "cdds.alpha_s must be > 0 when cdds.decouple is false: the matching loss is "
                "then the only term"
            )

    def weights(self) -> dict[str, float]:
        """The weight of every term; only the positive ones are computed."""
        if not self.decouple:
            return {"match": self.alpha_s}
        return {
            "match": self.alpha_s,
            "modality": self.alpha_m,
            "fusion": self.alpha_f,
            "sampled": 1.0 - self.alpha_f,
        }

    @property
    def uses_alpha(self) -> bool:
        """Whether the learnable alpha takes part in a computed term (through V^x, T^x)."""
        return self.decouple and self.sampling and (self.alpha_s > 0 or self.alpha_f < 1)


# --------------------------------------------------------------------------- pure functions
def masked(tokens: Tokens) -> Tensor:
    """(N, T, D) embeddings with the padded tokens set to 0 (no value, no gradient leaks)."""
    return tokens.embs.masked_fill(~tokens.valid_mask()[..., None], 0.0)


def column_moments(tokens: Tokens) -> Tensor:
    """(2 D + 1,) [sum over the valid tokens of x (D,), of x^2 (D,), their count]: the
    column moments of (N, T, D) tokens, additive over batches and ranks."""
    x = masked(tokens)
    count = tokens.lengths.to(x).sum().reshape(1)
    return torch.cat([x.sum((0, 1)), x.square().sum((0, 1)), count])


def gaussians_from_moments(moments: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-column (mean (D,), variance (D,)) from :func:`column_moments`' (2 D + 1,) sums:
    the biased variance (moment matching), clamped at 0 against rounding, plus ``eps``."""
    d = (moments.shape[0] - 1) // 2
    count = moments[-1]
    mean = moments[:d] / count
    var = (moments[d : 2 * d] / count - mean.square()).clamp(min=0) + eps
    return mean, var


def sequence_gaussians(tokens: Tokens, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per sequence and column, (mean (N, D), biased variance + eps (N, D)) of (N, T, D)
    tokens over each sequence's valid tokens (two passes: no cancellation)."""
    valid = tokens.valid_mask()[..., None]
    lengths = tokens.lengths.to(tokens.embs)[:, None]
    mean = masked(tokens).sum(1) / lengths
    centred = (tokens.embs - mean[:, None]).masked_fill(~valid, 0.0)
    return mean, centred.square().sum(1) / lengths + eps


def gaussian_kl(mean_p: Tensor, var_p: Tensor, mean_q: Tensor, var_q: Tensor) -> Tensor:
    """KL(N(mean_p, var_p) || N(mean_q, var_q)) elementwise (broadcasting):
    (log(var_q / var_p) + (var_p + (mean_p - mean_q)^2) / var_q - 1) / 2."""
    return 0.5 * (
        torch.log(var_q) - torch.log(var_p) + (var_p + (mean_p - mean_q).square()) / var_q - 1
    )


def gaussian_kl_matrix(mean_p: Tensor, var_p: Tensor, mean_q: Tensor, var_q: Tensor) -> Tensor:
    """(D, D') KL_ij = KL(N(mean_p_i, var_p_i) || N(mean_q_j, var_q_j)) of (D,) and (D',)
    Gaussians, in closed form."""
    return gaussian_kl(mean_p[:, None], var_p[:, None], mean_q[None, :], var_q[None, :])


def related_weights(kl: Tensor, alpha: Tensor | float, tau: float, temperature: float) -> Tensor:
    """(D, D') soft related-semantics weights of a (D, D') KL matrix: P(j | i) =
    softmax_j(-KL_ij / tau), kept by :func:`fastalign.sparse_select`'s soft threshold
    sigmoid((P_ij - mean_i - alpha_i std_i) / temperature) over each row (all D'
    candidates). ``alpha``: float or (D,) tensor (learnable: it receives its gradient).
    P's entries average 1 / D': :class:`Cdds` passes its ``temperature`` option over D'."""
    p = torch.softmax(-kl / tau, dim=1)
    return sparse_select(
        p, select="soft", alpha=alpha, temperature=temperature, exclude_diagonal=False
    )


def mixture_gaussians(
    weights: Tensor, mean: Tensor, var: Tensor, floor: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """The moment-matched Gaussian of each row's mixture: with w = ``weights`` (D, D') plus
    ``floor`` row-normalised, mean_i = sum_j w_ij mean_j and var_i = sum_j w_ij (var_j +
    (mean_j - mean_i)^2), from the (D',) means and variances; returns ((D,), (D,)).

    The floor keeps a row whose soft weights all vanish (every entry far below its
    threshold: sigmoid underflows to 0) finite, with a gradient: it mixes every column
    alike. The variance is a weighted sum of non-negative terms: no cancellation."""
    w = weights + floor
    w = w / w.sum(1, keepdim=True)
    mixed_mean = w @ mean
    mixed_var = (w * (var[None, :] + (mean[None, :] - mixed_mean[:, None]).square())).sum(1)
    return mixed_mean, mixed_var


def quantile_map(
    x: Tensor, mean_from: Tensor, var_from: Tensor, mean_to: Tensor, var_to: Tensor
) -> Tensor:
    """The quantile map between two Gaussians per column (the last dimension): x (..., D)
    at quantile q of N(mean_from, var_from) goes to quantile q of N(mean_to, var_to),
    (x - mean_from) / std_from * std_to + mean_to (standardise, rescale, shift)."""
    return (x - mean_from) * torch.sqrt(var_to / var_from) + mean_to


def _no_autocast(device: torch.device):
    """The distribution statistics run in float32 or wider even under autocast (bf16 sums of
    squares and D x D mixtures would lose the small variances)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()


# --------------------------------------------------------------------------- the model
class CddsModel(MatchingModel):
    """The shared backbone plus CDDS's parameters: a :class:`~fastalign.nn.DualPathUNet`
    per modality (``image_unet``, ``text_unet``), the (D,) soft-threshold ``alpha`` (when a
    computed term uses it), the scalars ``w_s``, ``w_m`` of L_f (when alpha_f > 0), and the
    buffers of the running column statistics of the semantic parts, ``semantic_mean`` and
    ``semantic_var`` (2, D), row 0 images, row 1 text, and ``stats_batches`` (batches
    seen). Parameters no computed term reads are not built: under DDP every parameter
    must get a gradient."""

    semantic_mean: Tensor
    semantic_var: Tensor
    stats_batches: Tensor

    def __init__(
        self,
        vocab_size: int,
        config: ModelConfig,
        options: CddsOptions,
        word_vectors: Tensor | None = None,
    ) -> None:
        super().__init__(vocab_size, config, word_vectors)
        dim = config.embed_dim
        unet = (dim, options.hidden_dim, options.sigma_n, options.residual)
        self.image_unet = DualPathUNet(*unet)
        self.text_unet = DualPathUNet(*unet)
        self.alpha = (
            nn.Parameter(torch.full((dim,), options.alpha_init)) if options.uses_alpha else None
        )
        self.w_s = nn.Parameter(torch.ones(())) if options.alpha_f > 0 else None
        self.w_m = nn.Parameter(torch.ones(())) if options.alpha_f > 0 else None
        if options.sampling:
            self.register_buffer("semantic_mean", torch.zeros(2, dim))
            self.register_buffer("semantic_var", torch.ones(2, dim))
            self.register_buffer("stats_batches", torch.zeros((), dtype=torch.int64))


def _wide(x: Tensor) -> Tensor:
    """x in float32, or float64 if it is (bf16 under autocast becomes float32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _normalized(x: Tensor, on: bool) -> Tensor:
    return F.normalize(x, dim=-1) if on else x


@register_method
class Cdds(Method):
    """CDDS: the base (LAPS) score on the semantic parts of a dual-path UNet, each
    modality's semantics mapped into the other's distribution, plus the decoupling
    losses."""

    name = "cdds"
    Options = CddsOptions
    base = "baseline"
    additions_off = {"decouple": False, "noise": False, "sampling": False}

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        self.options: CddsOptions = config.options
        self.noise_steps = 0  # the noise generator's seed of the next training step
        self._logs: dict[str, float | Tensor] = {}

    def build_model(self, vocab_size: int, word_vectors: Tensor | None = None) -> nn.Module:
        if not self.options.decouple:
            return super().build_model(vocab_size, word_vectors)
        return CddsModel(vocab_size, self.config.model, self.options, word_vectors)

    # ----------------------------------------------------------------------- scores
    def _pack(
        self, sem_image: Tensor, x_image: Tensor, sem_text: Tensor, x_text: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The parts to score, side by side along the features: images [V^x | V^s] and text
        [T^s | T^x] (2 D), or V^s and T^s alone (D) without sampling; normalised when
        ``normalize``. One gather of each side then serves both scores."""
        n = self.options.normalize
        if not self.options.sampling:
            return _normalized(sem_image, n), _normalized(sem_text, n)
        image = torch.cat([_normalized(x_image, n), _normalized(sem_image, n)], -1)
        text = torch.cat([_normalized(sem_text, n), _normalized(x_text, n)], -1)
        return image, text

    def _packed_score(self, model: nn.Module, images: Tokens, captions: Tokens) -> Tensor:
        """(Ni, Nt) the CDDS score of packed parts (see :meth:`_pack`):
        (s(V^x, T^s) + s(V^s, T^x)) / 2, or s(V^s, T^s) without sampling."""
        if not self.options.sampling:
            return model.similarity(images, captions)
        d = images.embs.shape[-1] // 2
        crossed = model.similarity(
            Tokens(images.embs[..., :d], images.lengths),
            Tokens(captions.embs[..., :d], captions.lengths),
        )
        mirrored = model.similarity(
            Tokens(images.embs[..., d:], images.lengths),
            Tokens(captions.embs[..., d:], captions.lengths),
        )
        return (crossed + mirrored) / 2

    def similarity(self, model: nn.Module, images: Tokens, captions: Tokens) -> Tensor:
        o = self.options
        if not o.decouple:
            return super().similarity(model, images, captions)
        sem_image = model.image_unet(images.embs, modality=False, lengths=images.lengths)[0]
        sem_text = model.text_unet(captions.embs, modality=False, lengths=captions.lengths)[0]
        x_image, x_text = sem_image, sem_text
        if o.sampling:
            with _no_autocast(sem_image.device):
                mean, var = model.semantic_mean, model.semantic_var
                x_image, x_text = self._sampled(
                    model, _wide(sem_image), _wide(sem_text), mean[0], var[0], mean[1], var[1]
                )
        packed = self._pack(sem_image, x_image, sem_text, x_text)
        return self._packed_score(
            model, Tokens(packed[0], images.lengths), Tokens(packed[1], captions.lengths)
        )

    def _sampled(
        self,
        model: CddsModel,
        sem_image: Tensor,
        sem_text: Tensor,
        mean_v: Tensor,
        var_v: Tensor,
        mean_t: Tensor,
        var_t: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """(V^x, T^x): each side's semantic parts mapped into its x-semantic Gaussians, the
        mixtures of the other side's related columns."""
        o = self.options
        alpha = model.alpha if model.alpha is not None else o.alpha_init
        kl = gaussian_kl_matrix(mean_v, var_v, mean_t, var_t)
        # The temperature option is in units of 1 / D, the mean of P's rows (see the class).
        weights = related_weights(kl, alpha, o.tau, o.temperature / kl.shape[1])
        x_mean_v, x_var_v = mixture_gaussians(weights, mean_t, var_t)
        x_mean_t, x_var_t = mixture_gaussians(weights.T, mean_v, var_v)
        # The statistics may be float64 (training): the tokens keep their own dtype.
        image_stats = (mean_v, var_v, x_mean_v, x_var_v + o.eps)
        text_stats = (mean_t, var_t, x_mean_t, x_var_t + o.eps)
        x_image = quantile_map(sem_image, *(v.to(sem_image) for v in image_stats))
        x_text = quantile_map(sem_text, *(v.to(sem_text) for v in text_stats))
        return x_image, x_text

    # ----------------------------------------------------------------------- training
    def _noise(self, images: Tokens, captions: Tokens, hidden: int, context: LossContext):
        """(B, Z, T, H) standard normal draws for this rank's images and captions.

        Every rank draws the global batch's noise from a generator seeded by the run's seed
        and the step count (the same on every rank, restored on resume, independent of the
        global generator) and keeps its own rows, so the draws of a pair do not depend on
        the number of processes."""
        b, device = images.count, images.embs.device
        longest = torch.tensor(
            [[images.embs.shape[1], captions.embs.shape[1]]], dtype=torch.float64, device=device
        )
        t_image, t_caption = (int(v) for v in context.gather(longest).max(0).values.tolist())
        generator = torch.Generator(device=device)
        generator.manual_seed((self.config.seed * 1_000_003 + self.noise_steps) % 2**63)
        self.noise_steps += 1
        return [
            distributed.global_batch_normal(
                generator, b, (self.options.draws, longest_t, hidden), device
            )[:, :, : tokens.embs.shape[1]]
            for tokens, longest_t in ((images, t_image), (captions, t_caption))
        ]

    def loss_terms(
        self, model: nn.Module, images: Tokens, captions: Tokens, context: LossContext
    ) -> dict[str, Tensor]:
        o = self.options
        if not o.decouple:
            return super().loss_terms(model, images, captions, context)
        weights = o.weights()
        noise_image = noise_text = None
        if o.noise and o.sigma_n > 0:
            noise_image, noise_text = self._noise(
                images, captions, model.image_unet.hidden, context
            )
        sem_image, mod_image = model.image_unet(images.embs, noise_image, lengths=images.lengths)
        sem_text, mod_text = model.text_unet(captions.embs, noise_text, lengths=captions.lengths)
        device = sem_image.device
        with _no_autocast(device):
            parts = {
                "sem_image": Tokens(_wide(sem_image), images.lengths),
                "sem_text": Tokens(_wide(sem_text), captions.lengths),
                "mod_image": Tokens(_wide(mod_image), images.lengths),
                "mod_text": Tokens(_wide(mod_text), captions.lengths),
            }
            # One differentiable gather of every column sum: the statistics of the global
            # batch, the same on every rank. In float64: the soft threshold divides P's
            # differences by T / D, which would turn float32 rounding (sums in another order
            # on another number of processes) into visible changes of the weights.
            local = torch.stack(
                [column_moments(Tokens(t.embs.double(), t.lengths)) for t in parts.values()]
            )
            gathered = context.gather(local[None])
            world, moments = gathered.shape[0], dict(zip(parts, gathered.sum(0)))
            x_image, x_text = parts["sem_image"].embs, parts["sem_text"].embs
            if o.sampling:
                mean_v, var_v = gaussians_from_moments(moments["sem_image"], o.eps)
                mean_t, var_t = gaussians_from_moments(moments["sem_text"], o.eps)
                x_image, x_text = self._sampled(
                    model, x_image, x_text, mean_v, var_v, mean_t, var_t
                )
                self._track(model, mean_v, var_v, mean_t, var_t)
            terms = {}
            if weights["modality"] > 0:
                terms["modality"] = world * self._modality_share(parts, moments, world)
            reconstructed = {
                "image": masked(Tokens(_wide(images.embs), images.lengths)),
                "text": masked(Tokens(_wide(captions.embs), captions.lengths)),
            }
            counts = {"image": moments["sem_image"][-1], "text": moments["sem_text"][-1]}
            if weights["fusion"] > 0:
                w_s, w_m = model.w_s, model.w_m
                fused = {
                    "image": w_s * parts["sem_image"].embs + w_m * parts["mod_image"].embs,
                    "text": w_s * parts["sem_text"].embs + w_m * parts["mod_text"].embs,
                }
                terms["fusion"] = world * self._error_share(fused, reconstructed, parts, counts)
            if weights["sampled"] > 0:
                resampled = {
                    "image": x_image + parts["mod_image"].embs,
                    "text": x_text + parts["mod_text"].embs,
                }
                terms["sampled"] = world * self._error_share(
                    resampled, reconstructed, parts, counts
                )
        if weights["match"] > 0:
            packed_image, packed_text = self._pack(
                parts["sem_image"].embs, x_image, parts["sem_text"].embs, x_text
            )
            c = self.config
            terms["match"] = distributed.global_batch_loss(
                Tokens(packed_image, images.lengths),
                Tokens(packed_text, captions.lengths),
                context.batch.image_index,
                lambda i, t: _wide(self._packed_score(model, i, t)),
                loss=c.loss,
                margin=c.margin,
                max_violation=context.epoch >= c.warmup_epochs,
                temperature=c.temperature,
            )
        return {name: terms[name] for name in weights if name in terms}

    def _modality_share(
        self, parts: dict[str, Tokens], moments: dict[str, Tensor], world: int
    ) -> Tensor:
        """This rank's share of L_m: the sum over its samples and the columns of
        KL(sample's Gaussian || global batch's), over (global samples x D), the two
        modalities averaged."""
        share = 0.0
        for key in ("mod_image", "mod_text"):
            tokens = parts[key]
            batch_mean, batch_var = gaussians_from_moments(moments[key], self.options.eps)
            mean, var = sequence_gaussians(tokens, self.options.eps)
            kl = gaussian_kl(mean, var, batch_mean, batch_var)
            share = share + kl.sum() / (world * kl.numel())
        return (share / 2).to(parts["sem_image"].embs.dtype)

    def _error_share(
        self,
        approximations: dict[str, Tensor],
        targets: dict[str, Tensor],
        parts: dict[str, Tokens],
        counts: dict[str, Tensor],
    ) -> Tensor:
        """This rank's share of a reconstruction error ||approximation - target||^2: its
        sum over the rank's valid tokens over the global count, the two modalities
        averaged."""
        share = 0.0
        for side, key in (("image", "sem_image"), ("text", "sem_text")):
            lengths = parts[key].lengths
            error = masked(Tokens(approximations[side] - targets[side], lengths))
            share = share + error.square().sum() / counts[side]
        return (share / 2).to(parts["sem_image"].embs.dtype)

    @torch.no_grad()
    def _track(
        self, model: CddsModel, mean_v: Tensor, var_v: Tensor, mean_t: Tensor, var_t: Tensor
    ) -> None:
        """Running column statistics for evaluation: the first batch's, then an EMA; a
        batch with a non-finite statistic (a step the trainer stops or skips) leaves them.
        Written with ``where``: no host sync."""
        mean = torch.stack([mean_v, mean_t]).to(model.semantic_mean)
        var = torch.stack([var_v, var_t]).to(model.semantic_var)
        finite = mean.isfinite().all() & var.isfinite().all()
        m = torch.where(model.stats_batches > 0, self.options.stats_momentum, 0.0).to(mean)
        model.semantic_mean.copy_(
            torch.where(finite, m * model.semantic_mean + (1 - m) * mean, model.semantic_mean)
        )
        model.semantic_var.copy_(
            torch.where(finite, m * model.semantic_var + (1 - m) * var, model.semantic_var)
        )
        model.stats_batches += finite.to(model.stats_batches.dtype)

    def loss_weights(self) -> dict[str, float]:
        return self.options.weights()

    # ----------------------------------------------------------------------- reports
    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        logs: dict[str, float | Tensor] = {}
        alpha = getattr(model, "alpha", None)
        if alpha is not None:
            alpha = alpha.detach().float().cpu()
            logs |= {"alpha_mean": alpha.mean().item(), "alpha_min": alpha.min().item()}
            logs |= {"alpha_max": alpha.max().item(), "alpha": alpha}
        if getattr(model, "w_s", None) is not None:
            logs |= {"w_s": model.w_s.item(), "w_m": model.w_m.item()}
        self._logs = logs

    def epoch_logs(self) -> dict[str, float | Tensor]:
        return dict(self._logs)

    def state_dict(self) -> dict[str, int]:
        if not self.options.decouple:
            return {}
        return {"noise_steps": self.noise_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not self.options.decouple:
            super().load_state_dict(state)
            return
        self.noise_steps = int(state["noise_steps"])
