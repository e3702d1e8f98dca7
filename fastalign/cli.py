"""The ``fastalign`` command line: train, eval, index, search, demo, compare, list, bench."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

# Raw: the backslashes continue shell lines in the printed examples.
EPILOG = r"""examples:
  fastalign demo                                  train on the synthetic set, print recall
  fastalign train --config chan_f30k data_root=data/f30k_precomp epochs=30
  fastalign train --config dias_f30k dias.dim_weight=0 output_dir=runs/dias_no_dim
  fastalign train --config my_run.yaml --resume
  fastalign eval runs/chan_f30k/best.pt --data-root data/f30k_precomp --split test
  fastalign eval runs/chan_coco/best.pt --data-root data/coco_precomp --split testall \
      --protocol coco1k
  fastalign eval runs/chan_f30k/best.pt --rerank-base runs/vsepp_f30k/best.pt \
      --rerank-k 15 --rerank-alpha 0.15
  fastalign eval runs/chan_f30k/best.pt --rerank-base runs/vsepp_f30k/best.pt \
      --rerank-fusion sum --rerank-alpha 0.1
  fastalign compare vsepp_synthetic chan_synthetic laps_synthetic dias_synthetic \
      --preset hard --seeds 3
  fastalign index runs/chan_f30k/best.pt --data-root data/f30k_precomp --split test \
      --out indexes/f30k_test
  fastalign search indexes/f30k_test --text "a dog catches a frisbee" --k 5
  fastalign list                                  methods and bundled configs
  fastalign bench all --quick                     every operator's speed-up and working
                                                  memory on this machine, one table
"""


# The errors that the library raises for bad input (values, paths, files, data): reported
# as one line. Anything else is a bug, and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, OSError, KeyError)


def _train(args) -> None:
    from fastalign.config import load_config
    from fastalign.evaluation import format_results
    from fastalign.training import Trainer

    config = load_config(args.config, args.overrides)
    trainer = Trainer(
        config, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite
    )
    best = trainer.fit()
    if best and trainer.rank == 0:  # under torchrun every rank holds the same results
        print(f"best validation (epoch checkpoint {config.output_dir}/best.pt):")
        print(format_results(best))


def _restore_on_data(path: str, data_root: Path | None, on_purpose: bool, split: str):
    """``(method, model, dataset)``: the trained method of checkpoint ``path`` and its
    ``split`` of ``data_root`` (None: the data it trained on), tokenised its own way.

    A ``data_root`` given ``on_purpose`` (--data-root) that is not the checkpoint's data is
    a warning; any other is an error.
    """
    from fastalign.checkpoint import load_checkpoint, restore_trained
    from fastalign.config import TrainConfig
    from fastalign.data import PrecompDataset, data_fingerprint
    from fastalign.training import check_same_data, data_root_of

    checkpoint = load_checkpoint(path)
    method, model, tokenizer = restore_trained(checkpoint)
    config = TrainConfig.from_dict(checkpoint["config"])
    recorded = checkpoint["data"]
    if data_root is None and recorded["root"] is not None:
        # where it trained, whatever folder this runs in
        data_root = Path(recorded["root"])
        if not data_root.is_dir():
            raise FileNotFoundError(
                f"the training data {data_root} of checkpoint {path} is not there any more: "
                f"pass --data-root"
            )
    elif data_root is None:
        data_root = data_root_of(config)
    fingerprint = data_fingerprint(data_root)
    if recorded["fingerprint"] is None:
        print(
            f"warning: checkpoint {path} predates data fingerprints; fastalign cannot check "
            "that it is evaluated on its own data",
            file=sys.stderr,
        )
    elif on_purpose and fingerprint != recorded["fingerprint"]:
        print(
            f"warning: evaluating on {data_root} (fingerprint {fingerprint}), not on the data "
            f"checkpoint {path} was trained on ({recorded['root']}, fingerprint "
            f"{recorded['fingerprint']})",
            file=sys.stderr,
        )
    else:
        check_same_data(recorded, data_root, fingerprint, f"eval {path}")
    dataset = PrecompDataset(data_root, split, tokenizer, config.captions_per_image)
    return method, model, dataset


def _print_evaluated(title: str | None, results: dict, method=None) -> None:
    """A recall table under ``title``, then ``method``'s report when it has one."""
    from fastalign.evaluation import format_results

    if title:
        print(title)
    print(format_results(results))
    report = method.eval_report() if method is not None else ""
    if report:
        print(report)


