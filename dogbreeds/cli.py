"""The `dogbreeds` command: one subcommand per stage.

    dogbreeds models
    dogbreeds data --data-dir ../shared/data/tiny_dogs_64
    dogbreeds train cnn3v2 --data-dir ../shared/data/tiny_dogs_64 --image-size 64 --epochs 8 \
        --workers 2 --output runs/cnn3v2
    dogbreeds report runs/cnn3v2
    dogbreeds bench pipeline --data-dir ../shared/data/stanford_dogs_sample --output runs
    dogbreeds serve bundles/best --examples ../shared/data/stanford_dogs_sample

Every option that sets a configuration field is derived from its class: DataConfig,
TrainConfig, ServeArgs (config.py) and SearchConfig (search.py). config.py owns what a field
accepts (`settable_fields`) and reads `--config` files; this module wires them into commands.
A field becomes `--field-name` of the field's type (a bool is `--x/--no-x`, an Optional accepts
`none`), its help is the comment above the field and its default the field's own, so each
default and its reason are written once. A few options keep the name users know as an alias
(`--batch-size`, `--views`, `--replicas`, ...). `--config FILE.yaml` sets any field (sections
`data:`, `train:`, `search:`, `serve:`); options given on the command line override it.

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
import json
import logging
import os
import re
import sys
import threading

import dogbreeds
from dogbreeds import config, runs
from dogbreeds.config import DataConfig, TrainConfig

log = logging.getLogger("dogbreeds")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ---------------------------------------------------------------------------------------------
# Options derived from the configuration classes (config.settable_fields).


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

# How `--help` names a value of each type.
METAVARS = {int: "N", float: "X", str: "TEXT"}


class _TupleAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, tuple(values))


def _argument_type(setting: config.Setting):
    def convert(text):
        try:
            return setting.convert(text)
        except ValueError as error:
            if str(error).startswith("invalid literal") or "could not convert" in str(error):
                raise  # argparse says: invalid int value: 'many'
            raise argparse.ArgumentTypeError(f"{error}") from None

    convert.__name__ = setting.kind.__name__
    return convert


def _add_option(group, setting: config.Setting, default) -> None:
    """`--field-name` (and its aliases) for one setting; absent from the namespace unless given
    (argparse.SUPPRESS), so a config file's value is overridden only by what the command line says."""
    flags = [f"--{setting.name.replace('_', '-')}", *ALIASES.get(setting.dest, [])]
    about = setting.help.replace("%", "%%") + f" (default: {'none' if default is None else default})"
    if setting.kind is bool:
        group.add_argument(*flags, dest=setting.dest, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=about)
    elif setting.kind is tuple:
        group.add_argument(*flags, dest=setting.dest, action=_TupleAction, nargs="+", default=argparse.SUPPRESS,
                           help=about, metavar=METAVARS[str])
    else:
        choices = config.CHOICES.get(setting.dest)
        metavar = "{" + ",".join(choices) + "}" if choices else METAVARS[setting.kind]
        group.add_argument(*flags, dest=setting.dest, type=_argument_type(setting), default=argparse.SUPPRESS,
                           help=about, metavar=metavar)


def add_config_options(parser, section: str, skip=(), only=None, defaults=None) -> None:
    """Add an option for each field of `section`'s class (but `skip`; only `only` if given).
    `defaults` are this command's own, over the class's."""
    defaults = defaults or {}
    group = parser.add_argument_group(f"{section} ({config.section_class(section).__name__})")
    for name, setting in config.settable_fields(section).items():
        if name in skip or (only is not None and name not in only):
            continue
        parser._dogbreeds_fields.setdefault(section, {})[name] = setting
        option = parser._option_string_actions.get(f"--{name.replace('_', '-')}")
        if option is not None:  # `--seed`: one option sets both fields
            parser._dogbreeds_shared.setdefault(section, {})[name] = option.dest
            continue
        _add_option(group, setting, defaults.get(name, setting.default))
    if defaults:
        parser._dogbreeds_defaults.setdefault(section, {}).update(defaults)


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
    given = vars(args)
    values.update({dest.removeprefix(f"{section}."): value for dest, value in given.items()
                   if dest.startswith(f"{section}.")})
    values.update({name: given[dest] for name, dest in args._shared.get(section, {}).items() if dest in given})
    return values


