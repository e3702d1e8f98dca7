"""DIAS versus CHAN: recalls on the synthetic set, and what the DIAS regularizers cost.

1. Recalls: ``configs/demo_synthetic.yaml`` (CHAN's similarity and loss) and
   ``configs/dias_synthetic.yaml`` (the same plus the DIAS regularizers) trained with the
   same seed, data and budget, evaluated on the synthetic test split, side by side.
2. The DIAS loss alone (pooling + L_dim + L_inter + L_intra, forward + backward) on the
   local embeddings of a batch of 128 pairs (R = 36, Flickr30K-like caption lengths,
   D = 1024): fastalign's operators versus the same formulas in plain PyTorch (the
   operators' ``reference`` backend), time and peak memory; the call returns the local
   embeddings' gradients (outputs), working memory = peak - outputs.
3. One CHAN training step of ``bench_train_step.py`` (batch 128, D = 1024) with fastalign,
   without and with the DIAS regularizers: their share of the step (target: at most 10%).

    python benchmarks/bench_dias.py [--skip-training] [--epochs N] [--repeat N]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import (  # noqa: E402
    compare_cases,
    machine_description,
    report,
    serve_memory_request,
)
from bench_train_step import LR, MARGIN, make_batch, make_model  # noqa: E402

from fastalign.cli import find_config  # noqa: E402
from fastalign.config import load_config  # noqa: E402
from fastalign.evaluation import RESULT_KEYS, chance_results  # noqa: E402
from fastalign.losses import hinge_triplet_loss  # noqa: E402
from fastalign.methods.dias import DiasConfig, dias_loss  # noqa: E402
from fastalign.training import train_and_test  # noqa: E402

DIAS = DiasConfig()  # the defaults: weights 10 / 0.05 / 0.1, barlow, threshold alpha 1


# --------------------------------------------------------------------------- 1. recalls
def compare_recalls(epochs: int | None) -> None:
    overrides = [f"epochs={epochs}"] if epochs else []
    results = {}
    for name in ("demo_synthetic", "dias_synthetic"):
        config = load_config(find_config(name), [*overrides, f"output_dir=runs/bench_{name}"])
        results[name], _, test_set = train_and_test(config, progress=True)
    chance = chance_results(test_set.images.shape[0], config.captions_per_image)
    print(f"\nsynthetic test set ({test_set.images.shape[0]} images), same seed and budget:")
    print(f"{'':10}{'CHAN':>9}{'DIAS':>9}{'DIAS-CHAN':>11}{'chance':>9}")
    for key in RESULT_KEYS:
        chan, dias = results["demo_synthetic"][key], results["dias_synthetic"][key]
        print(f"{key:10}{chan:9.2f}{dias:9.2f}{dias - chan:+11.2f}{chance[key]:9.2f}")


# --------------------------------------------------------------------------- 2 and 3
def embeddings(device):
    """The fastalign model's local embeddings on the benchmark batch, requiring grad."""
    regions, region_lengths, captions, word_lengths = make_batch(device)
    with torch.no_grad():
        region_embs, word_embs = make_model("fastalign", device)(
            regions, region_lengths, captions, word_lengths, embeddings_only=True
        )
    return region_embs.requires_grad_(), region_lengths, word_embs.requires_grad_(), word_lengths


def build_case(key: str):
    """``key`` = part:impl:device; returns a zero-argument callable."""
    part, impl, device = key.split(":")
    device = torch.device(device)
    if part == "loss":
        region_embs, region_lengths, word_embs, word_lengths = embeddings(device)
        backend = "reference" if impl == "plain" else "auto"

        def dias_loss_and_gradients():
            loss, _ = dias_loss(region_embs, region_lengths, word_embs, word_lengths, DIAS, backend)
            return torch.autograd.grad(loss, (region_embs, word_embs))

        return dias_loss_and_gradients

    model = make_model("fastalign", device)
    batch = make_batch(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    with_dias = impl == "chan+dias"

    def training_step():
        region_embs, word_embs = model(*batch, embeddings_only=True)
        scores = model.similarity(region_embs, batch[1], word_embs, batch[3])
        loss = hinge_triplet_loss(scores, MARGIN, max_violation=True)
        if with_dias:
            loss = loss + dias_loss(region_embs, batch[1], word_embs, batch[3], DIAS)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return training_step


PARTS = {
    "loss": ("DIAS loss, fwd+bwd", ("plain", "fastalign")),
    "step": ("CHAN training step", ("chan", "chan+dias")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-training", action="store_true", help="only parts 2 and 3")
    parser.add_argument("--epochs", type=int, default=None, help="default: the configs'")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)
    if not args.skip_training:
        compare_recalls(args.epochs)

    rows = []
    for part, (label, impls) in PARTS.items():
        keys = {impl: f"{part}:{impl}:{device}" for impl in impls}
        rows += compare_cases({"case": label}, keys, build_case, device, args.repeat)
    title = (
        f"DIAS regularizers (batch 128, R 36, Flickr30K-like lengths, D 1024) on "
        f"{machine_description(device)}"
    )
    report(rows, "dias", title)
    chan, with_dias = (row["time_ms"] for row in rows[2:])
    print(f"the regularizers add {100 * (with_dias / chan - 1):.1f}% to a CHAN step (target 10%)")


if __name__ == "__main__":
    if not serve_memory_request(functools.cache(build_case)):
        main()
