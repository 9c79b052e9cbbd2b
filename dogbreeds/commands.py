"""What each `dogbreeds` command does, once its options are parsed (options.py): the
configurations read from them, the checks that run before Ray starts, then the stage's own
functions, with results printed to stdout.
"""

from __future__ import annotations

import json
import logging
import os

from dogbreeds import config, runs
from dogbreeds.config import DataConfig, TrainConfig
from dogbreeds.options import settings

log = logging.getLogger("dogbreeds")


# ---------------------------------------------------------------------------------------------
# Configurations, and the checks that run before Ray starts.


def _data_config(args) -> DataConfig:
    data_config = DataConfig(**settings(args, "data"))
    if data_config.data_dir and not os.path.isdir(data_config.data_dir):
        raise ValueError(f"--data-dir not found: {data_config.data_dir}")
    return data_config


def _train_config(args, **overrides) -> TrainConfig:
    return TrainConfig(**{**settings(args, "train"), **overrides})


def _search_config(args, space: str | None = None):
    """`space` stands in for --space where a command has none (bench heads reads only the trials)."""
    return config.section_class("search")(space=args.space if space is None else space, **settings(args, "search"))


def check_inputs(data_config: DataConfig, model: str | None = None, weights=None) -> None:
    """Before any Ray work: the model's input size, its weights file (or ImageNet reachable)
    and the data source (a folder with photos, or TFDS prepared or reachable)."""
    from dogbreeds import data, models

    if model is not None:
        image_size = models.resolve_input(model, data_config.image_size).image_size
        models.check_weights(model, weights, image_size)
    data.check_source(data_config)


# ---------------------------------------------------------------------------------------------
# The commands.


def command_models(args) -> None:
    from dogbreeds import models

    print(f"{'model':<15}{'input':>7}  {'scaling':<10} description")
    for name in models.list_models():
        spec = models.get_model_spec(name)
        print(f"{name:<15}{spec.image_size:>7}  {spec.scaling:<10} {spec.description}")


def command_data(args) -> None:
    from dogbreeds import data

    config_ = _data_config(args)
    index = data.load_index(config_)
    for split in index.splits.values():  # decoding is the only honest test of a file
        index.skipped += data.load_images(split, config_.image_size, config_)[2]
    summary = data.summarize(index)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        _print_data_summary(summary)


def _print_data_summary(summary: dict) -> None:
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
    from dogbreeds import models
    from dogbreeds.train import run_training

    data_config, train_config = _data_config(args), _train_config(args, model=args.model)
    models.resolve_hparams(train_config.model, train_config.hparams)  # a misspelled name, now
    check_inputs(data_config, train_config.model, train_config.weights)
    metrics = run_training(data_config, train_config, args.output, resume=args.resume)
    test = metrics["test"]
    print(
        f"{train_config.model}: test top-1 {test['top1']:.3f}, top-5 {test['top5']:.3f}, "
        f"precision {test['precision']:.3f}, recall {test['recall']:.3f} on "
        f"{test['num_images']} images"
    )
    for name in (runs.MODEL, runs.METRICS, runs.CONFUSIONS, runs.TENSORBOARD):
        print(f"  {name:<16}{os.path.join(os.path.abspath(args.output), name)}")


def _print_artefacts(output: str, names) -> None:
    for name in names:
        path = os.path.join(os.path.abspath(output), name)
        if os.path.exists(path):
            print(f"  {name:<14}{path}")


def command_search(args) -> None:
    from dogbreeds import search

    data_config, search_config = _data_config(args), _search_config(args)
    kind = search.SEARCHES[args.search]
    if kind.model_from == "space":  # the space file names the model (cnn3v2)
        train_config = _train_config(args, model=search.check_space(search_config.space, args.search).model)
        options = {}
    elif kind.model_from == "head_search":  # the head search's model (fine_tune)
        train_config, options = _train_config(args), dict(head_search=args.head_search)
        search.check_space(search_config.space, args.search)
    else:  # the backbone (--backbone) is the model; its features are computed once
        train_config = _train_config(args)
        search.check_space(search_config.space, args.search, train_config.model)
        options = dict(features_dir=args.features_dir, actors=args.feature_actors, gpus_per_actor=args.gpus_per_actor)
    if kind.model_from == "head_search":
        check_inputs(data_config)  # the model and its weights were checked by the head search
    else:
        check_inputs(data_config, train_config.model, train_config.weights)
    best = kind.run(data_config, train_config, search_config, args.output, resume=args.resume, **options)
    _write_report(args.output)
    print(f"best trial {best['trial_id']}: validation accuracy {best['val_accuracy']:.3f}, {best['hparams']}")
    if "final" in best:
        print(f"final model: validation {best['final']['validation']:.3f}, test {best['final']['test']:.3f}")
    _print_artefacts(args.output, [runs.RESULTS, runs.BEST, runs.FINAL, runs.REPORT, runs.TUNE])


