"""The ``fastalign`` command line: train, eval, demo, bench."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EPILOG = """examples:
  fastalign demo                                  train on the synthetic set, print recall
  fastalign train --config chan_f30k data_root=data/f30k_precomp epochs=30
  fastalign train --config configs/laps_f30k.yaml --resume
  fastalign eval runs/chan_f30k/best.pt --data-root data/f30k_precomp --split test
  fastalign eval runs/chan_coco/best.pt --data-root data/coco_precomp --split testall \
      --protocol coco1k
  fastalign bench region_word --quick
"""


def find_config(name: str) -> Path:
    """A config path: as given, or NAME(.yaml) in ./configs or the project's configs/."""
    for candidate in (Path(name), Path("configs") / name, REPO_ROOT / "configs" / name):
        for path in (candidate, candidate.with_suffix(".yaml")):
            if path.is_file():
                return path
    raise FileNotFoundError(f"no config {name!r} (looked in ., ./configs, {REPO_ROOT / 'configs'})")


def _train(args) -> None:
    from fastalign.config import load_config
    from fastalign.evaluation import format_results
    from fastalign.training import Trainer

    config = load_config(find_config(args.config) if args.config else None, args.overrides)
    trainer = Trainer(config, resume=args.resume, progress=not args.no_progress)
    best = trainer.fit()
    if best:
        print(f"best validation (epoch checkpoint {config.output_dir}/best.pt):")
        print(format_results(best))


def _eval(args) -> None:
    from fastalign.data import PrecompDataset
    from fastalign.evaluation import evaluate, evaluate_folds, format_results, similarity_matrix
    from fastalign.training import build_model, encode_dataset, load_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    model, vocab = build_model(checkpoint)
    data_root = args.data_root or checkpoint["config"]["data_root"]
    if data_root == "synthetic":
        data_root = checkpoint["config"]["synthetic_root"]
    dataset = PrecompDataset(
        data_root, args.split, vocab, checkpoint["config"]["captions_per_image"]
    )
    embeddings = encode_dataset(model, dataset)
    sims = similarity_matrix(*embeddings, progress=True, **model.config.similarity_options())
    if args.protocol == "coco1k":
        results, _ = evaluate_folds(sims, n_folds=5, captions_per_image=dataset.captions_per_image)
    else:
        results = evaluate(sims, captions_per_image=dataset.captions_per_image)
    print(f"{args.protocol} on {data_root} / {args.split}:")
    print(format_results(results))


def _demo(args) -> None:
    from fastalign.config import load_config
    from fastalign.evaluation import chance_results, format_results
    from fastalign.training import train_and_test

    config = load_config(find_config("demo_synthetic"), args.overrides)
    start = time.perf_counter()
    results, trainer, test_set = train_and_test(config, progress=not args.no_progress)
    n_images = test_set.images.shape[0]
    print(
        f"\nsynthetic test set ({n_images} images), after "
        f"{time.perf_counter() - start:.0f} s of training on {trainer.device}:"
    )
    print(format_results(results))
    chance = chance_results(n_images, config.captions_per_image)
    print(f"rSum {results['rsum']:.1f} versus {chance['rsum']:.1f} for random scores (chance)")


def _bench(args) -> None:
    script = REPO_ROOT / "benchmarks" / f"bench_{args.name}.py"
    if not script.is_file():
        available = sorted(p.stem[6:] for p in (REPO_ROOT / "benchmarks").glob("bench_*.py"))
        raise SystemExit(f"no benchmark {args.name!r}; available: {', '.join(available)}")
    raise SystemExit(subprocess.call([sys.executable, str(script), *args.rest]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fastalign",
        description="Fast fine-grained image-text matching: train, evaluate, benchmark.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train a model. Overrides are key=value pairs, "
        "nested with dots (model.embed_dim=256).",
    )
    train.add_argument(
        "--config",
        help="config name in configs/ (chan_f30k, laps_coco, ...) "
        "or a path to a YAML file; defaults when omitted",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUTPUT_DIR/last.pt exactly where it stopped",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint (recall table)")
    evaluate.add_argument("checkpoint", help="a .pt file written by fastalign train")
    evaluate.add_argument(
        "--data-root", help="precomputed-feature folder (default: the checkpoint's training data)"
    )
    evaluate.add_argument("--split", default="test", help="test, dev, or testall (COCO 5K)")
    evaluate.add_argument(
        "--protocol",
        default="f30k",
        choices=("f30k", "coco1k", "coco5k"),
        help="f30k / coco5k: the whole matrix; coco1k: mean of 5 folds",
    )
    evaluate.set_defaults(run=_eval)

    demo = commands.add_parser(
        "demo",
        help="generate the synthetic set if absent, train "
        "CHAN's similarity on it, print a recall table",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    demo.set_defaults(run=_demo)

    bench = commands.add_parser("bench", help="run a benchmark script (benchmarks/bench_NAME.py)")
    bench.add_argument("name", help="region_word, eval, ...")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the script")
    bench.set_defaults(run=_bench)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
