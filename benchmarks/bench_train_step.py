"""One CHAN training step: fastalign's fused similarity versus the plain-PyTorch 4-D way.

The step of configs/chan_f30k.yaml: batch 128, R = 36 regions of 2048-d features, caption
lengths like Flickr30K's (log-normal, median 11.5 words, sigma 0.38, clamped to 4..40;
padded to the batch's longest caption, as ``collate_pairs`` does), D = 1024, BiGRU text
encoder (300-d words, a Flickr30K-sized vocabulary of 8481), similarity t2i / max over
regions / LSE over words at tau 0.1 with score_scale 10, VSE++ hinge (margin 0.05, hardest
negatives), Adam. The two models are one :class:`MatchingModel` (same weights); the plain
one computes its similarity as CHAN does: the (Ni, Nt, R, L) tensor cropped to the batch's
longest caption, masked max over regions, masked LSE over words.

Two cases, each for both implementations:

- ``similarity + loss``: forward + backward of the similarity and the loss on fixed
  precomputed embeddings (the encoders' output on the batch) that require grad; the call
  returns the embeddings' gradients (the outputs column).
- ``whole step``: encoders forward, similarity, loss, ``zero_grad``, backward, Adam step,
  in the order of ``fastalign.training.Trainer``. It is measured in steady state: the
  parameters, their gradients and Adam's moments exist before the call and are not counted
  (the rise is what the step itself needs); the call returns only the loss.

Before timing, both models' scores on the batch are checked to agree within 1e-5. Times
are medians of ``--repeat`` calls after a warm-up, the two implementations' calls
alternating so that a change in a shared machine's load affects both alike.

    python benchmarks/bench_train_step.py [--device cpu|cuda] [--repeat N]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import (  # noqa: E402
    interleaved_times_ms,
    machine_description,
    peak_memory_mib,
    report,
    serve_memory_request,
)
from bench_region_word import caption_lengths  # noqa: E402

from fastalign import region_word_similarity  # noqa: E402
from fastalign.losses import hinge_triplet_loss  # noqa: E402
from fastalign.models import MatchingModel, ModelConfig  # noqa: E402
from fastalign.tokens import Tokens  # noqa: E402

BATCH = 128
N_REGIONS = 36
VOCAB_SIZE = 8481  # SCAN / CHAN's Flickr30K vocabulary
MARGIN = 0.05
LR = 5e-4
TOLERANCE = 1e-5
CONFIG = ModelConfig(
    feature_dim=2048,
    embed_dim=1024,
    word_dim=300,
    direction="t2i",
    align="max",
    aggregate="lse",
    aggregate_tau=0.1,
    score_scale=10.0,
)
PARTS = {"similarity": "similarity + loss, fwd+bwd", "step": "whole training step"}
IMPLS = {"plain": "plain (4-D einsum)", "fastalign": "fastalign"}


# --------------------------------------------------------------------------- the models
def plain_chan_similarity(regions, region_lengths, words, word_lengths, tau=0.1):
    """CHAN's similarity in plain PyTorch: (Ni, R, D) x (Nt, L, D) -> (Ni, Nt).

    The (Ni, Nt, R, L) region-word tensor, cropped to the longest caption; max over each
    image's valid regions, then ``tau * logsumexp(. / tau)`` over each caption's words.
    """
    n_words = int(word_lengths.max())
    words = words[:, :n_words]
    scores = torch.einsum("ird,twd->itrw", regions, words)
    region_mask = torch.arange(regions.shape[1], device=regions.device) < region_lengths[:, None]
    aligned = scores.masked_fill(~region_mask[:, None, :, None], float("-inf")).max(dim=2).values
    word_mask = torch.arange(n_words, device=words.device) < word_lengths[:, None]
    aligned = aligned.masked_fill(~word_mask[None], float("-inf"))
    return tau * torch.logsumexp(aligned / tau, dim=-1)


class PlainChanModel(MatchingModel):
    """The same backbone, scored by :func:`plain_chan_similarity`."""

    def similarity(self, images: Tokens, captions: Tokens):
        scores = plain_chan_similarity(*images, *captions, self.config.aggregate_tau)
        return scores * self.config.score_scale


def fastalign_similarity(images: Tokens, captions: Tokens):
    """The fastalign model's scaled score on given embeddings (what the loss sees)."""
    scores = region_word_similarity(
        images.embs,
        captions.embs,
        images.lengths,
        captions.lengths,
        **CONFIG.similarity_options(),
    )
    return scores * CONFIG.score_scale


def plain_similarity(images: Tokens, captions: Tokens):
    """The plain model's scaled score on given embeddings."""
    scores = plain_chan_similarity(*images, *captions, CONFIG.aggregate_tau)
    return scores * CONFIG.score_scale


def make_model(impl: str, device) -> MatchingModel:
    torch.manual_seed(0)  # both implementations start from the same weights
    model_class = PlainChanModel if impl == "plain" else MatchingModel
    return model_class(VOCAB_SIZE, CONFIG).to(device).train()


def make_batch(device, seed: int = 0):
    """(regions (B, R, 2048), region_lengths, captions (B, L), caption_lengths)."""
    g = torch.Generator().manual_seed(seed)
    lengths, _ = caption_lengths(BATCH, "flickr", g)
    n_words = int(lengths.max())  # padded to the batch's longest caption
    regions = torch.randn(BATCH, N_REGIONS, CONFIG.feature_dim, generator=g).relu()
    captions = torch.randint(1, VOCAB_SIZE, (BATCH, n_words), generator=g)
    captions = captions.masked_fill(torch.arange(n_words) >= lengths[:, None], 0)
    region_lengths = torch.full((BATCH,), N_REGIONS)
    return tuple(x.to(device) for x in (regions, region_lengths, captions, lengths))


