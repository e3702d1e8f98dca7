"""Module forms of the fastalign operators, for use inside models."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastalign.ops.dimension_correlation import (
    DEFAULT_OFF_DIAGONAL_WEIGHT,
    dimension_correlation_loss,
)
from fastalign.ops.prototypes import prototype_assign, prototype_topk_mix, prototype_update
from fastalign.ops.region_word import region_word_similarity
from fastalign.ops.sparse_spatial import sparse_spatial_loss
from fastalign.tokens import Tokens


class RegionWordSimilarity(nn.Module):
    """:func:`fastalign.region_word_similarity` with its options fixed at construction.

    ``forward(regions (Ni, R, D), words (Nt, L, D), region_lengths=None, word_lengths=None)``
    returns the (Ni, Nt) score matrix.
    """

    def __init__(
        self,
        direction: str = "t2i",
        align: str = "max",
        aggregate: str = "mean",
        align_tau: float = 0.1,
        aggregate_tau: float = 0.1,
        score_activation: str | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.options = dict(
            direction=direction,
            align=align,
            aggregate=aggregate,
            align_tau=align_tau,
            aggregate_tau=aggregate_tau,
            score_activation=score_activation,
            backend=backend,
        )

    def forward(
        self,
        regions: Tensor,
        words: Tensor,
        region_lengths: Tensor | None = None,
        word_lengths: Tensor | None = None,
    ) -> Tensor:
        return region_word_similarity(regions, words, region_lengths, word_lengths, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class DimensionCorrelationLoss(nn.Module):
    """:func:`fastalign.dimension_correlation_loss` with its options fixed at construction.

    ``forward(a (N, D), b (N, D))`` returns the scalar regularizer of the paired features.
    """

    def __init__(
        self,
        mode: str = "barlow",
        off_diagonal_weight: float = DEFAULT_OFF_DIAGONAL_WEIGHT,
        tau: float = 0.1,
        eps: float = 1e-5,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.options = dict(
            mode=mode,
            off_diagonal_weight=off_diagonal_weight,
            tau=tau,
            eps=eps,
            backend=backend,
        )

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return dimension_correlation_loss(a, b, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class SparseSpatialLoss(nn.Module):
    """:func:`fastalign.sparse_spatial_loss` with its options fixed at construction.

    ``forward(img (N, D), txt (N, D))`` returns the scalar loss. ``alpha`` may be an
    ``nn.Parameter`` (0-d, or (N,) for a fixed batch size): it is registered, so that a soft
    threshold is learned with the model.
    """

    def __init__(
        self,
        kind: str = "inter",
        select: str = "threshold",
        alpha: float | Tensor = 1.0,
        k: int | None = None,
        temperature: float = 0.05,
        largest: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(alpha, nn.Parameter):
            self.alpha = alpha  # learned with the model
        elif isinstance(alpha, Tensor):
            self.register_buffer("alpha", alpha)  # moves with the model
        else:
            self.alpha = alpha
        self.options = dict(
            kind=kind, select=select, k=k, temperature=temperature, largest=largest, backend=backend
        )

    def forward(self, img: Tensor, txt: Tensor) -> Tensor:
        return sparse_spatial_loss(img, txt, alpha=self.alpha, **self.options)

    def extra_repr(self) -> str:
        alpha = "tensor" if isinstance(self.alpha, Tensor) else repr(self.alpha)
        return f"alpha={alpha}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class PrototypeBank(nn.Module):
    """K prototypes of dimension D with :func:`fastalign.prototype_assign` and
    :func:`fastalign.prototype_update` (PICO prototypes, SwAV-style codes).

    The prototypes start as random unit rows (from ``generator`` when given). They are a
    buffer updated by :meth:`update` (EMA), or an ``nn.Parameter`` trained by the optimiser
    when ``learnable``; either way they live in ``state_dict`` under ``"prototypes"``.

    ``assign(x (N, D))`` / ``forward`` returns the (N, K) assignments; ``update(x (N, D),
    assignments (N, K))`` moves the prototypes in place and returns them.
    """

    prototypes: Tensor

    def __init__(
        self,
        num_prototypes: int,
        dim: int,
        mode: str = "softmax",
        tau: float = 0.1,
        iters: int = 3,
        normalize: bool = True,
        momentum: float = 0.9,
        learnable: bool = False,
        backend: str = "auto",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        initial = F.normalize(torch.randn(num_prototypes, dim, generator=generator), dim=1)
        if learnable:
            self.prototypes = nn.Parameter(initial)
        else:
            self.register_buffer("prototypes", initial)
        self.options = dict(mode=mode, tau=tau, iters=iters, normalize=normalize, backend=backend)
        self.momentum = momentum

    def assign(self, x: Tensor, mode: str | None = None) -> Tensor:
        """(N, K) assignments of x (N, D); ``mode`` overrides the bank's for this call."""
        options = self.options if mode is None else {**self.options, "mode": mode}
        return prototype_assign(x, self.prototypes, **options)

    def forward(self, x: Tensor) -> Tensor:
        return self.assign(x)

    @torch.no_grad()
    def update(self, x: Tensor, assignments: Tensor) -> Tensor:
        """EMA step towards the assignment-weighted means of x, in place (re-normalised rows
        when the bank assigns by cosine); returns the prototypes."""
        moved = prototype_update(
            self.prototypes,
            x,
            assignments,
            self.momentum,
            normalize=self.options["normalize"],
            backend=self.options["backend"],
        )
        self.prototypes.copy_(moved)
        return self.prototypes

    def extra_repr(self) -> str:
        count, dim = self.prototypes.shape
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{count}, {dim}, {options}, momentum={self.momentum}"


