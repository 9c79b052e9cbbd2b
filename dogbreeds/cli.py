"""The `dogbreeds` command: one subcommand per stage.

    dogbreeds models
    dogbreeds data --data-dir ../shared/data/tiny_dogs_64
    dogbreeds train cnn3v2 --data-dir ../shared/data/tiny_dogs_64 --image-size 64 --epochs 5 \
        --workers 2 --output runs/cnn3v2
    dogbreeds bench pipeline --data-dir ../shared/data/stanford_dogs_sample

Bad options and missing paths end in a one-line error, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_data_options(parser: argparse.ArgumentParser, image_size_help: str) -> None:
    parser.add_argument(
        "--data-dir",
        help="a folder in the layout of Stanford Dogs' images.tar (Images/<synset>-<breed>/"
        "*.jpg, optional lists/*.mat); default: download TFDS stanford_dogs",
    )
    parser.add_argument("--tfds-dir", help="where TFDS keeps its files (default: TFDS's own)")
    parser.add_argument("--image-size", type=int, help=image_size_help)
    parser.add_argument("--seed", type=int, default=0, help="seed of splits, subset, augmentation")
    parser.add_argument("--cache-dir", help="where decoded, resized images are cached")


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=20, help="maximum epochs (default: 20)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (default: 1)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per worker and step")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam's (default: 1e-3)")
    parser.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per worker")
    parser.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs per worker")
    parser.add_argument("--subset-per-class", type=int, help="at most this many train images per breed")
    parser.add_argument("--subset-fraction", type=float, help="this fraction of each breed's train images")
    parser.add_argument(
        "--augmented-views", type=int, default=0,
        help="fixed augmented views per train image, as in the study (9); 0: a new view each epoch",
    )
    parser.add_argument(
        "--weights", default="imagenet",
        help="transfer backbones: imagenet (download), a local .h5 file, or none",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dogbreeds", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    commands.add_parser("models", help="list the model registry")

    data_parser = commands.add_parser("data", help="summarise a dataset: breeds, images, skipped files")
    _add_data_options(data_parser, "decode at this size to find unreadable files (default: 64)")
    data_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")

    train_parser = commands.add_parser("train", help="train a model on Ray Train and evaluate it")
    train_parser.add_argument("model", help="a registered model (see `dogbreeds models`)")
    _add_data_options(train_parser, "input size (default: the model's own, 299 or 224)")
    _add_train_options(train_parser)
    train_parser.add_argument("--output", required=True, help="the run directory")
    train_parser.add_argument("--resume", action="store_true", help="continue the run in --output")

    bench_parser = commands.add_parser("bench", help="benchmarks that print and write JSON")
    benches = bench_parser.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    pipeline_bench = benches.add_parser(
        "pipeline", help="input pipeline images/s against a bare decode-and-resize loop"
    )
    _add_data_options(pipeline_bench, "resize to this size (default: 224)")
    pipeline_bench.add_argument("--output", default="bench_pipeline.json", help="the JSON file")
    return parser


def _data_config(args):
    from dogbreeds.config import DataConfig

    values = dict(data_dir=args.data_dir, tfds_dir=args.tfds_dir, image_size=args.image_size, seed=args.seed)
    for option in ("subset_per_class", "subset_fraction", "augmented_views"):
        if getattr(args, option, None) is not None:
            values[option] = getattr(args, option)
    if args.cache_dir:
        values["cache_dir"] = args.cache_dir
    if args.data_dir and not os.path.isdir(args.data_dir):
        raise ValueError(f"--data-dir not found: {args.data_dir}")
    return DataConfig(**values)


def _train_config(args):
    from dogbreeds.config import TrainConfig

    weights = None if args.weights.lower() == "none" else args.weights
    return TrainConfig(
        model=args.model, weights=weights, epochs=args.epochs, workers=args.workers,
        per_worker_batch_size=args.batch_size, learning_rate=args.learning_rate,
        gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        seed=args.seed,
    )


def command_models(args) -> None:
    from dogbreeds import models

    print(f"{'model':<15}{'input':>7}  {'scaling':<10} description")
    for name in models.list_models():
        spec = models.get_model_spec(name)
        print(f"{name:<15}{spec.image_size:>7}  {spec.scaling:<10} {spec.description}")


def command_data(args) -> None:
    from dogbreeds import data

    config = _data_config(args)
    index = data.load_index(config)
    for split in index.splits.values():  # decoding is the only honest test of a file
        index.skipped += data.load_images(split, args.image_size or 64, config)[2]
    summary = data.summarize(index)
    if args.json:
        print(json.dumps(summary, indent=1))
        return
    print(f"source: {summary['source']} ({summary['split']})")
    print(f"{summary['num_classes']} breeds, {summary['num_images']} images: "
          + ", ".join(f"{name} {count}" for name, count in summary["splits"].items()))
    counts = summary["images_per_class"]
    print(f"images per breed: min {min(counts.values())}, max {max(counts.values())}")
    for name, count in counts.items():
        print(f"  {count:>5}  {name}")
    print(f"skipped: {len(summary['skipped'])}")
    for item in summary["skipped"]:
        print(f"  {item['file']}: {item['reason']}")


def command_train(args) -> None:
    from dogbreeds.train import run_training

    data_config, train_config = _data_config(args), _train_config(args)
    metrics = run_training(data_config, train_config, args.output, resume=args.resume)
    test = metrics["test"]
    print(
        f"{train_config.model}: test top-1 {test['top1']:.3f}, top-5 {test['top5']:.3f}, "
        f"precision {test['precision']:.3f}, recall {test['recall']:.3f} on "
        f"{test['num_images']} images"
    )
    for name in ("model.keras", "metrics.json", "confusions.csv", "tensorboard"):
        print(f"  {name:<16}{os.path.join(os.path.abspath(args.output), name)}")


def command_bench(args) -> None:
    from dogbreeds import bench

    result = bench.bench_pipeline(_data_config(args), args.image_size or 224)
    print(json.dumps(result, indent=1))
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"wrote {args.output}")


COMMANDS = {
    "models": command_models,
    "data": command_data,
    "train": command_train,
    "bench": command_bench,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        print(f"dogbreeds {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
