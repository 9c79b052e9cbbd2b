"""The `dogbreeds` command: one subcommand per stage.

    dogbreeds models
    dogbreeds data --data-dir ../shared/data/tiny_dogs_64
    dogbreeds train cnn3v2 --data-dir ../shared/data/tiny_dogs_64 --image-size 64 --epochs 5 \
        --workers 2 --output runs/cnn3v2
    dogbreeds report runs/cnn3v2
    dogbreeds bench pipeline --data-dir ../shared/data/stanford_dogs_sample --output runs
    dogbreeds serve bundles/best --examples ../shared/data/stanford_dogs_sample

Every option that sets a configuration field is derived from its class: DataConfig,
TrainConfig, ServeArgs (config.py) and SearchConfig (search.py). A field becomes
`--field-name` of the field's type (a bool is `--x/--no-x`, an Optional accepts `none`), its
help is the comment above the field and its default the field's own, so each default and its
reason are written once. A few options keep the name users know as an alias (`--batch-size`,
`--views`, `--replicas`, ...). `--config FILE.yaml` sets any field (sections `data:`,
`train:`, `search:`, `serve:`); options given on the command line override it.

This is a small derivation of ours rather than jsonargparse or tyro: they would add a dependency,
their own help format and their own config-file rules, while our classes already carry a
one-line reason above each field, which is all the help needs.

Bad options, missing paths and bad files end in one line on stderr and a non-zero exit, checked
before Ray starts wherever they can be; any other error too (`--verbose` adds its traceback).
Ctrl-C ends a run with exit 130. Messages go through `logging` (stderr); results go to stdout.
TensorFlow's start-up noise is filtered from stderr unless `--verbose`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import threading
import types
import typing

import dogbreeds
from dogbreeds import config, runs
from dogbreeds.config import DataConfig, ServeArgs, TrainConfig

log = logging.getLogger("dogbreeds")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ---------------------------------------------------------------------------------------------
# Options derived from the configuration classes.


def _search_config_class():
    from dogbreeds.search import SearchConfig  # light at its top: no TensorFlow or Ray

    return SearchConfig


# The configuration classes, by their section name in `--config FILE.yaml`.
SECTIONS = {"data": lambda: DataConfig, "train": lambda: TrainConfig,
            "search": _search_config_class, "serve": lambda: ServeArgs}

# Names users know from earlier versions, kept as aliases of the fields' own options.
ALIASES = {
    "train.per_worker_batch_size": ["--batch-size"],
    "data.augmented_views": ["--views"],
    "search.retrain_best": ["--retrain"],  # hence --no-retrain
    "serve.num_replicas": ["--replicas"],
    "serve.num_cpus_per_replica": ["--cpus-per-replica"],
    "serve.num_gpus_per_replica": ["--gpus-per-replica"],
    "serve.examples_dir": ["--examples"],
}

# The values a string field accepts, where its class states them in its comment only.
CHOICES = {"search.algorithm": ("random", "tpe"), "search.scheduler": ("asha", "none")}

# Counts where 0 or less means nothing: refused here, before anything starts.
POSITIVE = {"train.epochs", "train.workers", "train.per_worker_batch_size", "train.cpus_per_worker",
            "search.trials", "search.concurrent_trials"}


# How `--help` names a value of each type.
METAVARS = {int: "N", float: "X", str: "TEXT"}


class _Field(typing.NamedTuple):
    section: str
    name: str
    kind: type  # int, float, str, bool, or tuple (of str)
    optional: bool
    default: typing.Any
    help: str

    @property
    def dest(self) -> str:
        return f"{self.section}.{self.name}"

    def convert(self, value):
        """A value from the command line (a string) or a config file, as this field's type;
        a bad one is a ValueError."""
        if self.optional and (value is None or (isinstance(value, str) and value.lower() == "none")):
            return None
        if self.kind is tuple:
            return tuple(str(item) for item in (value if isinstance(value, (list, tuple)) else [value]))
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise ValueError(f"expected true or false, got {value!r}")
        if isinstance(value, bool) or (self.kind is not str and isinstance(value, (list, dict))):
            raise ValueError(f"expected {self.kind.__name__}, got {value!r}")
        if self.kind is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"expected int, got {value!r}")
            value = int(value)
        value = self.kind(value)
        if self.name == "image_size":
            from dogbreeds import models

            models.check_image_size(value)
        if self.dest in POSITIVE and value <= 0:
            raise ValueError(f"must be at least 1, got {value}")
        if self.dest in CHOICES and value not in CHOICES[self.dest]:
            raise ValueError(f"choose from {', '.join(CHOICES[self.dest])}, got {value!r}")
        return value


def _kind(annotation) -> tuple[type | None, bool]:
    """(int/float/str/bool/tuple, optional) of a field's annotation; None: not an option."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        if len(members) != 1:
            return None, optional
        annotation = members[0]
    if typing.get_origin(annotation) is tuple:
        return tuple, optional
    return (annotation if annotation in (int, float, str, bool) else None), optional


