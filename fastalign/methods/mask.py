"""MASK (ICLR 2026, "Multimodal Aligned Semantic Knowledge for Unpaired Image-text
Matching"): knowledge prototypes in a learned space, and prototypes for words out of it.

Unpaired: training batches are word-region pairs of the knowledge folder
(:class:`~fastalign.data.knowledge.KnowledgeLoader`), never image-caption pairs. Its parts:

* prototype-aware encoder h: region feature r (F) -> Linear(F, D) -> ``layers``
  Transformer encoder layers -> LayerNorm -> (mu, log sigma^2), D = ``embed_dim`` (512).
  Each region is encoded on its own (a knowledge row is one region, so the attention of a
  layer sees the region alone: our reading, the paper does not say over which tokens it
  runs), at training and at evaluation alike.
* feature restoration g (VAE-style): z = mu + sigma * eps (eps ~ N(0, I) in training,
  z = mu otherwise) -> MLP -> r'. L_ir = KL(N(mu, sigma^2) || N(0, I)) + ||r - r'||^2,
  each the mean over the batch and the feature columns (our scaling).
* modality transfer f: mu -> MLP -> the Dw-d word-vector space. L_cm = mean_i (1 -
  cos(w_i, f(mu_i))) + mean_ij (cos(f(mu_i), f(mu_j)) - cos(mu_i, mu_j))^2 (the relation-
  preserving "struct-A" term over the batch's pairs), w_i the word vector of region i's
  word.
* prototype consistency L_cl: InfoNCE with each prototype as the anchor and the batch's
  region means as the candidates, a region of the same word positive: for every word k in
  the batch, -log(sum_{i: word i = k} e^{cos(P_k, mu_i) / tau} / sum_i e^{cos(P_k, mu_i) /
  tau}), averaged over those words; tau = ``cl_tau`` (0.1, our choice).
* L = L_ir + ``cm_weight`` L_cm + ``cl_weight`` L_cl (3 and 3).
* knowledge: K concepts, prototype P_k = the mean of mu over the regions of word k, rebuilt
  after every epoch (and when a run starts) by one streamed pass over the knowledge
  (:func:`~fastalign.data.knowledge.word_prototypes`), kept in the checkpoint.
* matching: s(image, caption) = mean over the caption's words of the max over the image's
  regions of mu . U_w (U_w the word's prototype; :func:`fastalign.region_word_similarity`
  t2i / max / mean). A word out of the knowledge that has a word vector gets
  :func:`fastalign.prototype_topk_mix` of the prototypes of the ``oov_m`` (10) concepts
  whose word vectors are nearest (``oov: false`` drops such words, as MACK does); other
  words are dropped.

Batch 4096 then 2048, 400 epochs, Adam 1e-4 in the paper; the bundled configs say what
they use. Every term's exact form above marked "our" is an option or documented choice.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastalign import distributed
from fastalign.fields import check_fields, setting
from fastalign.methods import register_method
from fastalign.methods.base import LossContext
from fastalign.methods.mack import KnowledgeMatchingModel, KnowledgeMethod


@dataclass
class MaskOptions:
    """MASK's section (``mask.key=value``); see the module docstring."""

    knowledge: str | None = None  # the knowledge folder; None: <data_root>/knowledge
    embed_dim: int = setting(512, minimum=1)
    layers: int = setting(3, minimum=0)
    heads: int = setting(8, minimum=1)
    cm_weight: float = setting(3.0, minimum=0)  # lambda1
    cl_weight: float = setting(3.0, minimum=0)  # lambda2
    cl_tau: float = setting(0.1, above=0)
    oov: bool = True  # reconstruct words out of the knowledge (False: drop them)
    # A file of the words eligible for reconstruction (whitespace-separated), e.g. the
    # captions' nouns from a part-of-speech tagger; None: every word with a vector.
    oov_words: str | None = None
    oov_m: int = setting(10, minimum=1)
    oov_tau: float = setting(1.0, above=0)

    def __post_init__(self) -> None:
        check_fields(self, "mask.")
        if self.embed_dim % self.heads:
            raise ValueError(
                f"mask.embed_dim = {self.embed_dim} must be a multiple of mask.heads = {self.heads}"
            )


@dataclass
class MaskOutputs:
    """The training forward of a batch of B regions."""

    mu: Tensor  # (B, D)
    logvar: Tensor  # (B, D)
    restored: Tensor  # (B, F)
    transferred: Tensor  # (B, Dw)