def _write_report(output: str) -> None:
    from dogbreeds.report import write_report

    write_report(output)


def stage_settings(args) -> dict:
    """`--set STAGE.FIELD=VALUE` (and `--backbone`) as {stage: {section: {field: value}}}, each
    value read as YAML and checked as its option's would be (`seed` sets both of its fields)."""
    import yaml

    from dogbreeds import pipeline

    stages = {}
    for item in args.stage_settings:
        key, equals, text = item.partition("=")
        stage, dot, name = key.partition(".")
        name = name.strip().replace("-", "_")
        if not (equals and dot and name) or stage not in pipeline.STAGES:
            raise ValueError(f"--set {item}: expected STAGE.FIELD=VALUE, STAGE one of {', '.join(pipeline.STAGES)}")
        fields = [fields[name] for fields in args._fields.values() if name in fields]
        if not fields:
            known = sorted({name for fields in args._fields.values() for name in fields})
            raise ValueError(f"--set {item}: unknown field {name!r}; known: {', '.join(known)}")
        for setting in fields:
            try:
                value = setting.convert(yaml.safe_load(text) if text.strip() else text)
            except (TypeError, ValueError, yaml.YAMLError) as error:
                raise ValueError(f"--set {item}: {error}") from None
            stages.setdefault(stage, {}).setdefault(setting.section, {})[name] = value
    if args.backbone:
        stages.setdefault("head", {}).setdefault("train", {})["model"] = args.backbone
    return stages


def command_pipeline(args) -> None:
    from dogbreeds import pipeline, search

    overrides = {section: settings(args, section) for section in ("data", "train", "search")}
    overrides["stages"] = stage_settings(args)
    _data_config(args)  # --data-dir exists
    stages = pipeline.resolve_stages(args.profile, **overrides, compare_backbones=args.compare_backbones)
    for stage, (stage_data, stage_train, stage_search) in stages.items():
        kind = pipeline.stage_kind(stage)
        search.check_space(stage_search.space, kind, stage_train.model if kind == "head" else None)
        check_inputs(stage_data, stage_train.model, stage_train.weights)
    summary = pipeline.run_pipeline(
        args.profile, args.output, resume=args.resume, feature_actors=args.feature_actors,
        gpus_per_actor=args.gpus_per_actor, ladder=args.ladder, compare_backbones=args.compare_backbones,
        **overrides,
    )
    _write_report(args.output)
    _print_table(summary["table"])
    print(f"exported: {summary['chosen']} (the best on validation)")
    _print_stages(summary["stages_run"])
    for name, path in summary["artefacts"].items():
        print(f"  {name:<20}{path}")


def _print_table(rows: list[dict]) -> None:
    """The pipeline's comparison table, as the report opens with it."""
    print(f"{'model':<20}{'params':>12}{'trainable':>12}{'epochs':>7}{'train s':>9}{'img/s':>8}"
          f"{'val top-1':>10}{'top-1':>7}{'top-5':>7}{'prec.':>7}{'recall':>7}")
    for row in rows:
        speed = "—" if row["images_per_s"] is None else f"{row['images_per_s']:.0f}"
        print(f"{row['name']:<20}{row['total_params']:>12,}{row['trainable_params']:>12,}{row['epochs'] or 0:>7}"
              f"{row['train_seconds'] or 0:>9.1f}{speed:>8}{row['validation_top1']:>10.3f}{row['test_top1']:>7.3f}"
              f"{row['test_top5']:>7.3f}{row['test_precision']:>7.3f}{row['test_recall']:>7.3f}")


def _print_stages(timings: dict) -> None:
    """Each stage's time and the peak memory of the processes that ran it."""
    print(f"{'stage':<20}{'seconds':>9}{'peak MB: driver':>17}{'largest worker':>16}{'all':>8}")
    for stage, timing in timings.items():
        peak = timing["peak_mb"]
        print(f"{stage:<20}{timing['seconds']:>9.0f}{peak['driver']:>17,}{peak['largest_worker']:>16,}{peak['all']:>8,}")
    print(f"{'total':<20}{sum(timing['seconds'] for timing in timings.values()):>9.0f}")