def config_fields(section: str) -> dict[str, _Field]:
    """The fields of a section's class that are options: each with its type, default and help
    (the comment above it). Mappings (TrainConfig.hparams) and required fields are left out."""
    cls = SECTIONS[section]()
    comments = config.field_comments(cls)
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        items = [(f.name, hints[f.name], f.default) for f in dataclasses.fields(cls)]
    else:
        items = [(name, info.annotation, info.default) for name, info in cls.model_fields.items()]
    fields = {}
    for name, annotation, default in items:
        kind, optional = _kind(annotation)
        if kind is None or default is dataclasses.MISSING or repr(default) == "PydanticUndefined":
            continue
        fields[name] = _Field(section, name, kind, optional, default, comments.get(name, ""))
    return fields


class _TupleAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, tuple(values))


def _argument_type(field: _Field):
    def convert(text):
        try:
            return field.convert(text)
        except ValueError as error:
            if str(error).startswith("invalid literal") or "could not convert" in str(error):
                raise  # argparse says: invalid int value: 'many'
            raise argparse.ArgumentTypeError(f"{error}") from None

    convert.__name__ = field.kind.__name__
    return convert


def add_config_options(parser, section: str, skip=(), only=None, defaults=None) -> None:
    """Add an option for each field of `section`'s class (but `skip`; only `only` if given).
    `defaults` are this command's own, over the class's. Options not given stay out of the
    namespace (argparse.SUPPRESS), so a config file's values are overridden only by what the
    command line really says."""
    defaults = defaults or {}
    group = parser.add_argument_group(f"{section} ({SECTIONS[section]().__name__})")
    for name, field in config_fields(section).items():
        if name in skip or (only is not None and name not in only):
            continue
        flags = [f"--{name.replace('_', '-')}", *ALIASES.get(field.dest, [])]
        parser._dogbreeds_fields.setdefault(section, {})[name] = field
        if flags[0] in parser._option_string_actions:  # `--seed`: one option sets both fields
            parser._dogbreeds_shared.setdefault(section, {})[name] = parser._option_string_actions[flags[0]].dest
            continue
        default = defaults.get(name, field.default)
        about = field.help.replace("%", "%%") + f" (default: {'none' if default is None else default})"
        if field.kind is bool:
            group.add_argument(*flags, dest=field.dest, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=about)
        elif field.kind is tuple:
            group.add_argument(*flags, dest=field.dest, action=_TupleAction, nargs="+", default=argparse.SUPPRESS,
                               help=about, metavar=METAVARS[str])
        else:
            metavar = "{" + ",".join(CHOICES[field.dest]) + "}" if field.dest in CHOICES else METAVARS[field.kind]
            group.add_argument(*flags, dest=field.dest, type=_argument_type(field), default=argparse.SUPPRESS,
                               help=about, metavar=metavar)
    for name, value in defaults.items():
        parser._dogbreeds_defaults.setdefault(section, {})[name] = value