def _read_config_file(args) -> None:
    """`--config FILE.yaml` into `args._file`, each value checked as its option's would be."""
    args._file = {}
    if getattr(args, "config", None):
        known = dict(args._fields)
        if args.command == "train":
            known["train"] = {**known["train"], "hparams": None}  # a Mapping: set in the file only
        args._file = config.read_settings_file(args.config, known)


# ---------------------------------------------------------------------------------------------
# The parser: one function per command.


# Positional arguments several commands share.
RUN_DIR_HELP = "a run directory (from train, search or pipeline)"
BUNDLE_HELP = "a bundle directory (from `dogbreeds export`)"


def build_parser() -> argparse.ArgumentParser:
    """The `dogbreeds` parser: imports no TensorFlow or Ray, so `--help` and `models` are fast."""
    parser = _Parser(prog="dogbreeds", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"dogbreeds {dogbreeds.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add_command in (_add_models, _add_data, _add_train, _add_export, _add_search, _add_pipeline,
                        _add_report, _add_dashboard, _add_serve, _add_bench):
        add_command(commands)
    return parser


def _add_models(commands) -> None:
    _command(commands, "models", "list the model registry")


def _add_data(commands) -> None:
    parser = _command(commands, "data", "summarise a dataset: breeds, images, skipped files")
    add_config_options(parser, "data", only=("data_dir", "tfds_dir", "image_size", "seed", "cache_dir",
                                             "validation_fraction", "test_fraction"),
                       defaults={"image_size": 64})  # decoding at 64 px finds unreadable files fast
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_train(commands) -> None:
    parser = _command(commands, "train", "train a model on Ray Train and evaluate it", config_file=True)
    parser.add_argument("model", help="a registered model (see `dogbreeds models`)")
    add_config_options(parser, "data")
    add_config_options(parser, "train", skip=("model",))
    _add_output_and_resume(parser, "run")


def _add_export(commands) -> None:
    parser = _command(commands, "export", "turn a run into a servable bundle")
    parser.add_argument("run_dir", help=RUN_DIR_HELP)
    parser.add_argument("--output", required=True, help="the bundle directory")
    parser.add_argument("--name", help="the served model's name (default: the model's)")


def _add_search(commands) -> None:
    """`search KIND` for each kind in search.py's registry."""
    from dogbreeds import search  # light at its top: no TensorFlow or Ray

    search_parser = commands.add_parser("search", help="a hyperparameter search on Ray Tune")
    searches = search_parser.add_subparsers(dest="search", required=True, parser_class=_Parser)
    for name, kind in search.SEARCHES.items():
        parser = _command(searches, name, kind.description, config_file=True)
        parser.add_argument("--space", default=kind.default_space, help=f"a search-space file (default: "
                            f"{kind.default_space}, search_spaces/{kind.default_space}.yaml)")
        if kind.model_from == "space":
            add_config_options(parser, "data")
            add_config_options(parser, "train", skip=("model",))
            add_config_options(parser, "search", skip=("space",))
        elif kind.model_from == "head_search":  # the head search's model, its size and its head
            parser.add_argument("--head-search", required=True, help="a finished head search (`search head`'s "
                                "--output, or a pipeline's OUTPUT/head) whose best head is fine-tuned")
            add_config_options(parser, "data", skip=("image_size", "augmented_views"))
            add_config_options(parser, "train", skip=("model", "weights", "head_weights", "fine_tune_fraction"))
            add_config_options(parser, "search", skip=("space", "retrain_best"))
        else:  # the backbone is the model; its features are computed once
            parser.add_argument("--backbone", dest="train.model", required=True, help="a transfer model (see "
                                "`dogbreeds models`), whose frozen features the heads train on")
            add_config_options(parser, "data", defaults={"augmented_views": 2})
            add_config_options(parser, "train", skip=("model", "workers", "max_failures"))
            add_config_options(parser, "search", skip=("space", "retrain_best"))
            _add_feature_options(parser)
            parser.add_argument("--features-dir", help="where features are cached (default: OUTPUT/features)")
        _add_output_and_resume(parser, "search")


