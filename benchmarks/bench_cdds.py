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
    name, overrides = CONFIGS[impl]
    config = load_config(name, ["word_vectors=null", f"device={device}", *overrides])
    method = get_method(config.method)(config)
    torch.manual_seed(0)  # every case starts from the same backbone weights
    model = method.build_model(VOCAB_SIZE).to(device).train()
    index = torch.arange(BATCH, device=device)
    batch = PairBatch(*make_batch(torch.device(device)), image_index=index, caption_index=index)
    context = LossContext(batch=batch, epoch=1)  # past the hinge's warm-up epoch
    weights = method.loss_weights()

    def loss_fn(images, captions):
        terms = method.loss_terms(model, images, captions, context)
        return sum(weights[name] * term for name, term in terms.items())

    return training_step_case(model, tuple(batch[:4]), loss_fn)


PARTS = {"step": ("training step", tuple(CONFIGS))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = compare_parts(PARTS, build_case, device, args.repeat)
    title = (
        f"CDDS versus LAPS (batch {BATCH}, R 36, Flickr30K-like lengths, D 1024) on "
        f"{machine_description(device)}"
    )
    report(rows, "cdds", title)
    laps, cdds = (row["time_ms"] for row in rows[:2])
    print(f"the CDDS step is {cdds / laps:.2f}x the LAPS step (target at most 2x)")


if __name__ == "__main__":
    if not serve_memory_request(functools.cache(build_case)):
        main()