def _command(commands, name: str, help: str, config_file: bool = False) -> _Parser:
    parser = commands.add_parser(name, help=help)
    parser._dogbreeds_fields, parser._dogbreeds_defaults, parser._dogbreeds_shared = {}, {}, {}
    parser.set_defaults(_fields=parser._dogbreeds_fields, _defaults=parser._dogbreeds_defaults,
                        _shared=parser._dogbreeds_shared)
    parser.add_argument("--verbose", action="store_true",
                        help="debug messages, TensorFlow's own, and a traceback with any error")
    if config_file:
        parser.add_argument("--config", metavar="FILE.yaml",
                            help="set any field: sections data:, train:, search:, serve: (options given here win)")
    return parser


def settings(args, section: str) -> dict:
    """A section's values for this command: its own defaults, then `--config`'s, then the
    command line's (the class's defaults fill in the rest)."""
    values = dict(args._defaults.get(section, {}))
    values.update(getattr(args, "_file", {}).get(section, {}))
    prefix = f"{section}."
    given = vars(args)
    values.update({dest[len(prefix):]: value for dest, value in given.items() if dest.startswith(prefix)})
    values.update({name: given[dest] for name, dest in args._shared.get(section, {}).items() if dest in given})
    return values


def _read_config_file(args) -> None:
    """`--config FILE.yaml` into `args._file`, each value checked as its option's would be."""
    args._file = {}
    if not getattr(args, "config", None):
        return
    known = {section: dict(fields) for section, fields in args._fields.items()}
    if args.command == "train":
        known["train"]["hparams"] = None  # a Mapping: set in the file only
    loaded = config.load_config_file(args.config, known)
    for section, values in loaded.items():
        for name, value in values.items():
            field = known[section][name]
            try:
                values[name] = dict(value) if field is None else field.convert(value)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{args.config}: {section}.{name}: {error}") from None
    args._file = loaded


# ---------------------------------------------------------------------------------------------
# The parser.