class MaskModel(KnowledgeMatchingModel):
    """MASK's encoder, feature restoration and modality transfer, with the knowledge."""

    def __init__(
        self, vocab_size: int, feature_dim: int, word_dim: int, options: MaskOptions
    ) -> None:
        super().__init__(vocab_size, oov_m=options.oov_m, oov_tau=options.oov_tau)
        dim = options.embed_dim
        self.project = nn.Linear(feature_dim, dim)
        layer = nn.TransformerEncoderLayer(
            dim, options.heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True
        )
        self.layers = nn.TransformerEncoder(layer, options.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.mu = nn.Linear(dim, dim)
        self.logvar = nn.Linear(dim, dim)
        self.restore = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, feature_dim))
        self.transfer = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, word_dim))

    def encode(self, regions: Tensor) -> tuple[Tensor, Tensor]:
        """(..., F) region features -> (mu, log sigma^2), each (..., D)."""
        flat = regions.reshape(-1, 1, regions.shape[-1]).float()
        hidden = self.norm(self.layers(self.project(flat)))[:, 0]
        shape = (*regions.shape[:-1], -1)
        return self.mu(hidden).reshape(shape), self.logvar(hidden).reshape(shape)

    def embed_regions(self, regions: Tensor) -> Tensor:
        return self.encode(regions)[0]

    def forward(self, regions: Tensor, noise: Tensor | None = None) -> MaskOutputs:
        """(B, F) knowledge regions -> the training outputs; ``noise`` (B, D) standard
        normal draws give z = mu + sigma * noise (None: z = mu)."""
        mu, logvar = self.encode(regions)
        z = mu if noise is None else mu + torch.exp(0.5 * logvar) * noise
        return MaskOutputs(mu, logvar, self.restore(z), self.transfer(mu))


def restoration_loss(regions: Tensor, out: MaskOutputs) -> Tensor:
    """L_ir: KL(N(mu, sigma^2) || N(0, I)) + ||r - r'||^2, means over rows and columns."""
    kl = 0.5 * (out.mu.square() + out.logvar.exp() - 1.0 - out.logvar).mean()
    return kl + (out.restored - regions).square().mean()


def _cosines(x: Tensor) -> Tensor:
    x = F.normalize(x, dim=1)
    return x @ x.T


def transfer_loss(mu: Tensor, transferred: Tensor, word_vectors: Tensor) -> Tensor:
    """L_cm: mean (1 - cos(w, f(mu))) + mean over pairs of (cos(f(mu_i), f(mu_j)) -
    cos(mu_i, mu_j))^2. mu (B, D), transferred (B, Dw), word_vectors (B, Dw)."""
    alignment = (1.0 - F.cosine_similarity(transferred, word_vectors, dim=1)).mean()
    relations = (_cosines(transferred) - _cosines(mu)).square().mean()
    return alignment + relations


def prototype_contrastive_loss(
    mu: Tensor, concepts: Tensor, prototypes: Tensor, tau: float
) -> Tensor:
    """L_cl: for each concept k among ``concepts`` (B,), InfoNCE of prototype k (anchor)
    against the B region means mu (B, D), the regions of concept k positive; averaged."""
    present = torch.unique(concepts)
    logits = F.normalize(prototypes[present], dim=1) @ F.normalize(mu, dim=1).T / tau
    positive = present[:, None] == concepts[None, :]
    log_all = torch.logsumexp(logits, dim=1)
    log_positive = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
    return (log_all - log_positive).mean()


@register_method
class Mask(KnowledgeMethod):
    """MASK: a learned region space, prototypes rebuilt every epoch, OOV reconstruction."""

    name = "mask"
    Options = MaskOptions

    def __init__(self, config) -> None:
        super().__init__(config)
        self.noise_steps = 0  # the noise generator's seed of the next training step

    def words_to_reconstruct(self, oov: tuple[str, ...]) -> tuple[str, ...]:
        if not self.options.oov:
            return ()
        if self.options.oov_words is None:
            return oov
        path = Path(self.options.oov_words)
        if not path.is_file():
            raise FileNotFoundError(f"mask.oov_words: no such file {path}")
        eligible = set(path.read_text(encoding="utf-8").split())
        kept = tuple(word for word in oov if word in eligible)
        if distributed.rank() == 0:
            print(
                f"mask.oov_words: {len(kept)} of the {len(oov)} caption words out of the "
                f"knowledge are in {path} and reconstructed; the others are dropped",
                file=sys.stderr,
            )
        return kept

    @property
    def word_dim(self) -> int:
        return self.config.model.word_dim  # the modality transfer's output

    def build_model(self, vocab_size: int, word_vectors: Tensor | None = None) -> nn.Module:
        return MaskModel(
            vocab_size, self.config.model.feature_dim, self.config.model.word_dim, self.options
        )

    def batch_terms(self, model: nn.Module, forward: nn.Module, batch, context: LossContext):
        regions = batch.regions.float()
        # The global batch's draws from a generator of (seed, step), restored on resume.
        generator = torch.Generator(device=regions.device)
        generator.manual_seed((self.config.seed * 1_000_003 + self.noise_steps) % 2**63)
        self.noise_steps += 1
        noise = distributed.global_batch_normal(
            generator, len(regions), (self.options.embed_dim,), regions.device
        )
        out = forward(regions, noise)
        # Terms over the batch's pairs see the global batch (the same on every process).
        mu, concepts = context.gather(out.mu), context.gather(batch.concepts)
        words = model.knowledge.keys[batch.concepts]
        return {
            "ir": restoration_loss(regions, out),
            "cm": transfer_loss(mu, context.gather(out.transferred), context.gather(words)),
            "cl": prototype_contrastive_loss(
                mu, concepts, model.knowledge.values, self.options.cl_tau
            ),
        }

    def loss_weights(self) -> dict[str, float]:
        return {"ir": 1.0, "cm": self.options.cm_weight, "cl": self.options.cl_weight}

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        model.knowledge.set_values(self.prototypes(model, self._knowledge))

    def state_dict(self) -> dict:
        return {"noise_steps": self.noise_steps}

    def load_state_dict(self, state: dict) -> None:
        self.noise_steps = int(state["noise_steps"])