# --------------------------------------------------------------------------- the cases
def build_case(key: str):
    """``key`` = part:impl:device; returns a zero-argument callable."""
    part, impl, device = key.split(":", 2)
    device = torch.device(device)
    model = make_model(impl, device)
    regions, region_lengths, captions, word_lengths = make_batch(device)
    if part == "similarity":
        similarity = plain_similarity if impl == "plain" else fastalign_similarity
        with torch.no_grad():
            images = model.encode_images(regions, region_lengths)
            texts = model.encode_captions(captions, word_lengths)
        images = Tokens(images.embs.requires_grad_(), images.lengths)
        texts = Tokens(texts.embs.requires_grad_(), texts.lengths)
        del model

        def similarity_and_loss():
            scores = similarity(images, texts)
            loss = hinge_triplet_loss(scores, MARGIN, max_violation=True)
            return torch.autograd.grad(loss, (images.embs, texts.embs))

        return similarity_and_loss

    return training_step_case(
        model,
        (regions, region_lengths, captions, word_lengths),
        lambda images, texts: hinge_triplet_loss(
            model.similarity(images, texts), MARGIN, max_violation=True
        ),
    )


def training_step_case(model, batch: tuple, loss_fn):
    """A zero-argument training step in the trainer's order: ``model(*batch)`` (image and
    caption tokens), ``loss_fn(images, captions)``, ``zero_grad``, backward, Adam step;
    returns the detached loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)

    def training_step():
        loss = loss_fn(*model(*batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return training_step


def method_setup(config_name: str, overrides, device):
    """(method, model, pair batch, loss context) of a bundled config on :func:`make_batch`'s
    batch, the model's weights seeded (every method starts from the same backbone), past the
    warm-up epoch (epoch 1)."""
    from fastalign.config import load_config
    from fastalign.data import PairBatch
    from fastalign.methods import LossContext, get_method

    config = load_config(config_name, ["word_vectors=null", f"device={device}", *overrides])
    method = get_method(config.method)(config)
    torch.manual_seed(0)
    model = method.build_model(VOCAB_SIZE).to(device).train()
    index = torch.arange(BATCH, device=device)
    batch = PairBatch(*make_batch(torch.device(device)), image_index=index, caption_index=index)
    return method, model, batch, LossContext(batch=batch, epoch=1)


def method_step_case(method, model, batch, context):
    """:func:`training_step_case` with the method's weighted loss terms
    (``Method.loss_terms``, as the trainer calls them)."""
    weights = method.loss_weights()

    def loss_fn(images, captions):
        terms = method.loss_terms(model, images, captions, context)
        return sum(weights[name] * term for name, term in terms.items())

    return training_step_case(model, tuple(batch[:4]), loss_fn)


def check_agreement(device) -> float:
    """Max |fastalign - plain| of the two models' (scaled) scores on the batch."""
    batch = make_batch(device)
    with torch.no_grad():
        fast_model, plain_model = make_model("fastalign", device), make_model("plain", device)
        fast = fast_model.similarity(*fast_model(*batch))
        plain = plain_model.similarity(*plain_model(*batch))
    gap = float((fast - plain).abs().max())
    if not gap <= TOLERANCE:
        raise SystemExit(f"fastalign and plain scores differ by {gap:.2e} > {TOLERANCE:g}")
    return gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    word_lengths = make_batch("cpu")[3].float()
    print(
        f"batch {BATCH}: caption lengths mean {word_lengths.mean():.1f}, "
        f"longest {int(word_lengths.max())}"
    )
    gap = check_agreement(device)
    print(f"scores (x score_scale) on the batch: max |fastalign - plain| = {gap:.2e}")

    rows = []
    for part in PARTS:
        cases = {impl: build_case(f"{part}:{impl}:{device}") for impl in IMPLS}
        times = interleaved_times_ms(cases, device, args.repeat)
        del cases
        plain = None
        for impl in IMPLS:
            key = f"{part}:{impl}:{device}"
            case = build_case(key) if device.type == "cuda" else None
            memory = peak_memory_mib(key, case, device)
            del case
            plain = plain or (times[impl], memory)
            rows.append(_row(part, impl, times[impl], memory, plain))
    if device.type == "cpu":
        print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    title = (
        f"CHAN training step (batch {BATCH}, R {N_REGIONS}, Flickr30K-like lengths, "
        f"D {CONFIG.embed_dim}) on {machine_description(device)}"
    )
    report(rows, "train_step", title)


def _row(part, impl, ms, memory, plain):
    """One table row; working memory = peak rise minus the returned tensors."""
    peak, outputs = memory
    plain_ms, (plain_peak, plain_outputs) = plain
    working = max(peak - outputs, 0.0)
    plain_working = max(plain_peak - plain_outputs, 1e-9)
    return {
        "case": PARTS[part],
        "impl": IMPLS[impl],
        "time_ms": ms,
        "speedup": plain_ms / ms,
        "peak_MiB": peak,
        "outputs_MiB": outputs,
        "working_MiB": working,
        "peak_vs_plain": f"{100 * peak / max(plain_peak, 1e-9):.1f}%",
        "working_vs_plain": f"{100 * working / plain_working:.1f}%",
    }


if __name__ == "__main__":
    # In the memory-measuring child the warm-up and the measured call share one case, so
    # that the step is measured in steady state (Adam's moments and gradients exist).
    if not serve_memory_request(functools.cache(build_case)):
        main()