def build_parser() -> argparse.ArgumentParser:
    """The `dogbreeds` parser: imports no TensorFlow or Ray, so `--help` and `models` are fast."""
    parser = _Parser(prog="dogbreeds", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"dogbreeds {dogbreeds.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    _command(commands, "models", "list the model registry")

    data_parser = _command(commands, "data", "summarise a dataset: breeds, images, skipped files")
    add_config_options(data_parser, "data", only=("data_dir", "tfds_dir", "image_size", "seed", "cache_dir",
                                                  "validation_fraction", "test_fraction"),
                       defaults={"image_size": 64})  # decoding at 64 px finds unreadable files fast
    data_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")

    train_parser = _command(commands, "train", "train a model on Ray Train and evaluate it", config_file=True)
    train_parser.add_argument("model", help="a registered model (see `dogbreeds models`)")
    add_config_options(train_parser, "data")
    add_config_options(train_parser, "train", skip=("model",))
    train_parser.add_argument("--output", required=True, help="the run directory")
    train_parser.add_argument("--resume", action="store_true", help="continue the run in --output")

    export_parser = _command(commands, "export", "turn a run into a servable bundle")
    export_parser.add_argument("run_dir", help="a run directory (from train, search or pipeline)")
    export_parser.add_argument("--output", required=True, help="the bundle directory")
    export_parser.add_argument("--name", help="the served model's name (default: the model's)")

    search_parser = commands.add_parser("search", help="a hyperparameter search on Ray Tune")
    searches = search_parser.add_subparsers(dest="search", required=True, parser_class=_Parser)
    for kind, (space, about, model_from_file) in _search_kinds().items():
        parser_ = _command(searches, kind, about, config_file=True)
        parser_.add_argument("--space", default=space, help=f"a search-space file (default: {space}, "
                             f"search_spaces/{space}.yaml)")
        if not model_from_file:  # the backbone is the model; its features are computed once
            parser_.add_argument("--backbone", dest="train.model", required=True,
                                 help="a transfer model (see `dogbreeds models`), whose frozen features the heads train on")
            add_config_options(parser_, "data", defaults={"augmented_views": 2})
            add_config_options(parser_, "train", skip=("model", "workers", "max_failures"))
            add_config_options(parser_, "search", skip=("space", "retrain_best"))
            _add_feature_options(parser_)
            parser_.add_argument("--features-dir", help="where features are cached (default: OUTPUT/features)")
        else:
            add_config_options(parser_, "data")
            add_config_options(parser_, "train", skip=("model",))
            add_config_options(parser_, "search", skip=("space",))
        parser_.add_argument("--output", required=True, help="the search directory")
        parser_.add_argument("--resume", action="store_true", help="continue the search in --output")

    pipeline_parser = _command(
        commands, "pipeline", "the study end to end: both searches, final models, bundle, report", config_file=True
    )
    pipeline_parser.add_argument("--profile", choices=["quick", "full"], default="quick",
                                 help="quick: a laptop CPU in minutes; full: the study's settings. "
                                 "An option given here overrides the profile's value in both searches")
    add_config_options(pipeline_parser, "data")
    add_config_options(pipeline_parser, "train", skip=("model",))
    add_config_options(pipeline_parser, "search", skip=("space", "retrain_best"))  # it compares final models
    _add_feature_options(pipeline_parser)
    pipeline_parser.add_argument("--output", required=True, help="the run directory")
    pipeline_parser.add_argument("--resume", action="store_true", help="continue the run in --output")

    report_parser = _command(commands, "report", "render a run directory to report.html")
    report_parser.add_argument("run_dir", help="a run directory (from train, search or pipeline)")
    report_parser.add_argument("--output", help="the directory of report.html (default: RUN_DIR)")
    report_parser.add_argument(
        "--no-predictions", action="store_true", help="skip loading the model for sample predictions"
    )

    serve_parser = _command(commands, "serve", "serve a bundle on Ray Serve: JSON API and Gradio UI", config_file=True)
    serve_parser.add_argument("bundle", help="a bundle directory (from `dogbreeds export`)")
    serve_parser.add_argument("--host", default="127.0.0.1", help="listen here (default: 127.0.0.1; 0.0.0.0: everywhere)")
    serve_parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    serve_parser.add_argument("--address", help="a running Ray cluster (default: start a local Ray)")
    _add_haproxy_option(serve_parser)
    add_config_options(serve_parser, "serve")
    serve_parser.add_argument("--max-upload-mb", dest="serve.max_upload_bytes", type=_megabytes,
                              default=argparse.SUPPRESS, help="--max-upload-bytes in MB (default: 10)")

    bench_parser = commands.add_parser("bench", help="benchmarks that print JSON and write OUTPUT/bench_NAME.json")
    benches = bench_parser.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    pipeline_bench = _command(benches, "pipeline", "input pipeline images/s against a bare decode-and-resize loop")
    add_config_options(pipeline_bench, "data", only=("data_dir", "tfds_dir", "image_size", "seed", "cache_dir"),
                       defaults={"image_size": 224})  # the transfer models' size
    heads_bench = _command(benches, "heads", "head trials on cached features against end to end, in one run")
    heads_bench.add_argument("--backbone", default="mobilenet_025", help="a transfer model (default: mobilenet_025)")
    add_config_options(heads_bench, "data", defaults={"image_size": 128, "augmented_views": 2})  # a CPU's minutes
    add_config_options(heads_bench, "train", only=("weights", "epochs"), defaults={"epochs": 5})
    add_config_options(heads_bench, "search", only=("trials",))
    serve_bench = _command(
        benches, "serve", "Serve requests/s and latency, batched and unbatched, against bare model.predict"
    )
    serve_bench.add_argument("bundle", help="a bundle directory (from `dogbreeds export`)")
    serve_bench.add_argument("--data-dir", required=True, help="a folder of photos to send (searched recursively)")
    add_config_options(serve_bench, "serve", only=("num_replicas", "max_batch_size", "batch_wait_ms", "num_cpus_per_replica"))
    _add_haproxy_option(serve_bench)
    serve_bench.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="clients (default: 1 8 32)")
    serve_bench.add_argument("--duration", type=float, default=10, help="seconds per measurement (default: 10)")
    serve_bench.add_argument("--port", type=int, default=8000, help="Serve's HTTP port on 127.0.0.1")
    attack_bench = _command(
        benches, "attack", "hostile inputs against dogbreeds serve: statuses, probe latency, peak memory"
    )
    attack_bench.add_argument("bundle", help="a bundle directory (from `dogbreeds export`)")
    attack_bench.add_argument("--port", type=int, default=8000, help="serve the bundle on this port of 127.0.0.1")
    attack_bench.add_argument("--url", help="attack this running server (on 127.x.x.x) instead of starting one")
    attack_bench.add_argument(
        "--photo", default="../shared/data/stanford_dogs_sample/Images/n02085620-Chihuahua/"
        "imagenet_sample_n02085620_Chihuahua.JPEG", help="the real photo sent after every attack",
    )
    attack_bench.add_argument("--cases", nargs="+", help="only the cases whose names contain one of these")
    novelty_bench = _command(
        benches, "novelty", "the not-a-dog verdicts of a bundle on its own dogs and on folders of other photos"
    )
    novelty_bench.add_argument("bundle", help="a bundle directory (from `dogbreeds export`)")
    novelty_bench.add_argument("--not-dogs", nargs="+", default=[], help="folders of photos without dogs")
    novelty_bench.add_argument("--other", nargs="+", default=[], help="other folders, measured the same way")
    for bench in (pipeline_bench, heads_bench, serve_bench, attack_bench, novelty_bench):
        bench.add_argument("--output", default=".", help="the directory of bench_NAME.json (default: .)")
    return parser


