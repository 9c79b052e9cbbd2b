"""The `dogbreeds` command's options: the parser, one function per command.

Every option that sets a configuration field is derived from its class: DataConfig,
TrainConfig, SearchConfig and ServeArgs (config.py). config.py owns what a field accepts
(`settable_fields`) and reads `--config` files; this module wires them into commands. A field
becomes `--field-name` of the field's type (a bool is `--x/--no-x`, an Optional accepts
`none`), its help is the comment above the field and its default the field's own, so each
default and its reason are written once. A few options keep the name users know as an alias
(`--batch-size`, `--views`, `--replicas`, ...). `--config FILE.yaml` sets any field (sections
`data:`, `train:`, `search:`, `serve:`); options given on the command line override it, and
`settings` reads a section's values back for a command (commands.py).

This is a small derivation of ours rather than jsonargparse or tyro: they would add a dependency,
their own help format and their own config-file rules, while our classes already carry a
one-line reason above each field, which is all the help needs.
"""

from __future__ import annotations

import argparse

import dogbreeds
from dogbreeds import config


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


def read_config_file(args) -> None:
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
    parser = _Parser(prog="dogbreeds", description="The `dogbreeds` command: one subcommand per stage.")
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
                                             "cache_max_gb", "validation_fraction", "test_fraction"),
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
    """`search KIND` for each kind in the search registry (`dogbreeds.search.SEARCHES`)."""
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
    add_config_options(parser, "serve", only=("allowed_hosts",))


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
    add_config_options(parser, "data", only=("data_dir", "tfds_dir", "image_size", "seed", "cache_dir", "cache_max_gb"),
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