def _eval(args) -> None:
    from fastalign import distributed
    from fastalign.evaluation import evaluate
    from fastalign.model_evaluation import evaluate_trained, score_matrix
    from fastalign.rerank import DEFAULT_ALPHA, DEFAULT_K, check_rerank_options, evaluate_reranked

    rerank = {"k": args.rerank_k, "alpha": args.rerank_alpha, "fusion": args.rerank_fusion}
    if args.rerank_base is None:
        given = [f"--rerank-{name}" for name, value in rerank.items() if value is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)} apply only with --rerank-base BASE.pt (the base model "
                f"whose top-k the checkpoint re-ranks)"
            )
    else:
        if args.protocol != "f30k":
            raise ValueError(
                f"--rerank-base supports --protocol f30k only (re-ranking of the whole "
                f"matrix), not {args.protocol}: coco1k / coco5k re-ranking is not implemented"
            )
        defaults = {"k": DEFAULT_K, "alpha": DEFAULT_ALPHA, "fusion": "zscore"}
        rerank = {name: defaults[name] if v is None else v for name, v in rerank.items()}
        check_rerank_options(**rerank, prefix="--rerank-")
    progress = not args.no_progress
    data_root = Path(args.data_root) if args.data_root else None
    method, model, dataset = _restore_on_data(
        args.checkpoint, data_root, data_root is not None, args.split
    )
    # Under torchrun every process evaluates a shard of the images, on the CPU as one
    # process does; a collective waits for the others at most the run's dist_timeout_minutes.
    timeout = distributed.timeout_from_minutes(method.config.dist_timeout_minutes)
    distributed.setup_from_env("gloo", timeout)
    sharded = distributed.world_size() > 1
    heading = f"{args.protocol} on {dataset.root} / {args.split}:"
    if args.rerank_base is None:
        results = evaluate_trained(
            method, model, dataset, args.protocol, progress=progress, sharded=sharded
        )
        if distributed.rank() == 0:  # every process holds the same results
            print(heading)
            _print_evaluated(None, results, method)
        distributed.cleanup()
        return
    if sharded:
        raise ValueError(
            "--rerank-base is not sharded (re-ranking takes both whole score matrices): run it "
            "as one process, without torchrun"
        )
    # The base model on the same data and split (so the same images and captions, in the
    # same order), with its own tokenizer.
    base_method, base_model, base_set = _restore_on_data(
        args.rerank_base, dataset.root, data_root is not None, args.split
    )
    k = check_rerank_options(**rerank, n_items=dataset.n_images, prefix="--rerank-")
    base = score_matrix(base_method, base_model, base_set, progress)
    second = score_matrix(method, model, dataset, progress)
    per_image = dataset.captions_per_image
    reranked = evaluate_reranked(
        base, second, k, rerank["alpha"], rerank["fusion"], captions_per_image=per_image
    )
    print(heading)
    _print_evaluated(f"base {args.rerank_base}:", evaluate(base, per_image), base_method)
    _print_evaluated(f"{args.checkpoint}:", evaluate(second, per_image), method)
    _print_evaluated(
        f"re-ranked: the top {k} of the base, scored again by {args.checkpoint} "
        f"({rerank['fusion']} fusion, alpha {rerank['alpha']}):",
        reranked,
    )