def _search_kinds() -> dict[str, tuple[str, str, bool]]:
    """{kind: (default space, help, whether its space file names the model)} from search.py's
    registry of searches."""
    from dogbreeds import search

    return {name: (kind.default_space, kind.description, kind.model_from_file) for name, kind in search.SEARCHES.items()}


def _add_feature_options(parser) -> None:
    parser.add_argument("--feature-actors", type=_positive_int, default=1,
                        help="Ray Data actors computing backbone features (default: 1)")
    parser.add_argument("--gpus-per-actor", type=float, default=0, help="GPUs per feature actor (default: 0)")


def _add_haproxy_option(parser) -> None:
    parser.add_argument("--haproxy", action="store_true",
                        help="start Ray in Serve's HAProxy mode: faster, but it opens HAProxy's stats "
                        "and metrics ports (8404, 9101) on every interface")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _megabytes(text: str) -> int:
    return int(float(text) * 1024 * 1024)


# ---------------------------------------------------------------------------------------------
# Configurations, and the checks that run before Ray starts.


def _data_config(args) -> DataConfig:
    data_config = DataConfig(**settings(args, "data"))
    if data_config.data_dir and not os.path.isdir(data_config.data_dir):
        raise ValueError(f"--data-dir not found: {data_config.data_dir}")
    return data_config


def _train_config(args, **overrides) -> TrainConfig:
    return TrainConfig(**{**settings(args, "train"), **overrides})


