"""What a command prints: its stages, progress and results by default; Ray's, Tune's and
TensorFlow's own logs as well with `--verbose`.

`--verbose` is an environment variable, so that every process of the run sees it: a local Ray's
workers inherit the driver's environment, and `cli.main_on_cluster` passes it to a cluster's.
"""

from __future__ import annotations

import os

VERBOSE_VARIABLE = "DOGBREEDS_VERBOSE"


def set_verbose(on: bool) -> None:
    if on:
        os.environ[VERBOSE_VARIABLE] = "1"
    else:
        os.environ.pop(VERBOSE_VARIABLE, None)


def verbose() -> bool:
    """Whether this run shows Ray's, Tune's and TensorFlow's own logs (`--verbose`)."""
    return os.environ.get(VERBOSE_VARIABLE) == "1"


def log_level() -> str:
    """The level of Ray's own loggers: their INFO lines (Ray Data's execution plans, the local
    Ray's start) only with `--verbose`; their warnings and errors always."""
    return "INFO" if verbose() else "WARNING"


def init_ray(**options) -> None:
    """`ray.init` (a new local Ray, unless `options` or RAY_ADDRESS say otherwise): the output
    of its workers (Ray Train's controller and workers, Keras, Tune's trials) reaches the
    console only with --verbose, and Ray's own loggers are at `log_level()`. Without it, the
    driver tells of each trial (`search.tuning.progress_lines`) and epoch (`train.EpochLines`)."""
    import ray

    ray.init(log_to_driver=verbose(), logging_config=ray.LoggingConfig(log_level=log_level()), **options)
