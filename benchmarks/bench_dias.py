"""DIAS versus CHAN: recalls on the synthetic set, and what the DIAS regularizers cost.

1. Recalls: the bundled configs ``chan_synthetic`` (CHAN's similarity and loss) and
   ``dias_synthetic`` (the same plus the DIAS regularizers; ``fastalign/configs/``) trained
   with the same seed, data and budget, evaluated on the synthetic test split, side by side.
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
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import (  # noqa: E402
    compare_parts,
    machine_description,
    report,
    serve_memory_request,
)
from bench_train_step import MARGIN, make_batch, make_model, training_step_case  # noqa: E402

from fastalign.config import load_config  # noqa: E402
from fastalign.evaluation import RESULT_KEYS, chance_results  # noqa: E402
from fastalign.losses import hinge_triplet_loss  # noqa: E402
from fastalign.methods import get_method  # noqa: E402
from fastalign.methods.dias import dias_regularizers  # noqa: E402
from fastalign.tokens import Tokens  # noqa: E402
from fastalign.training import train_and_test  # noqa: E402

# The DIAS method's default options: weights 10 / 0.05 / 0.1, barlow, threshold alpha 1.
DIAS = get_method("dias").Options()


def dias_loss(images: Tokens, captions: Tokens, backend: str = "auto") -> Tensor:
    """The weighted DIAS regularizers of a batch's tokens, as ``Dias.loss_terms`` adds them
    to the matching loss: the tokens mean-pooled (in float32 at least), then
    ``sum w_term * term`` of :func:`~fastalign.methods.dias.dias_regularizers`."""
    dtype = torch.promote_types(images.embs.dtype, torch.float32)
    image, text = images.to(dtype).mean_pooled(), captions.to(dtype).mean_pooled()
    terms = dias_regularizers(image, text, DIAS, backend)
    return sum(DIAS.weight(term) * value for term, value in terms.items())


# --------------------------------------------------------------------------- 1. recalls
def compare_recalls(epochs: int | None) -> None:
    overrides = [f"epochs={epochs}"] if epochs else []
    results = {}
    for name in ("chan_synthetic", "dias_synthetic"):
        config = load_config(name, [*overrides, f"output_dir=runs/bench_{name}"])
        # A rerun of the benchmark trains from scratch again.
        results[name], _, test_set = train_and_test(config, progress=True, overwrite=True)
    chance = chance_results(test_set.images.shape[0], config.captions_per_image)
    print(f"\nsynthetic test set ({test_set.images.shape[0]} images), same seed and budget:")
    print(f"{'':10}{'CHAN':>9}{'DIAS':>9}{'DIAS-CHAN':>11}{'chance':>9}")
    for key in RESULT_KEYS:
        chan, dias = results["chan_synthetic"][key], results["dias_synthetic"][key]
        print(f"{key:10}{chan:9.2f}{dias:9.2f}{dias - chan:+11.2f}{chance[key]:9.2f}")


# --------------------------------------------------------------------------- 2 and 3
def embeddings(device) -> tuple[Tokens, Tokens]:
    """The fastalign model's image and caption tokens on the benchmark batch, their
    embeddings requiring grad."""
    with torch.no_grad():
        images, captions = make_model("fastalign", device)(*make_batch(device))
    images.embs.requires_grad_()
    captions.embs.requires_grad_()
    return images, captions


def build_case(key: str):
    """``key`` = part:impl:device; returns a zero-argument callable."""
    part, impl, device = key.split(":")
    device = torch.device(device)
    if part == "loss":
        images, captions = embeddings(device)
        backend = "reference" if impl == "plain" else "auto"

        def dias_loss_and_gradients():
            loss = dias_loss(images, captions, backend)
            return torch.autograd.grad(loss, (images.embs, captions.embs))

        return dias_loss_and_gradients

    model = make_model("fastalign", device)
    with_dias = impl == "chan+dias"

    def loss_fn(images: Tokens, captions: Tokens) -> Tensor:
        loss = hinge_triplet_loss(model.similarity(images, captions), MARGIN, max_violation=True)
        return loss + dias_loss(images, captions) if with_dias else loss

    return training_step_case(model, make_batch(device), loss_fn)


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

    rows = compare_parts(PARTS, build_case, device, args.repeat)
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