def _search_config(args):
    return _search_config_class()(space=args.space, **settings(args, "search"))


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
    if kind.model_from_file:  # the space file names the model (cnn3v2)
        train_config = _train_config(args, model=search.check_space(search_config.space, args.search).model)
        options = {}
    else:  # the backbone (--backbone) is the model; its features are computed once
        train_config = _train_config(args)
        search.check_space(search_config.space, args.search, train_config.model)
        options = dict(features_dir=args.features_dir, actors=args.feature_actors, gpus_per_actor=args.gpus_per_actor)
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


def command_pipeline(args) -> None:
    from dogbreeds import pipeline, search

    overrides = {section: settings(args, section) for section in ("data", "train", "search")}
    _data_config(args)  # --data-dir exists
    for stage, (stage_data, stage_train, stage_search) in pipeline.resolve_stages(args.profile, **overrides).items():
        search.check_space(stage_search.space, stage, stage_train.model if stage == "head" else None)
        check_inputs(stage_data, stage_train.model, stage_train.weights)
    summary = pipeline.run_pipeline(
        args.profile, args.output, resume=args.resume, feature_actors=args.feature_actors,
        gpus_per_actor=args.gpus_per_actor, **overrides,
    )
    _write_report(args.output)
    print(f"chosen: {summary['chosen']} (by validation accuracy); final models: {summary['final']}")
    for name, path in summary["artefacts"].items():
        print(f"  {name:<20}{path}")


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


def command_bench(args) -> None:
    if args.bench in ("serve", "attack"):
        _check_bundle(args.bundle)  # before Ray (and its import)
    from dogbreeds import bench

    if args.bench == "serve":
        from dogbreeds import serve

        if not os.path.isdir(args.data_dir):
            raise ValueError(f"--data-dir not found: {args.data_dir}")
        serve_args = serve.parse_serve_args(bundle=args.bundle, **settings(args, "serve"))  # bad options fail before Ray
        result = bench.bench_serve(
            args.bundle, args.data_dir, tuple(args.concurrency), args.duration, serve_args.max_batch_size,
            serve_args.batch_wait_ms, serve_args.num_replicas, args.port, args.haproxy,
            serve_args.num_cpus_per_replica,
        )
    elif args.bench == "attack":
        if not os.path.isfile(args.photo):
            raise ValueError(f"--photo not found: {args.photo}")

        def progress(case):
            log.info(f"{case['name']}: {case['status']} in {case['seconds']} s, "
                     f"{'ok' if case['acceptable'] else 'NOT ACCEPTABLE'}; probe {case['probe_status']} in "
                     f"{case['probe_seconds']} s")

        result = bench.bench_attack(args.bundle, args.photo, args.port, args.url, args.cases, progress)
    elif args.bench == "novelty":
        from dogbreeds import novelty

        result = {"benchmark": "novelty", **novelty.measure_rates(args.bundle, args.not_dogs, args.other)}
    elif args.bench == "heads":
        data_config, train_config = _data_config(args), _train_config(args, model=args.backbone)
        check_inputs(data_config, args.backbone, train_config.weights)
        result = bench.bench_heads(
            data_config, args.backbone, train_config.weights, data_config.image_size,
            data_config.augmented_views, _search_config_class()(space="", **settings(args, "search")).trials,
            train_config.epochs,
        )
    else:
        data_config = _data_config(args)
        check_inputs(data_config)
        result = bench.bench_pipeline(data_config, data_config.image_size)
    _write_bench(args, result)


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

# Commands that `--resume` continues after Ctrl-C.
RESUMABLE = ("train", "search", "pipeline")


# ---------------------------------------------------------------------------------------------
# Running on a cluster.


# Options whose relative paths a cluster job puts on the shared storage.
STORAGE_OPTIONS = ("--output", "--features-dir", "--cache-dir", "--tfds-dir", "--examples", "--examples-dir",
                   "--api-token-file")


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


# ---------------------------------------------------------------------------------------------
# Messages, TensorFlow's noise, errors and Ctrl-C.