def _add_pipeline(commands) -> None:
    from dogbreeds import pipeline

    parser = _command(
        commands, "pipeline", "the study end to end: the searches, fine-tuning, final models, bundle, report",
        config_file=True
    )
    parser.add_argument("--profile", choices=list(pipeline.PROFILES), default="quick",
                        help="quick: a laptop CPU in minutes; cpu: all 120 breeds on a CPU in an hour; "
                        "full: the study's settings. "
                        "An option given here overrides the profile's value in every search")
    parser.add_argument("--set", dest="stage_settings", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                        help="one search's setting, over the profile's and the options: STAGE cnn3v2, head or fine_tune, "
                        "FIELD any option's name, VALUE read as YAML (head.trials=6, cnn3v2.epochs=5); repeatable")
    parser.add_argument("--backbone", help="the head search's transfer model (default: the profile's, "
                        "mobilenet_025 in quick, xception in full; see `dogbreeds models`)")
    parser.add_argument("--ladder", action=argparse.BooleanOptionalAction, default=None,
                        help="also train the study's ladder (cnn1, cnn3, cnn3v2 from scratch) for the comparison "
                        "table (default: on in full, off in quick)")
    parser.add_argument("--compare-backbones", metavar="NAME,...", type=lambda text: tuple(filter(None, text.split(","))),
                        help="a frozen head searched on each of these transfer models too, for the comparison table "
                        "(default: resnet50v2 in full, none in quick; '' for none)")
    add_config_options(parser, "data")
    # Fine-tuning's own settings are searched (search_spaces/fine_tune.yaml), its head is the head search's.
    add_config_options(parser, "train", skip=("model", "fine_tune_fraction", "head_weights"))
    add_config_options(parser, "search", skip=("space", "retrain_best"))  # it compares final models
    _add_feature_options(parser)
    _add_output_and_resume(parser, "run")


def _add_report(commands) -> None:
    parser = _command(commands, "report", "render a run directory to report.html")
    parser.add_argument("run_dir", help=RUN_DIR_HELP)
    parser.add_argument("--output", help="the directory of report.html (default: RUN_DIR)")
    parser.add_argument("--no-predictions", action="store_true", help="skip loading the model for sample predictions")


def _add_dashboard(commands) -> None:
    parser = _command(commands, "dashboard", "optuna-dashboard over the searches under a run directory, live")
    parser.add_argument("run_dir", help="a search or pipeline directory (its searches' study.journal files)")
    parser.add_argument("--host", default="127.0.0.1", help="listen here (default: 127.0.0.1; 0.0.0.0: everywhere)")
    parser.add_argument("--port", type=int, default=8080, help="HTTP port (default: 8080)")


def _add_serve(commands) -> None:
    parser = _command(commands, "serve", "serve a bundle on Ray Serve: JSON API and Gradio UI", config_file=True)
    parser.add_argument("bundle", help=BUNDLE_HELP)
    parser.add_argument("--host", default="127.0.0.1", help="listen here (default: 127.0.0.1; 0.0.0.0: everywhere)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    parser.add_argument("--address", help="a running Ray cluster (default: start a local Ray)")
    _add_haproxy_option(parser)
    add_config_options(parser, "serve")
    parser.add_argument("--max-upload-mb", dest="serve.max_upload_bytes", type=_megabytes,
                        default=argparse.SUPPRESS, help="--max-upload-bytes in MB (default: 10)")


def _add_bench(commands) -> None:
    """`bench NAME` for each benchmark, each writing OUTPUT/bench_NAME.json."""
    bench_parser = commands.add_parser("bench", help="benchmarks that print JSON and write OUTPUT/bench_NAME.json")
    benches = bench_parser.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    for add_bench in (_add_bench_pipeline, _add_bench_heads, _add_bench_serve, _add_bench_attack, _add_bench_novelty):
        add_bench(benches).add_argument("--output", default=".", help="the directory of bench_NAME.json (default: .)")


def _add_bench_pipeline(benches) -> _Parser:
    parser = _command(benches, "pipeline", "input pipeline images/s against a bare decode-and-resize loop")
    add_config_options(parser, "data", only=("data_dir", "tfds_dir", "image_size", "seed", "cache_dir"),
                       defaults={"image_size": 224})  # the transfer models' size
    return parser


def _add_bench_heads(benches) -> _Parser:
    parser = _command(benches, "heads", "head trials on cached features against end to end, in one run")
    parser.add_argument("--backbone", default="mobilenet_025", help="a transfer model (default: mobilenet_025)")
    add_config_options(parser, "data", defaults={"image_size": 128, "augmented_views": 2})  # a CPU's minutes
    add_config_options(parser, "train", only=("weights", "epochs"), defaults={"epochs": 5})
    add_config_options(parser, "search", only=("trials",))
    return parser


def _add_bench_serve(benches) -> _Parser:
    parser = _command(benches, "serve",
                      "Serve requests/s and latency, batched and unbatched, against bare model.predict")
    parser.add_argument("bundle", help=BUNDLE_HELP)
    parser.add_argument("--data-dir", required=True, help="a folder of photos to send (searched recursively)")
    add_config_options(parser, "serve",
                       only=("num_replicas", "max_batch_size", "batch_wait_ms", "num_cpus_per_replica"))
    _add_haproxy_option(parser)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="clients (default: 1 8 32)")
    parser.add_argument("--duration", type=float, default=10, help="seconds per measurement (default: 10)")
    parser.add_argument("--port", type=int, default=8000, help="Serve's HTTP port on 127.0.0.1")
    return parser


