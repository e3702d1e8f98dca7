"""CDDS versus LAPS: what the decoupling and the distribution sampling cost in a training step.

The batch of ``bench_train_step.py`` (128 pairs, R = 36 regions of 2048-d features,
Flickr30K-like caption lengths, BiGRU text encoder, D = 1024) with the models and options of
the bundled configs ``laps_f30k`` and ``cdds_f30k`` (both with fastalign's operators), one
training step each (encoders forward, ``Method.loss_terms`` as the trainer calls them,
``zero_grad``, backward, Adam step, in steady state). Where the CDDS time goes, from
its ablation switches on the same batch:

- ``cdds, no sampling``: the two UNets and one score of the semantic parts (no column
  statistics, no second score);
- ``cdds, no noise``: one pass through each decoder instead of ``draws`` noisy ones;
- ``cdds``: everything.

Times are medians of ``--repeat`` calls after a warm-up, the cases' calls alternating; the
peak memory is the rise during one call (see ``_runner.py``). Target: the CDDS step at most
2x the LAPS step.

    python benchmarks/bench_cdds.py [--device cpu|cuda] [--repeat N]
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import method_step_main, serve_memory_request  # noqa: E402
from bench_train_step import method_setup, method_step_case  # noqa: E402

# implementation -> (config, overrides)
CONFIGS = {
    "laps": ("laps_f30k", []),
    "cdds": ("cdds_f30k", []),
    "cdds_no_noise": ("cdds_f30k", ["cdds.noise=false"]),
    "cdds_no_sampling": ("cdds_f30k", ["cdds.sampling=false"]),
}


def build_case(key: str):
    """``key`` = step:impl:device; returns a zero-argument callable (one training step)."""
    _, impl, device = key.split(":")
    return method_step_case(*method_setup(*CONFIGS[impl], torch.device(device)))


PARTS = {"step": ("training step", tuple(CONFIGS))}


def main() -> None:
    rows = method_step_main(__doc__, PARTS, build_case, "cdds", "CDDS versus LAPS")
    laps, cdds = (row["time_ms"] for row in rows[:2])
    print(f"the CDDS step is {cdds / laps:.2f}x the LAPS step (target at most 2x)")


if __name__ == "__main__":
    if not serve_memory_request(functools.cache(build_case)):
        main()
