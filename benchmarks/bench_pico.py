"""PICO versus LAPS: what the semantic column weights cost in a training step.

The batch of ``bench_train_step.py`` (128 pairs, R = 36 regions of 2048-d features,
Flickr30K-like caption lengths, BiGRU text encoder, D = 1024) with the models and options of
the bundled configs ``laps_f30k`` and ``pico_f30k`` (both with fastalign's operators):

- ``training step``: encoders forward, the method's loss terms (``Method.loss_terms``, as the
  trainer calls them), ``zero_grad``, backward, Adam step, in steady state (parameters,
  gradients and Adam's moments exist before the measured call). PICO runs past its warm-up:
  every step rebuilds z, assigns and moves the prototypes, updates omega from the loss
  buffer (the same 128 pairs every call, so their losses are seen again) and p.
- ``PICO state update``: that per-step update alone, on the batch's embeddings (no
  gradient).

Times are medians of ``--repeat`` calls after a warm-up, the cases' calls alternating; the
peak memory is the rise during one call (see ``_runner.py``). Target: the PICO step at most
15% above the LAPS step.

    python benchmarks/bench_pico.py [--device cpu|cuda] [--repeat N]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import (  # noqa: E402
    compare_parts,
    machine_description,
    report,
    serve_memory_request,
)
from bench_train_step import BATCH, VOCAB_SIZE, make_batch, training_step_case  # noqa: E402

from fastalign.config import load_config  # noqa: E402
from fastalign.data import PairBatch  # noqa: E402
from fastalign.methods import LossContext, get_method  # noqa: E402

CONFIGS = {"laps": "laps_f30k", "pico": "pico_f30k"}


def setup(impl: str, device):
    """(method, model, pair batch, loss context) of ``impl``, the model's weights seeded."""
    config = load_config(CONFIGS[impl], ["word_vectors=null", f"device={device}"])
    method = get_method(config.method)(config)
    torch.manual_seed(0)  # both methods start from the same weights
    model = method.build_model(VOCAB_SIZE).to(device).train()
    index = torch.arange(BATCH, device=device)
    batch = PairBatch(*make_batch(device), image_index=index, caption_index=index)
    # Epoch 1: past the hinge's and PICO's warm-up epoch.
    return method, model, batch, LossContext(batch=batch, epoch=1)


def build_case(key: str):
    """``key`` = part:impl:device; returns a zero-argument callable."""
    part, impl, device = key.split(":")
    device = torch.device(device)
    method, model, batch, context = setup(impl, device)
    if part == "update":
        with torch.no_grad():
            images, captions = model(*batch[:4])
        losses = torch.rand(BATCH, device=device)

        def state_update():
            method._update(images, captions, losses, context)
            return method.state.p

        return state_update

    weights = method.loss_weights()

    def loss_fn(images, captions):
        terms = method.loss_terms(model, images, captions, context)
        return sum(weights[name] * term for name, term in terms.items())

    return training_step_case(model, tuple(batch[:4]), loss_fn)


PARTS = {
    "step": ("training step", ("laps", "pico")),
    "update": ("PICO state update", ("pico",)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = compare_parts(PARTS, build_case, device, args.repeat)
    title = (
        f"PICO versus LAPS (batch {BATCH}, R 36, Flickr30K-like lengths, D 1024) on "
        f"{machine_description(device)}"
    )
    report(rows, "pico", title)
    laps, pico = (row["time_ms"] for row in rows[:2])
    print(f"PICO adds {100 * (pico / laps - 1):.1f}% to a LAPS step (target at most 15%)")


if __name__ == "__main__":
    if not serve_memory_request(functools.cache(build_case)):
        main()
