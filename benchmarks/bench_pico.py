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

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import method_step_main, serve_memory_request  # noqa: E402
from bench_train_step import BATCH, method_setup, method_step_case  # noqa: E402

CONFIGS = {"laps": "laps_f30k", "pico": "pico_f30k"}


def build_case(key: str):
    """``key`` = part:impl:device; returns a zero-argument callable."""
    part, impl, device = key.split(":")
    method, model, batch, context = method_setup(CONFIGS[impl], [], torch.device(device))
    if part == "update":
        with torch.no_grad():
            images, captions = model(*batch[:4])
        losses = torch.rand(BATCH, device=device)

        def state_update():
            method._update(images, captions, losses, context)
            return method.state.p

        return state_update
    return method_step_case(method, model, batch, context)


PARTS = {
    "step": ("training step", ("laps", "pico")),
    "update": ("PICO state update", ("pico",)),
}


def main() -> None:
    rows = method_step_main(__doc__, PARTS, build_case, "pico", "PICO versus LAPS")
    laps, pico = (row["time_ms"] for row in rows[:2])
    print(f"PICO adds {100 * (pico / laps - 1):.1f}% to a LAPS step (target at most 15%)")


if __name__ == "__main__":
    if not serve_memory_request(functools.cache(build_case)):
        main()