def _add_bench_attack(benches) -> _Parser:
    parser = _command(benches, "attack", "hostile inputs against dogbreeds serve: statuses, probe latency, peak memory")
    parser.add_argument("bundle", help=BUNDLE_HELP)
    parser.add_argument("--port", type=int, default=8000, help="serve the bundle on this port of 127.0.0.1")
    parser.add_argument("--url", help="attack this running server (on 127.x.x.x) instead of starting one")
    parser.add_argument("--photo", default="../shared/data/stanford_dogs_sample/Images/n02085620-Chihuahua/"
                        "imagenet_sample_n02085620_Chihuahua.JPEG", help="the real photo sent after every attack")
    parser.add_argument("--cases", nargs="+", help="only the cases whose names contain one of these")
    return parser


def _add_bench_novelty(benches) -> _Parser:
    parser = _command(benches, "novelty",
                      "the not-a-dog verdicts of a bundle on its own dogs and on folders of other photos")
    parser.add_argument("bundle", help=BUNDLE_HELP)
    parser.add_argument("--not-dogs", nargs="+", default=[], help="folders of photos without dogs")
    parser.add_argument("--whole-dogs", nargs="+", default=[],
                        help="folders of whole photos of the bundle's breeds (<synset>-<breed>/*.jpg): top-1 and verdicts")
    parser.add_argument("--other", nargs="+", default=[], help="other folders, measured the same way")
    return parser


def _add_output_and_resume(parser, what: str) -> None:
    parser.add_argument("--output", required=True, help=f"the {what} directory")
    parser.add_argument("--resume", action="store_true", help=f"continue the {what} in --output")


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

    dashboard.serve(args.run_dir, args.host, args.port)


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
        status, message = _run_command(args, verbose)
    finally:
        if noise_filter is not None:
            _stop_ray()  # Ray prints its deduplicated workers' lines ("[repeated 3x ...]") as it stops
            noise_filter.close()
    if message:
        print(f"{_name(args)}: {message}", file=sys.stderr, flush=True)
    return status


def _run_command(args, verbose: bool) -> tuple[int, str | None]:
    """Run the command: its exit status, and the one line to print about it (None: nothing)."""
    try:
        _read_config_file(args)
        COMMANDS[args.command](args)
        return 0, None
    except (KeyboardInterrupt, SystemExit):  # Ray Train's own Ctrl-C handler ends in sys.exit
        _stop_ray()
        return 130, "interrupted" + ("; `--resume` continues it" if args.command in RESUMABLE else "")
    except Exception as error:  # noqa: BLE001 - every error is one line (--verbose: a traceback)
        if verbose:
            log.exception("the error's traceback:")
        return 1, "error: " + (" ".join(str(error).split()) or type(error).__name__)


if __name__ == "__main__":
    sys.exit(main())