class KnowledgeBase(nn.Module):
    """K (key, value) pairs queried by :func:`fastalign.prototype_topk_mix`: MASK's
    concept word vectors (keys, (K, Dk)) and their prototypes (values, (K, Dv)), which
    reconstruct the prototype of a word out of the knowledge from its word vector.

    Both are buffers (saved in ``state_dict``, never trained), empty until :meth:`set`; a
    state dict of any K loads. ``forward(queries (N, Dk))`` returns (N, Dv): for each query
    the softmax(query . key / tau)-weighted mean of the values of its ``m`` keys of highest
    cosine.
    """

    keys: Tensor
    values: Tensor

    def __init__(self, m: int = 10, tau: float = 1.0, backend: str = "auto") -> None:
        super().__init__()
        self.m, self.tau, self.backend = m, tau, backend
        self.register_buffer("keys", torch.zeros(0, 0))
        self.register_buffer("values", torch.zeros(0, 0))
        self.version = 0  # bumped whenever the pairs are replaced (for caches of them)

    @torch.no_grad()
    def set(self, keys: Tensor, values: Tensor) -> None:
        """Replaces the pairs: keys (K, Dk) and values (K, Dv), one row per key."""
        if keys.dim() != 2 or values.dim() != 2 or len(keys) != len(values):
            raise ValueError(
                f"keys (K, Dk) and values (K, Dv) must have one row per key, got "
                f"{tuple(keys.shape)} and {tuple(values.shape)}"
            )
        self.keys = keys.detach().clone()
        self.values = values.detach().clone()
        self.version += 1

    @torch.no_grad()
    def set_values(self, values: Tensor) -> None:
        """Replaces the values (K, Dv) of the same keys."""
        if values.dim() != 2 or len(values) != len(self.keys):
            raise ValueError(
                f"values must be ({len(self.keys)}, Dv), one row per key, got {tuple(values.shape)}"
            )
        self.values = values.detach().clone()
        self.version += 1

    def forward(self, queries: Tensor) -> Tensor:
        return prototype_topk_mix(
            queries, self.keys, self.values, m=self.m, tau=self.tau, backend=self.backend
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in ("keys", "values"):  # any K: take the saved shapes
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, getattr(self, name).new_empty(saved.shape))
        self.version += 1
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        shapes = f"keys={tuple(self.keys.shape)}, values={tuple(self.values.shape)}"
        return f"{shapes}, m={self.m}, tau={self.tau}"


