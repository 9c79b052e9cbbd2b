"""The `dogbreeds` command: one subcommand per stage.

    dogbreeds models
    dogbreeds data --data-dir ../shared/data/tiny_dogs_64
    dogbreeds train cnn3v2 --data-dir ../shared/data/tiny_dogs_64 --image-size 64 --epochs 5 \
        --workers 2 --output runs/cnn3v2
    dogbreeds report runs/cnn3v2
    dogbreeds bench pipeline --data-dir ../shared/data/stanford_dogs_sample
    dogbreeds serve bundles/best --examples ../shared/data/stanford_dogs_sample

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


def _add_search_options(parser: argparse.ArgumentParser, space: str) -> None:
    parser.add_argument("--space", default=space, help=f"a search-space file (default: search_spaces/{space}.yaml)")
    parser.add_argument("--trials", type=int, default=8, help="configurations to try (default: 8)")
    parser.add_argument("--concurrent-trials", type=int, default=1, help="trials at once (default: 1)")
    parser.add_argument("--algorithm", choices=["random", "tpe"], default="random",
                        help="random search, or Optuna's TPE through Ray Tune")
    parser.add_argument("--scheduler", choices=["asha", "none"], default="asha",
                        help="ASHA stops poor trials early (default), or none")
    parser.add_argument("--no-retrain", action="store_true", help="skip retraining the best on all data")
    parser.add_argument("--output", required=True, help="the search directory")
    parser.add_argument("--resume", action="store_true", help="continue the search in --output")


def _add_head_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", required=True, help="xception, resnet50v2 or mobilenet_025")
    parser.add_argument("--views", type=int, default=2, help="augmented views per train photo (the study: 9)")
    parser.add_argument("--features-dir", help="where features are cached (default: OUTPUT/features)")
    parser.add_argument("--feature-actors", type=int, default=1, help="Ray Data actors computing features")
    parser.add_argument("--gpus-per-actor", type=float, default=0, help="GPUs per feature actor")


def _add_serving_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replicas", type=int, default=1, help="classifier replicas (default: 1)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="photos per model call (default: 32)")
    parser.add_argument("--batch-wait-ms", type=float, default=10, help="wait to fill a batch (default: 10)")
    parser.add_argument("--cpus-per-replica", type=float, default=1,
                        help="CPUs per classifier replica, and its TensorFlow threads (default: 1)")
    parser.add_argument("--haproxy", action="store_true",
                        help="start Ray in Serve's HAProxy mode: faster, but it opens HAProxy's stats "
                        "and metrics ports (8404, 9101) on every interface")


# `dogbreeds serve`'s bounds on what strangers send: each sets the ServeArgs field of its name
# (dogbreeds/serve.py gives each default and its reason).
SERVE_BOUNDS = {
    "--max-image-pixels": (int, "photos with more pixels (first frame) get 422"),
    "--max-aspect-ratio": (float, "photos more elongated than this to 1 get 422"),
    "--max-concurrent-decodes": (int, "photos a classifier replica decodes at once"),
    "--max-request-bytes": (int, "larger bodies of other routes get 413"),
    "--max-header-bytes": (int, "larger headers and query strings get 431"),
    "--max-files-per-request": (int, "uploads of more files get 413"),
    "--max-requests-per-client": (int, "more requests in flight from one address get 429"),
    "--max-queued-requests": (int, "requests waiting for the ingress; more get 503"),
    "--body-timeout-s": (float, "a body slower than this gets 408"),
    "--request-timeout-s": (float, "a request longer than this is ended (504)"),
    "--ui-queue-size": (int, "photos waiting in the UI's queue"),
    "--upload-cache-max-age-s": (int, "UI uploads older than this are deleted"),
    "--allowed-hosts": (str, "Host headers answered, '*' for any"),
    "--api-token-file": (str, "a file holding the API token (or $DOGBREEDS_API_TOKEN)"),
}


def _serve_default(flag: str):
    # Read from the source without importing Ray: `dogbreeds --help` stays fast.
    import ast
    import pathlib

    tree = ast.parse((pathlib.Path(__file__).parent / "serve.py").read_text())
    name = flag.removeprefix("--").replace("-", "_")
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name:
            value = node.value
            if isinstance(value, ast.Call) and value.args:
                value = value.args[0]
            return ast.unparse(value)
    raise KeyError(name)


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

    export_parser = commands.add_parser("export", help="turn a run into a servable bundle")
    export_parser.add_argument("run_dir", help="a run directory (from train, search or pipeline)")
    export_parser.add_argument("--output", required=True, help="the bundle directory")
    export_parser.add_argument("--name", help="the served model's name (default: the model's)")

    search_parser = commands.add_parser("search", help="a hyperparameter search on Ray Tune")
    searches = search_parser.add_subparsers(dest="search", required=True, parser_class=_Parser)
    for kind, about in (
        ("cnn3v2", "the study's cnn3v2 search: a Ray Train run per trial"),
        ("head", "the transfer-head search on cached backbone features"),
    ):
        parser_ = searches.add_parser(kind, help=about)
        _add_data_options(parser_, "input size (default: the model's own)")
        _add_train_options(parser_)
        _add_search_options(parser_, "cnn3v2" if kind == "cnn3v2" else "transfer_head")
        if kind == "head":
            _add_head_options(parser_)

    pipeline_parser = commands.add_parser(
        "pipeline", help="the study end to end: both searches, final models, bundle, report"
    )
    pipeline_parser.add_argument("--profile", choices=["quick", "full"], default="quick",
                                 help="quick: a laptop CPU in minutes; full: the study's settings")
    _add_data_options(pipeline_parser, "not used: the profile sets image sizes")
    pipeline_parser.add_argument("--weights", default="imagenet", help="the backbone's weights: imagenet or a local .h5")
    pipeline_parser.add_argument("--feature-actors", type=int, default=1, help="Ray Data actors computing features")
    pipeline_parser.add_argument("--gpus-per-actor", type=float, default=0, help="GPUs per feature actor")
    pipeline_parser.add_argument("--output", required=True, help="the run directory")
    pipeline_parser.add_argument("--resume", action="store_true", help="continue the run in --output")

    report_parser = commands.add_parser("report", help="render a run directory to report.html")
    report_parser.add_argument("run_dir", help="a run directory (from train, search or pipeline)")
    report_parser.add_argument("--output", help="the HTML file (default: RUN_DIR/report.html)")
    report_parser.add_argument(
        "--no-predictions", action="store_true", help="skip loading the model for sample predictions"
    )

    serve_parser = commands.add_parser("serve", help="serve a bundle on Ray Serve: JSON API and Gradio UI")
    serve_parser.add_argument("bundle", help="a bundle directory (from `dogbreeds export`)")
    serve_parser.add_argument("--host", default="127.0.0.1", help="listen here (default: 127.0.0.1; 0.0.0.0: everywhere)")
    serve_parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    serve_parser.add_argument("--address", help="a running Ray cluster (default: start a local Ray)")
    _add_serving_options(serve_parser)
    serve_parser.add_argument("--max-replicas", type=int, help="autoscale between --replicas and this many")
    serve_parser.add_argument("--gpus-per-replica", type=float, default=0, help="GPUs per classifier replica")
    serve_parser.add_argument("--tensorflow-threads", type=int, default=0,
                              help="TensorFlow threads per replica (default 0: its CPUs, at least 1)")
    serve_parser.add_argument("--max-upload-mb", type=float, default=10, help="larger uploads get 413 (default: 10)")
    serve_parser.add_argument("--confidence-threshold", type=float, default=0.5,
                              help="below this top probability the UI says it is not sure (default: 0.5)")
    serve_parser.add_argument("--examples", help="a folder of example photos for the UI")
    for flag, (kind, about) in SERVE_BOUNDS.items():
        serve_parser.add_argument(flag, type=kind, nargs="+" if flag == "--allowed-hosts" else None,
                                  help=f"{about} (default: {_serve_default(flag)})")

    bench_parser = commands.add_parser("bench", help="benchmarks that print and write JSON")
    benches = bench_parser.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    pipeline_bench = benches.add_parser(
        "pipeline", help="input pipeline images/s against a bare decode-and-resize loop"
    )
    _add_data_options(pipeline_bench, "resize to this size (default: 224)")
    pipeline_bench.add_argument("--output", default="bench_pipeline.json", help="the JSON file")
    heads_bench = benches.add_parser(
        "heads", help="head trials on cached features against end to end, in one run"
    )
    _add_data_options(heads_bench, "input size (default: 128)")
    heads_bench.add_argument("--backbone", default="mobilenet_025", help="a transfer model")
    heads_bench.add_argument("--weights", default="imagenet", help="imagenet or a local .h5")
    heads_bench.add_argument("--views", type=int, default=2, help="augmented views per photo")
    heads_bench.add_argument("--trials", type=int, default=8, help="head trials in each arm")
    heads_bench.add_argument("--epochs", type=int, default=5, help="epochs per trial")
    heads_bench.add_argument("--output", default="bench_heads.json", help="the JSON file")
    serve_bench = benches.add_parser(
        "serve", help="Serve requests/s and latency, batched and unbatched, against bare model.predict"
    )
    serve_bench.add_argument("bundle", help="a bundle directory (from `dogbreeds export`)")
    serve_bench.add_argument("--data-dir", required=True, help="a folder of photos to send (searched recursively)")
    _add_serving_options(serve_bench)
    serve_bench.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="clients (default: 1 8 32)")
    serve_bench.add_argument("--duration", type=float, default=10, help="seconds per measurement (default: 10)")
    serve_bench.add_argument("--port", type=int, default=8000, help="Serve's HTTP port on 127.0.0.1")
    serve_bench.add_argument("--output", default="bench_serve.json", help="the JSON file")
    attack_bench = benches.add_parser(
        "attack", help="hostile inputs against dogbreeds serve: statuses, probe latency, peak memory"
    )
    attack_bench.add_argument("bundle", help="a bundle directory (from `dogbreeds export`)")
    attack_bench.add_argument("--port", type=int, default=8000, help="serve the bundle on this port of 127.0.0.1")
    attack_bench.add_argument("--url", help="attack this running server (on 127.x.x.x) instead of starting one")
    attack_bench.add_argument(
        "--photo", default="../shared/data/stanford_dogs_sample/Images/n02085620-Chihuahua/"
        "imagenet_sample_n02085620_Chihuahua.JPEG", help="the real photo sent after every attack",
    )
    attack_bench.add_argument("--cases", nargs="+", help="only the cases whose names contain one of these")
    attack_bench.add_argument("--output", default="bench_attack.json", help="the JSON file")
    novelty_bench = benches.add_parser(
        "novelty", help="the not-a-dog verdicts of a bundle on its own dogs and on folders of other photos"
    )
    novelty_bench.add_argument("bundle", help="a bundle directory (from `dogbreeds export`)")
    novelty_bench.add_argument("--not-dogs", nargs="+", default=[], help="folders of photos without dogs")
    novelty_bench.add_argument("--other", nargs="+", default=[], help="other folders, measured the same way")
    novelty_bench.add_argument("--output", default="bench_novelty.json", help="the JSON file")
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


def _search_config(args):
    from dogbreeds.search import SearchConfig

    return SearchConfig(
        space=args.space, trials=args.trials, concurrent_trials=args.concurrent_trials,
        algorithm=args.algorithm, scheduler=args.scheduler, retrain_best=not args.no_retrain,
    )


def _print_artefacts(output: str, names) -> None:
    for name in names:
        path = os.path.join(os.path.abspath(output), name)
        if os.path.exists(path):
            print(f"  {name:<14}{path}")


def command_search(args) -> None:
    from dogbreeds import search

    if args.search == "head":
        args.model = args.backbone
        best = search.search_head(
            _data_config(args), _train_config(args), _search_config(args), args.output,
            views=args.views, features_dir=args.features_dir, actors=args.feature_actors,
            gpus_per_actor=args.gpus_per_actor, resume=args.resume,
        )
    else:
        args.model = "cnn3v2"
        best = search.search_cnn3v2(
            _data_config(args), _train_config(args), _search_config(args), args.output, resume=args.resume
        )
    _write_report(args.output)
    print(f"best trial {best['trial_id']}: validation accuracy {best['val_accuracy']:.3f}, {best['hparams']}")
    if "final" in best:
        print(f"final model: validation {best['final']['validation']:.3f}, test {best['final']['test']:.3f}")
    _print_artefacts(args.output, ["results.csv", "best.json", "final", "report.html", "tune"])


def _write_report(output: str) -> None:
    from dogbreeds.report import write_report

    write_report(output)


def command_pipeline(args) -> None:
    from dogbreeds.pipeline import run_pipeline

    weights = None if args.weights.lower() == "none" else args.weights
    summary = run_pipeline(
        args.profile, _data_config(args), args.output, weights=weights, resume=args.resume,
        feature_actors=args.feature_actors, gpus_per_actor=args.gpus_per_actor,
    )
    _write_report(args.output)
    print(f"chosen: {summary['chosen']} (by validation accuracy); final models: {summary['final']}")
    for name, path in summary["artefacts"].items():
        print(f"  {name:<20}{path}")


def command_export(args) -> None:
    from dogbreeds.export import export_bundle

    if not os.path.isfile(os.path.join(args.run_dir, "metrics.json")):
        raise ValueError(f"not a finished run (no metrics.json): {args.run_dir}")
    info = export_bundle(args.run_dir, args.output, args.name)
    print(f"bundle {info['name']} version {info['version']}: {os.path.abspath(args.output)}")


def command_report(args) -> None:
    from dogbreeds.report import write_report

    print(write_report(args.run_dir, args.output, predictions=not args.no_predictions))


def command_serve(args) -> None:
    from dogbreeds import serve

    serve_args = serve.parse_serve_args(
        bundle=args.bundle, num_replicas=args.replicas, max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms, max_replicas=args.max_replicas,
        num_cpus_per_replica=args.cpus_per_replica, num_gpus_per_replica=args.gpus_per_replica,
        tensorflow_threads=args.tensorflow_threads, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        confidence_threshold=args.confidence_threshold, examples_dir=args.examples,
        **{
            flag.removeprefix("--").replace("-", "_"): value
            for flag in SERVE_BOUNDS
            if (value := getattr(args, flag.removeprefix("--").replace("-", "_"))) is not None
        },
    )
    serve.run_server(serve_args, args.host, args.port, args.address, args.haproxy)


def command_bench_serve(args) -> None:
    from dogbreeds import bench, serve

    # Bad options fail here, before Ray starts.
    serve.parse_serve_args(bundle=args.bundle, num_replicas=args.replicas, max_batch_size=args.max_batch_size,
                           batch_wait_ms=args.batch_wait_ms, num_cpus_per_replica=args.cpus_per_replica)
    result = bench.bench_serve(
        args.bundle, args.data_dir, tuple(args.concurrency), args.duration, args.max_batch_size,
        args.batch_wait_ms, args.replicas, args.port, args.haproxy, args.cpus_per_replica,
    )
    print(json.dumps(result, indent=1))
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"wrote {args.output}")


def command_bench_attack(args) -> None:
    from dogbreeds import bench

    if not os.path.isfile(os.path.join(args.bundle, "bundle.json")):
        raise ValueError(f"not a dogbreeds bundle (no bundle.json): {args.bundle}")
    if not os.path.isfile(args.photo):
        raise ValueError(f"--photo not found: {args.photo}")

    def progress(case):
        print(f"{case['name']}: {case['status']} in {case['seconds']} s, "
              f"{'ok' if case['acceptable'] else 'NOT ACCEPTABLE'}; probe {case['probe_status']} in "
              f"{case['probe_seconds']} s", file=sys.stderr, flush=True)

    result = bench.bench_attack(args.bundle, args.photo, args.port, args.url, args.cases, progress)
    print(json.dumps(result, indent=1, ensure_ascii=False))
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=1, ensure_ascii=False)
    print(f"wrote {args.output}")


def command_bench(args) -> None:
    if args.bench == "serve":
        return command_bench_serve(args)
    if args.bench == "attack":
        return command_bench_attack(args)
    from dogbreeds import bench

    if args.bench == "novelty":
        from dogbreeds import novelty

        result = {"benchmark": "novelty", **novelty.measure_rates(args.bundle, args.not_dogs, args.other)}
    elif args.bench == "heads":
        weights = None if args.weights.lower() == "none" else args.weights
        result = bench.bench_heads(
            _data_config(args), args.backbone, weights, args.image_size or 128, args.views,
            args.trials, args.epochs,
        )
    else:
        result = bench.bench_pipeline(_data_config(args), args.image_size or 224)
    print(json.dumps(result, indent=1))
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"wrote {args.output}")


COMMANDS = {
    "models": command_models,
    "data": command_data,
    "train": command_train,
    "export": command_export,
    "search": command_search,
    "pipeline": command_pipeline,
    "report": command_report,
    "serve": command_serve,
    "bench": command_bench,
}


# Options whose relative paths a cluster job puts on the shared storage.
STORAGE_OPTIONS = ("--output", "--features-dir", "--cache-dir", "--tfds-dir", "--examples", "--api-token-file")


def on_storage(argv: list[str]) -> list[str]:
    """argv with relative storage paths (and `serve`'s bundle) moved under $DOGBREEDS_STORAGE,
    the storage every node of a cluster mounts (ray_cluster.yaml sets it); unchanged if unset."""
    storage = os.environ.get("DOGBREEDS_STORAGE")
    argv = list(argv)
    if not storage:
        return argv

    def moved(path):
        return path if os.path.isabs(path) else os.path.join(storage, path)

    if argv[:1] == ["serve"] and len(argv) > 1 and not argv[1].startswith("-"):
        argv[1] = moved(argv[1])
    for position, option in enumerate(argv[:-1]):
        if option in STORAGE_OPTIONS:
            argv[position + 1] = moved(argv[position + 1])
    return argv


def main_on_cluster(argv: list[str]) -> int:
    """A `cluster/` job: attach to the running Ray cluster (the CLI then starts no Ray of its
    own), and run the command with its storage paths on the shared storage."""
    import ray

    ray.init(address="auto")
    return main(on_storage(argv))


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