# Lines TensorFlow's C++ side writes to stderr at start-up, before absl's logging is set up
# (so TF_CPP_MIN_LOG_LEVEL cannot hide them), in our process and in every Ray worker (whose
# output Ray forwards here): none is about the run.
NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called|oneDNN custom operations are on"
    r"|Could not find cuda drivers|failed call to cuInit|cuda_platform\.cc|cudart_stub\.cc"
    r"|Unable to register cu(DNN|FFT|BLAS) factory|computation_placer\.cc|TF-TRT Warning"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|rebuild TensorFlow with the appropriate compiler flags"
)


class _NoiseFilter:
    """stderr (file descriptor 2, which C++ code and child processes write to) through a pipe
    that drops `NOISE` lines; `close` restores it once what was written is passed on."""

    SENTINEL = b"\0dogbreeds-noise-filter-end\n"

    def __init__(self):
        sys.stderr.flush()
        self.original = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.drained = threading.Event()
        self.thread = threading.Thread(target=self._pump, args=(read,), daemon=True, name="stderr-filter")
        self.thread.start()

    def _pump(self, read: int) -> None:
        pending = b""
        while chunk := os.read(read, 65536):
            # Whole lines, and progress bars' "\r" updates as they come; a partial line waits.
            *lines, pending = re.split(rb"(?<=[\r\n])", pending + chunk)
            for line in lines:
                if line == self.SENTINEL:
                    self.drained.set()
                elif not NOISE.search(line.decode(errors="replace")):
                    self._write(line)
        self._write(pending)
        self.drained.set()

    def _write(self, data: bytes) -> None:
        try:
            os.write(self.original, data)
        except OSError:  # the reader went away (`| head`): keep draining, or writers would block
            pass

    def close(self) -> None:
        sys.stderr.flush()
        os.write(2, self.SENTINEL)
        self.drained.wait(timeout=5)
        os.dup2(self.original, 2)  # Ray processes still holding the pipe stay filtered


class _StderrHandler(logging.StreamHandler):
    """To whatever sys.stderr is when a message is written (a test may have replaced it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _configure_logging(verbose: bool) -> None:
    """Our messages to stderr: INFO, or DEBUG with --verbose; absl's warnings only if verbose."""
    logger = logging.getLogger("dogbreeds")
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("absl").setLevel(logging.DEBUG if verbose else logging.ERROR)


def _stop_ray() -> None:
    """Shut down the Ray this process started (its raylet and workers), if any."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - already stopping; the interruption is the message
            pass


def _name(args) -> str:
    return " ".join(["dogbreeds", args.command] + [getattr(args, key) for key in ("search", "bench") if getattr(args, key, None)])


def main(argv: list[str] | None = None) -> int:
    """Run `dogbreeds ARGV`; returns the exit status (0, 1 for an error, 2 for bad options, 130
    for Ctrl-C). Called without `argv` (the installed command, `python -m dogbreeds`), it also
    filters TensorFlow's start-up noise from stderr unless --verbose."""
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    # Ctrl-C reaches us (below) instead of Tune's handler, which would end the trials and let
    # the search go on to retrain the best of them; `--resume` continues from Tune's state.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    _configure_logging(verbose)
    noise_filter = _NoiseFilter() if argv is None and not verbose else None
    try:
        _read_config_file(args)
        COMMANDS[args.command](args)
        status, message = 0, None
    except (KeyboardInterrupt, SystemExit):  # Ray Train's own Ctrl-C handler ends in sys.exit
        _stop_ray()
        status = 130
        message = "interrupted" + ("; `--resume` continues it" if args.command in RESUMABLE else "")
    except Exception as error:  # noqa: BLE001 - every error is one line (--verbose: a traceback)
        if verbose:
            log.exception("the error's traceback:")
        text = " ".join(str(error).split()) or type(error).__name__
        status, message = 1, f"error: {text}"
    finally:
        if noise_filter is not None:
            noise_filter.close()
    if message:
        print(f"{_name(args)}: {message}", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