def command_export(args) -> None:
    from dogbreeds.export import export_bundle

    if not os.path.isfile(os.path.join(args.run_dir, runs.METRICS)):
        raise ValueError(f"not a finished run (no {runs.METRICS}): {args.run_dir}")
    info = export_bundle(args.run_dir, args.output, args.name)
    print(f"bundle {info['name']} version {info['version']}: {os.path.abspath(args.output)}")


def command_report(args) -> None:
    from dogbreeds.report import write_report

    output = None if args.output is None else os.path.join(args.output, runs.REPORT)
    if args.output is not None:
        os.makedirs(args.output, exist_ok=True)
    print(write_report(args.run_dir, output, predictions=not args.no_predictions))


def command_dashboard(args) -> None:
    from dogbreeds import dashboard

    dashboard.serve(args.run_dir, args.host, args.port, **settings(args, "serve"))


def _check_bundle(bundle: str) -> None:
    """A bundle's files, checked before Ray starts (no TensorFlow)."""
    from dogbreeds import export

    if not os.path.isdir(bundle):
        raise ValueError(f"bundle not found: {bundle}")
    export.check_bundle(bundle)


def command_serve(args) -> None:
    _check_bundle(args.bundle)
    from dogbreeds import serve

    serve_args = serve.parse_serve_args(bundle=args.bundle, **settings(args, "serve"))
    serve.run_server(serve_args, args.host, args.port, args.address, args.haproxy)


def _write_bench(args, result: dict) -> None:
    """Print a benchmark's JSON and write it as OUTPUT/bench_NAME.json."""
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, f"bench_{args.bench}.json")
    print(json.dumps(result, indent=1, ensure_ascii=False))
    with open(path, "w") as handle:
        json.dump(result, handle, indent=1, ensure_ascii=False)
    print(f"wrote {path}")


def _bench_pipeline(args) -> dict:
    from dogbreeds import bench

    data_config = _data_config(args)
    check_inputs(data_config)
    return bench.bench_pipeline(data_config, data_config.image_size)


def _bench_heads(args) -> dict:
    from dogbreeds import bench

    data_config, train_config = _data_config(args), _train_config(args, model=args.backbone)
    check_inputs(data_config, args.backbone, train_config.weights)
    return bench.bench_heads(
        data_config, args.backbone, train_config.weights, data_config.image_size,
        data_config.augmented_views, _search_config(args, space="").trials, train_config.epochs,
    )


def _bench_serve(args) -> dict:
    _check_bundle(args.bundle)  # before Ray (and its import)
    if not os.path.isdir(args.data_dir):
        raise ValueError(f"--data-dir not found: {args.data_dir}")
    from dogbreeds import bench, serve

    serve_args = serve.parse_serve_args(bundle=args.bundle, **settings(args, "serve"))  # bad options fail before Ray
    return bench.bench_serve(
        args.bundle, args.data_dir, tuple(args.concurrency), args.duration, serve_args.max_batch_size,
        serve_args.batch_wait_ms, serve_args.num_replicas, args.port, args.haproxy,
        serve_args.num_cpus_per_replica,
    )


def _bench_attack(args) -> dict:
    _check_bundle(args.bundle)  # before Ray (and its import)
    if not os.path.isfile(args.photo):
        raise ValueError(f"--photo not found: {args.photo}")
    from dogbreeds import bench

    def progress(case):
        log.info(f"{case['name']}: {case['status']} in {case['seconds']} s, "
                 f"{'ok' if case['acceptable'] else 'NOT ACCEPTABLE'}; probe {case['probe_status']} in "
                 f"{case['probe_seconds']} s")

    return bench.bench_attack(args.bundle, args.photo, args.port, args.url, args.cases, progress)


def _bench_novelty(args) -> dict:
    from dogbreeds import bench

    return bench.bench_novelty(args.bundle, args.not_dogs, args.other, args.whole_dogs)


BENCHES = {
    "pipeline": _bench_pipeline,
    "heads": _bench_heads,
    "serve": _bench_serve,
    "attack": _bench_attack,
    "novelty": _bench_novelty,
}


def command_bench(args) -> None:
    _write_bench(args, BENCHES[args.bench](args))


COMMANDS = {
    "models": command_models,
    "data": command_data,
    "train": command_train,
    "export": command_export,
    "search": command_search,
    "pipeline": command_pipeline,
    "report": command_report,
    "dashboard": command_dashboard,
    "serve": command_serve,
    "bench": command_bench,
}

# Commands that `--resume` continues after Ctrl-C.
RESUMABLE = ("train", "search", "pipeline")