def _index(args) -> None:
    from fastalign.index import build_index, open_index

    data_root = Path(args.data_root) if args.data_root else None
    method, model, dataset = _restore_on_data(
        args.checkpoint, data_root, data_root is not None, args.split
    )
    path = build_index(
        args.out,
        args.checkpoint,
        method,
        model,
        dataset,
        args.gallery,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    index = open_index(path, verify=False)
    print(
        f"index of the {index.count} {index.gallery} of {dataset.root} / {args.split} "
        f"({index.tokens.flat.shape[0]} tokens of D {index.tokens.dim}) written to {path}"
    )


def _search_queries(args, index, method, model, tokenizer):
    """(labels, query tokens) of --text / --image-index / --queries, of the modality the
    index's gallery is searched by: texts for images, image indices for captions."""
    import numpy as np

    from fastalign.data import open_image_features
    from fastalign.index import encode_images, encode_texts

    if args.queries is not None:
        lines = Path(args.queries).read_text().splitlines()
        given = [line.strip() for line in lines if line.strip()]
        if not given:
            raise ValueError(f"--queries {args.queries} holds no query (one a line)")
    else:
        given = [args.text] if args.text is not None else [str(args.image_index)]
    if index.gallery == "images":
        if args.image_index is not None:
            raise ValueError(
                f"index {index.path} holds images: query it with --text or --queries (one text "
                f"a line), not --image-index"
            )
        return given, encode_texts(model, tokenizer, given)
    if args.text is not None:
        raise ValueError(
            f"index {index.path} holds captions: query it with --image-index N or --queries "
            f"(one image index a line), not --text"
        )
    data = index.manifest["data"]
    root = Path(args.data_root or data["root"])
    split = args.split or data["split"]
    features = open_image_features(root / f"{split}_ims.npy")
    rows = []
    for text in given:
        try:
            rows.append(int(text))
        except ValueError:
            raise ValueError(f"image queries are image indices, got {text!r}") from None
        if not 0 <= rows[-1] < len(features):
            raise ValueError(
                f"image index {rows[-1]} is out of range: {root / f'{split}_ims.npy'} holds "
                f"{len(features)} images"
            )
    feature_dim = method.config.model.feature_dim
    if features.shape[2] != feature_dim:
        raise ValueError(
            f"{root / f'{split}_ims.npy'} holds features of size {features.shape[2]}; the "
            f"index's model expects {feature_dim}"
        )
    labels = [f"image {row} of {root} / {split}" for row in rows]
    return labels, encode_images(model, features[np.array(rows)])


def _search(args) -> None:
    import json

    from fastalign.checkpoint import load_checkpoint, restore_trained
    from fastalign.index import check_checkpoint, open_index, search_index
    from fastalign.search import topk_recall

    given = [args.text is not None, args.image_index is not None, args.queries is not None]
    if sum(given) != 1:
        raise ValueError("give one of --text TEXT, --image-index N, --queries FILE")
    progress = not args.no_progress
    index = open_index(args.index, verify=not args.no_verify, progress=progress)
    checkpoint = Path(args.checkpoint) if args.checkpoint else index.checkpoint
    check_checkpoint(index, checkpoint)
    method, model, tokenizer = restore_trained(load_checkpoint(checkpoint))
    labels, queries = _search_queries(args, index, method, model, tokenizer)
    options = {"shortlist": args.shortlist, "shortlist_index": args.shortlist_index}
    k = min(args.k, index.count)
    scores, found = search_index(index, method, model, queries, k=k, progress=progress, **options)
    recall = None
    if args.recall:
        exact = search_index(index, method, model, queries, k=k, shortlist=index.count)[1]
        recall = topk_recall(found, exact)
    results = [
        {
            "query": label,
            "results": [
                {"rank": rank, "index": int(i), "id": index.ids[int(i)], "score": float(score)}
                for rank, (i, score) in enumerate(zip(row_index, row_scores), 1)
            ],
        }
        for label, row_index, row_scores in zip(labels, found.tolist(), scores.tolist())
    ]
    if args.json:
        report = {"index": str(index.path), "gallery": index.gallery, "k": k, **options}
        if recall is not None:
            report["recall_vs_exact"] = recall
        print(json.dumps(report | {"queries": results}, indent=2))
        return
    for number, result in enumerate(results, 1):
        print(f"query {number}: {result['query']}")
        for hit in result["results"]:
            print(f"  {hit['rank']:>3}  {hit['score']:10.4f}  {hit['id']}  (index {hit['index']})")
    if recall is not None:
        print(
            f"recall of the top {k} against the exact search (all {index.count} "
            f"{index.gallery} scored): {recall:.4f}"
        )


def _demo(args) -> None:
    from fastalign.config import load_config
    from fastalign.evaluation import chance_results, format_results
    from fastalign.training import train_and_test

    config = load_config("demo_synthetic", args.overrides)
    start = time.perf_counter()
    # The demo is rerun freely: its output folder is its own.
    results, trainer, test_set = train_and_test(
        config, progress=not args.no_progress, overwrite=True
    )
    if trainer.rank != 0:  # under torchrun every rank holds the same results
        return
    n_images = test_set.images.shape[0]
    print(
        f"\nsynthetic test set ({n_images} images), after "
        f"{time.perf_counter() - start:.0f} s of training on {trainer.device}:"
    )
    print(format_results(results))
    chance = chance_results(n_images, config.captions_per_image)
    print(f"rSum {results['rsum']:.1f} versus {chance['rsum']:.1f} for random scores (chance)")


def _compare(args) -> None:
    from fastalign.compare import compare, format_summary

    summary = compare(
        args.configs,
        seeds=args.seeds,
        preset=args.preset,
        overrides=args.overrides,
        output_dir=args.output,
        overwrite=args.overwrite,
    )
    print(format_summary(summary))
    print(f"tables: {args.output}/summary.csv, {args.output}/runs.csv", end="")
    plot = Path(args.output) / "val_rsum.png"
    print(f"; plot: {plot}" if plot.is_file() else " (install matplotlib for the plot)")


def _list(args) -> None:
    from fastalign.config import bundled_configs
    from fastalign.methods import get_method, method_names

    print("methods:")
    for name in method_names():
        doc = (get_method(name).__doc__ or "").strip().splitlines()
        print(f"  {name:<10} {doc[0] if doc else ''}")
    print("bundled configs:")
    print("  " + "  ".join(bundled_configs()))


# The benchmark scripts live in the source tree, not in the installed package.
_BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _benchmarks() -> list[str]:
    return sorted(p.stem[len("bench_") :] for p in _BENCHMARKS.glob("bench_*.py"))


def _bench(args) -> None:
    if not _BENCHMARKS.is_dir():
        raise FileNotFoundError(
            "fastalign bench runs from a source checkout (benchmarks/ is not installed)"
        )
    script = _BENCHMARKS / f"bench_{args.name}.py"
    if not script.is_file():
        raise ValueError(f"no benchmark {args.name!r}; available: {', '.join(_benchmarks())}")
    raise SystemExit(subprocess.call([sys.executable, str(script), *args.rest]))


def main(argv: list[str] | None = None) -> None:
    from fastalign.rerank import DEFAULT_ALPHA, DEFAULT_K, FUSIONS

    parser = argparse.ArgumentParser(
        prog="fastalign",
        description="Fast fine-grained image-text matching: train, evaluate, search, benchmark.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Every command takes --debug, before or after its name (SUPPRESS: a command's own default
    # does not undo a --debug given before it).
    debug_help = "on an error, show the traceback, not only the error line"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)

    def add_command(name: str, **options) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[debug], **options)

    train = add_command(
        "train",
        help="train a model from a YAML config",
        description="Train a model. Overrides are key=value pairs, nested with dots "
        "(model.embed_dim=256, dias.dim_weight=0); values are YAML. The keys are the fields of "
        "fastalign.config.TrainConfig, fastalign.models.ModelConfig (model.*) and the method's "
        "options (see the README, 'Training and evaluation'; "
        "python -c 'help(fastalign.config.TrainConfig)').",
    )
    train.add_argument(
        "--config",
        help="a bundled config's name (chan_f30k, laps_coco, ...: see fastalign list) "
        "or a path to a YAML file; defaults when omitted",
    )
    run_state = train.add_mutually_exclusive_group()
    run_state.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUTPUT_DIR/last.pt exactly where it stopped",
    )
    run_state.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in an OUTPUT_DIR that holds a run (its files are deleted)",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    train.set_defaults(run=_train)

    evaluate = add_command("eval", help="evaluate a checkpoint (recall table)")
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
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    rerank = evaluate.add_argument_group(
        "re-ranking",
        "With --rerank-base, each query's top-k of the base model is re-ordered by a fused "
        "score of the base and the checkpoint; everything else keeps the base order below "
        "them (MACK's re-ranking; --protocol f30k only). Prints the base's table, the "
        "checkpoint's own and the re-ranked one.",
    )
    rerank.add_argument(
        "--rerank-base",
        metavar="BASE.pt",
        help="the base model's checkpoint, evaluated on the same data and split",
    )
    rerank.add_argument(
        "--rerank-k",
        type=int,
        metavar="K",
        help=f"items re-ranked per query, at most the number of images (default {DEFAULT_K})",
    )
    rerank.add_argument(
        "--rerank-alpha",
        type=float,
        metavar="ALPHA",
        help=f"weight of the checkpoint's score, >= 0 (default {DEFAULT_ALPHA}, MASK's, for "
        "zscore)",
    )
    rerank.add_argument(
        "--rerank-fusion",
        choices=FUSIONS,
        help="zscore (default): z(base) + alpha * z(checkpoint), z standardising a query's "
        "k scores; sum: base + alpha * checkpoint (MACK)",
    )
    evaluate.set_defaults(run=_eval)

    indexing = add_command(
        "index",
        help="encode a split's images (or captions) into a search index folder",
        description="Encode the gallery of a split with a checkpoint's model and write a "
        "search index: the token embeddings (float16, packed, memory-mapped), the global "
        "embeddings, the ids and a manifest (model, options, counts, checksums). The folder is "
        "written whole or not at all.",
    )
    indexing.add_argument("checkpoint", help="a .pt file written by fastalign train")
    indexing.add_argument(
        "--data-root", help="precomputed-feature folder (default: the checkpoint's training data)"
    )
    indexing.add_argument("--split", default="test", help="the split to index (default test)")
    indexing.add_argument("--out", required=True, metavar="DIR", help="the index folder")
    indexing.add_argument(
        "--gallery",
        choices=("images", "captions"),
        default="images",
        help="what the index holds (default images: searched by text)",
    )
    indexing.add_argument("--overwrite", action="store_true", help="replace an index at --out")
    indexing.add_argument("--no-progress", action="store_true", help="no progress bars")
    indexing.set_defaults(run=_index)

    search = add_command(
        "search",
        help="search an index: top-k ids and scores",
        description="Two-stage search of an index: a shortlist by the global embeddings, "
        "then the model's fine-grained score on it. An index of images is searched by text "
        "(--text, --queries with one text a line), an index of captions by images (--image-index, "
        "--queries with one image index a line) of a split of features.",
    )
    search.add_argument("index", metavar="DIR", help="a folder written by fastalign index")
    search.add_argument("--text", help="one query text")
    search.add_argument("--image-index", type=int, metavar="N", help="image N as the query")
    search.add_argument("--queries", metavar="FILE", help="queries, one a line")
    search.add_argument(
        "--k", type=int, default=10, help="results per query (default 10; at most the gallery)"
    )
    search.add_argument(
        "--shortlist",
        type=int,
        default=200,
        help="gallery items scored by the model per query (default 200; at least the gallery's "
        "size: the exact search)",
    )
    search.add_argument(
        "--shortlist-index",
        default="exact",
        metavar="INDEX",
        help="exact (default), faiss (a flat faiss index) or faiss:FACTORY (a "
        "faiss.index_factory string, e.g. faiss:HNSW32); faiss: pip install faiss-cpu",
    )
    search.add_argument(
        "--checkpoint", help="the index's model, when it moved (default: the recorded path)"
    )
    search.add_argument(
        "--data-root", help="the image queries' feature folder (default: the index's data)"
    )
    search.add_argument("--split", help="the image queries' split (default: the index's)")
    search.add_argument(
        "--recall",
        action="store_true",
        help="also run the exact search (every item scored) and print the recall against it",
    )
    search.add_argument("--json", action="store_true", help="print the results as JSON")
    search.add_argument(
        "--no-verify", action="store_true", help="skip the checksums of the index's files"
    )
    search.add_argument("--no-progress", action="store_true", help="no progress bars")
    search.set_defaults(run=_search)

    demo = add_command(
        "demo",
        help="generate the synthetic set if absent, train "
        "CHAN's similarity on it, print a recall table",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    demo.set_defaults(run=_demo)

    comparison = add_command(
        "compare",
        help="train several configs on the same data, seeds and budget; table + plot",
        description="Train every config with seeds 0..N-1 on the same data and budget, then "
        "print each recall, rSum mean and std over the seeds, seconds per epoch and peak "
        "memory; writes runs.csv, summary.csv and val_rsum.png (with matplotlib).",
    )
    comparison.add_argument("configs", nargs="+", metavar="CONFIG", help="config names or paths")
    comparison.add_argument("--seeds", type=int, default=3, help="runs per config (default 3)")
    comparison.add_argument(
        "--preset",
        help="train on the synthetic dataset of this preset (easy, hard) instead of each "
        "config's data",
    )
    comparison.add_argument(
        "--output", default="runs/compare", help="folder of the runs and tables (runs/compare)"
    )
    comparison.add_argument(
        "--overwrite", action="store_true", help="replace an earlier comparison's runs"
    )
    comparison.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for every config (the shared budget: --set epochs=4); repeatable",
    )
    comparison.set_defaults(run=_compare)

    listing = add_command("list", help="the registered methods and bundled configs")
    listing.set_defaults(run=_list)

    available = ", ".join(_benchmarks()) or "none: run from a source checkout"
    bench = add_command(
        "bench",
        help="run a benchmark script (benchmarks/bench_NAME.py)",
        description=f"Run benchmarks/bench_NAME.py of a source checkout. NAME: {available}. "
        "'all' runs every operator benchmark (--quick: their quick cases, a few minutes) and "
        "prints one table of fastalign's speed-up and working memory, headed by the machine.",
    )
    bench.add_argument("name", help=available)
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the script")
    bench.set_defaults(run=_bench)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as error:
        # What a user can fix (a value, a path, a file) is one line; --debug shows where.
        if args.debug:
            raise
        print(f"fastalign {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