class FeedbackPrototypes(nn.Module):
    """K prototypes of D-dimensional vectors, each weighted by how much the loss of its
    samples fell (PICO's pseudo-style prototypes with performance feedback).

    :meth:`step` on a batch of vectors x (N, D), their sample ids and current losses:

    1. assigns x to the prototypes with :func:`fastalign.prototype_assign` in
       ``"sinkhorn"`` mode (balanced, cosine scores at ``tau``, ``iters`` iterations);
    2. feedback: a sample seen before contributes the decrease of its loss since then (a
       per-sample loss buffer, grown to the largest id seen); prototype k's ``delta`` is the
       EMA (``feedback_momentum``) over steps of the assignment-weighted mean decrease of
       its samples (unchanged in a step where none of them was seen before), and
       omega = softmax(beta * delta);
    3. moves the prototypes with :func:`fastalign.prototype_update` (EMA ``momentum`` of the
       assignment-weighted means, not re-normalised), each sample's row of the assignment
       scaled by K * sum_k a_nk omega_k (1 for uniform omega).

    With ``feedback=False`` omega stays uniform and no loss is kept. The prototypes start
    as random unit rows drawn from ``seed`` (not from the global generator).

    Buffers (in ``state_dict``): ``prototypes`` (K, D), ``delta`` (K,) and ``sample_loss``
    (n,), NaN for the samples never seen; loading a state takes its ``sample_loss`` length.
    """

    prototypes: Tensor
    delta: Tensor
    sample_loss: Tensor

    def __init__(
        self,
        num_prototypes: int,
        dim: int,
        tau: float = 0.1,
        iters: int = 3,
        momentum: float = 0.9,
        beta: float = 10.0,
        feedback_momentum: float = 0.9,
        feedback: bool = True,
        seed: int = 0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        initial = F.normalize(torch.randn(num_prototypes, dim, generator=generator), dim=1)
        self.register_buffer("prototypes", initial)
        self.register_buffer("delta", torch.zeros(num_prototypes))
        self.register_buffer("sample_loss", torch.zeros(0))
        self.tau, self.iters, self.momentum = tau, iters, momentum
        self.beta, self.feedback_momentum, self.feedback = beta, feedback_momentum, feedback
        self.backend = backend

    def omega(self) -> Tensor:
        """(K,) feedback weights, summing to 1."""
        return torch.softmax(self.beta * self.delta, dim=0)

    def column_energy(self) -> Tensor:
        """(D,) the omega-weighted mean over prototypes of each column's square,
        sum_k omega_k P_kd^2 / sum_k omega_k."""
        return self.omega() @ self.prototypes.square()

    @torch.no_grad()
    def step(self, x: Tensor, sample_ids: Tensor, losses: Tensor | None = None) -> Tensor:
        """One feedback and update step (see the class); returns the (N, K) assignments.

        Args:
            x: (N, D) vectors, in the prototypes' dtype and device.
            sample_ids: (N,) int64 ids (>= 0) of the samples, distinct.
            losses: (N,) current losses of the samples; needed with ``feedback``.
        """
        x = x.to(self.prototypes)
        assignments = prototype_assign(
            x, self.prototypes, "sinkhorn", self.tau, self.iters, backend=self.backend
        )
        weights = assignments
        if self.feedback:
            if losses is None:
                raise ValueError("losses are needed when feedback is on")
            self._feedback(assignments, sample_ids, losses.to(self.delta))
            # Rows scaled by their prototypes' weights: where a sample is shared between
            # prototypes, those that lowered the loss take more of it.
            scale = assignments @ self.omega() * assignments.shape[1]
            weights = assignments * scale[:, None]
        moved = prototype_update(
            self.prototypes, x, weights, self.momentum, normalize=False, backend=self.backend
        )
        self.prototypes.copy_(moved)
        return assignments

    def _feedback(self, assignments: Tensor, sample_ids: Tensor, losses: Tensor) -> None:
        """Moves ``delta`` by the loss decreases of the samples seen before and records the
        current losses."""
        needed = int(sample_ids.max()) + 1
        if needed > self.sample_loss.numel():
            grown = self.sample_loss.new_full((needed,), math.nan)
            grown[: self.sample_loss.numel()] = self.sample_loss
            self.sample_loss = grown
        decrease = self.sample_loss[sample_ids] - losses  # NaN: never seen
        seen = decrease.isfinite()
        weights = assignments * seen[:, None]
        mass = weights.sum(dim=0)
        mean = (weights.T @ decrease.nan_to_num()) / mass.clamp(min=1e-12)
        mixed = self.feedback_momentum * self.delta + (1 - self.feedback_momentum) * mean
        self.delta.copy_(torch.where(mass > 0, mixed, self.delta))
        self.sample_loss[sample_ids] = losses

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        saved = state_dict.get(prefix + "sample_loss")
        if saved is not None:  # the buffer grows with the ids seen: take the saved length
            self.sample_loss = self.sample_loss.new_empty(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        count, dim = self.prototypes.shape
        return (
            f"{count}, {dim}, tau={self.tau}, iters={self.iters}, momentum={self.momentum}, "
            f"beta={self.beta}, feedback_momentum={self.feedback_momentum}, "
            f"feedback={self.feedback}"
        )


class SkipDecoder(nn.Module):
    """One decoder path of :class:`DualPathUNet`: two layers, each fed a skip connection
    from the encoder (the first from h2, the second from h1, UNet style).

    ``forward(draws (B, Z, T, H), h1 (B, T, H), h2 (B, T, H))`` returns (B, T, D), the mean
    over the Z draws of
    ``layer2(GELU(layer1(draw) + skip1(h2))) + skip2(h1)``.
    The second layer is affine, so the mean over the draws is taken before it (one matmul
    instead of Z).
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layer1 = nn.Linear(hidden, hidden)
        self.skip1 = nn.Linear(hidden, hidden, bias=False)
        self.layer2 = nn.Linear(hidden, dim)
        self.skip2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, draws: Tensor, h1: Tensor, h2: Tensor) -> Tensor:
        d1 = F.gelu(self.layer1(draws) + self.skip1(h2).unsqueeze(-3))
        return self.layer2(d1.mean(-3)) + self.skip2(h1)


class DualPathUNet(nn.Module):
    """CDDS's dual-path UNet on token embeddings: a shared 2-layer encoder and a semantic
    and a modality decoder (:class:`SkipDecoder`) with skip connections.

    For x (B, T, D): h1 = GELU(encoder1(x)) and H = h2 = GELU(encoder2(h1)), both (B, T, H);
    each draw k of ``noise`` (B, Z, T, H) gives H + sigma_n * noise_k (training; with
    ``noise=None`` the single draw H itself: evaluation); each decoder returns the mean over
    the draws of its output (B, T, D). Every token is processed on its own: a padded token
    influences no other token's output. ``hidden`` (H) defaults to D / 4 (at least 1): the
    bottleneck is narrower than the input, as in a UNet; the layers cost 5 H D + (2 Z + 3)
    H^2 multiply-adds a token, 1.8 D^2 at H = D / 4 and Z = 3 against 14 D^2 at H = D.

    The layers see x * sqrt(D) and their outputs are divided by sqrt(D): L2-normalised
    tokens (components about 1 / sqrt(D)) then reach them with unit-variance components, the
    scale nn.Linear's initialisation is made for, and the parts come out in x's units. Fed
    the tokens as they are, the biases outweigh the input about six to one in every output
    column at initialisation (D = 256), every token's parts point the same way, and the
    matching loss cannot start (CDDS stayed at chance on the synthetic ``hard`` preset).

    With ``residual`` (the default), the semantic part is x plus the semantic decoder's
    output: it starts near x and the decoder learns what to take away. Without it, the
    semantic part is the decoder's output alone; everything x carries must then pass the
    bottleneck, and on the synthetic ``hard`` preset that form learned the matching about
    five times slower than the base model in the warm-up epoch and, on two of three seeds,
    fell back to chance with the hardest negatives.

    ``forward(x, noise=None, modality=True, lengths=None)`` returns (semantic (B, T, D),
    modality (B, T, D), or None without ``modality``). With ``lengths`` (B,), only the valid
    tokens (the first lengths[b] of sequence b) go through the layers, packed, and the
    padded ones come out 0: the same outputs at the valid tokens, for the padding's share of
    the work less.
    """

    def __init__(
        self, dim: int, hidden: int | None = None, sigma_n: float = 0.1, residual: bool = True
    ) -> None:
        super().__init__()
        hidden = max(dim // 4, 1) if hidden is None else hidden
        self.hidden = hidden
        self.sigma_n = sigma_n
        self.residual = residual
        self.scale = math.sqrt(dim)
        self.encoder1 = nn.Linear(dim, hidden)
        self.encoder2 = nn.Linear(hidden, hidden)
        self.semantic = SkipDecoder(dim, hidden)
        self.modality = SkipDecoder(dim, hidden)

    def forward(
        self,
        x: Tensor,
        noise: Tensor | None = None,
        modality: bool = True,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        if x.dim() != 3:
            raise ValueError(f"x must be (B, T, D), got shape {tuple(x.shape)}")
        b, t = x.shape[:2]
        if noise is not None and (
            noise.dim() != 4 or noise.shape[0] != b or noise.shape[2:] != (t, self.hidden)
        ):
            raise ValueError(
                f"noise must be (B, Z, T, H) = ({b}, Z, {t}, {self.hidden}), "
                f"got {tuple(noise.shape)}"
            )
        if lengths is None:
            return self._layers(x, noise, modality)
        if lengths.shape != (b,):
            raise ValueError(f"lengths must be ({b},), got shape {tuple(lengths.shape)}")
        valid = Tokens(x, lengths).valid_mask()
        # the valid tokens as one sequence: (1, n, D), its noise (1, Z, n, H)
        packed_noise = None if noise is None else noise.transpose(1, 2)[valid].transpose(0, 1)[None]
        outputs = self._layers(x[valid][None], packed_noise, modality)
        return tuple(  # type: ignore[return-value]
            None if y is None else x.new_zeros(b, t, y.shape[-1]).index_put((valid,), y[0])
            for y in outputs
        )

    def _layers(
        self, x: Tensor, noise: Tensor | None, modality: bool
    ) -> tuple[Tensor, Tensor | None]:
        h1 = F.gelu(self.encoder1(x * self.scale))
        h2 = F.gelu(self.encoder2(h1))
        if noise is None:
            draws = h2.unsqueeze(1)
        else:
            draws = h2.unsqueeze(1) + self.sigma_n * noise.to(h2.dtype)
        semantic = self.semantic(draws, h1, h2) / self.scale
        if self.residual:
            semantic = semantic + x
        return semantic, (self.modality(draws, h1, h2) / self.scale if modality else None)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, sigma_n={self.sigma_n}, residual={self.residual}"
