"""Search-space files: their schema, read without TensorFlow, and their way to Ray Tune.

A file in `search_spaces/` (shipped in the wheel as `dogbreeds.search_spaces`) says which search
it is for, what the search maximises or minimises, and its hyperparameters in Keras Tuner's
vocabulary:

    search: cnn3v2             # a kind registered in dogbreeds.search's SEARCHES
    model: cnn3v2              # the model its trials train (a cnn3v2 search only)
    metric: val_accuracy       # one of METRICS; chooses the best trial and drives ASHA
    hyperparameters:
      filters_1: {type: Choice, values: [16, 32, 64], default: 16}
      dropout_rate: {type: Float, min_value: 0.1, max_value: 0.5, conditions: {dropout_1: [true]}}

`read_space` checks all of it with PyYAML alone (keras_tuner imports TensorFlow, seconds), so
the CLI can refuse a bad file before Ray starts; every error is one line naming the file and
the key. `suggest` samples a trial's values from a checked space with Optuna, define-by-run
(study.py hands it to Ray Tune's OptunaSearch).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import pathlib
from typing import Any

# The keys a search-space file may have at its top; `hyperparameters` is required.
TOP_LEVEL_KEYS = ("search", "model", "metric", "hyperparameters")
# Without `metric:`, the study's choice: the best validation accuracy.
DEFAULT_METRIC = "val_accuracy"
# What a trial reports each epoch that a search may select on, and in which direction: the
# validation side of train.py's `build_metrics` (never the training side, which overfits).
METRICS = {
    "val_accuracy": "max",
    "val_loss": "min",
    "val_top5": "max",
    "val_precision": "max",
    "val_recall": "max",
}
# Keras Tuner's hyperparameter types and the options each takes (its methods' signatures,
# without `name` and the `parent_*` pair, which `conditions:` spells); the first group is
# required. tests/test_search.py checks this table against keras_tuner itself.
TYPES = {
    "Int": (("min_value", "max_value"), ("step", "sampling", "default")),
    "Float": (("min_value", "max_value"), ("step", "sampling", "default")),
    "Choice": (("values",), ("ordered", "default")),
    "Boolean": ((), ("default",)),
    "Fixed": (("value",), ()),
}
# Keys of a hyperparameter besides its type's options.
COMMON_KEYS = ("type", "conditions")
# Keras Tuner's samplings of an Int or a Float.
SAMPLINGS = ("linear", "log", "reverse_log")


class SpaceError(ValueError):
    """A search-space file that cannot be used: one line, naming the file and the key."""


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """A checked search-space file."""

    path: pathlib.Path
    label: str  # how errors name the file: its name, or the path the user gave
    search: str | None  # the kind of search the file is for
    model: str | None  # the model its trials train (a cnn3v2 search), or None
    metric: str  # a key of METRICS
    hyperparameters: dict[str, dict]  # name -> options, in the file's order

    @property
    def mode(self) -> str:
        """"max" or "min": the direction of `metric`."""
        return METRICS[self.metric]

    def error(self, key: str, message: str) -> SpaceError:
        """A SpaceError about `key` of this file."""
        return SpaceError(f"{self.label}: {key}: {message}")

    def as_dict(self) -> dict:
        """The file's content, as saved beside a search."""
        return {"search": self.search, "model": self.model, "metric": self.metric,
                "hyperparameters": self.hyperparameters, "path": str(self.path)}


# The source tree's folder of search spaces, for a checkout used without installing it.
SOURCE_SPACES_DIR = pathlib.Path(__file__).resolve().parents[1] / "search_spaces"


def spaces_dir():
    """The packaged search spaces: `search_spaces/` of the source tree, which pyproject.toml
    maps into the wheel as the package `dogbreeds.search_spaces` (an importlib.resources
    Traversable); a checkout on PYTHONPATH reads the folder itself."""
    try:
        return importlib.resources.files("dogbreeds.search_spaces")
    except ModuleNotFoundError:
        return SOURCE_SPACES_DIR


def known_spaces() -> list[str]:
    """The names of the packaged search spaces."""
    return sorted(entry.name[:-5] for entry in spaces_dir().iterdir() if entry.name.endswith(".yaml"))


def resolve_space_path(space: str | os.PathLike) -> tuple[pathlib.Path, str]:
    """(the file, how errors name it) of a search space given as a path or a packaged name."""
    path = pathlib.Path(space)
    if path.is_file():
        return path, str(space)
    if not path.suffix and len(path.parts) == 1:
        packaged = spaces_dir() / f"{path}.yaml"
        if packaged.is_file():
            return pathlib.Path(str(packaged)), packaged.name
    raise SpaceError(f"search space not found: {space}; known: {known_spaces()}")


def read_space(space: str | os.PathLike) -> SearchSpace:
    """Read and check a search-space file (a path, or a packaged name such as "cnn3v2")
    without TensorFlow; a bad file is a SpaceError naming the file and the key."""
    import yaml

    path, label = resolve_space_path(space)
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error).replace("\n", " ")
        raise SpaceError(f"{label}: {where}not valid YAML: {problem}") from None
    if not isinstance(spec, dict):
        raise SpaceError(f"{label}: expected a mapping with keys {list(TOP_LEVEL_KEYS)}, found {type(spec).__name__}")
    unknown = [key for key in spec if key not in TOP_LEVEL_KEYS]
    if unknown:
        raise SpaceError(f"{label}: {unknown[0]}: unknown key; known: {', '.join(TOP_LEVEL_KEYS)}")
    if "hyperparameters" not in spec:
        raise SpaceError(f"{label}: hyperparameters: missing (a mapping of name -> {{type: ..., ...}})")
    for key in ("search", "model"):
        if key in spec and not isinstance(spec[key], str):
            raise SpaceError(f"{label}: {key}: expected a name, found {spec[key]!r}")
    metric = spec.get("metric", DEFAULT_METRIC)
    if metric not in METRICS:
        raise SpaceError(f"{label}: metric: unknown metric {metric!r}; known: {', '.join(METRICS)}")
    hyperparameters = spec["hyperparameters"]
    if not isinstance(hyperparameters, dict) or not hyperparameters:
        raise SpaceError(f"{label}: hyperparameters: expected a mapping of name -> {{type: ..., ...}}")
    checked = {}
    for name, options in hyperparameters.items():
        checked[str(name)] = _check_hyperparameter(label, str(name), options, checked)
    return SearchSpace(path, label, spec.get("search"), spec.get("model"), metric, checked)


def _check_hyperparameter(label: str, name: str, options: Any, earlier: dict) -> dict:
    """One hyperparameter's options, checked against Keras Tuner's vocabulary."""
    key = f"hyperparameters.{name}"
    if not isinstance(options, dict):
        raise SpaceError(f"{label}: {key}: expected a mapping such as {{type: Float, ...}}, found {options!r}")
    if "type" not in options:
        raise SpaceError(f"{label}: {key}: missing type; known: {', '.join(TYPES)}")
    kind = options["type"]
    if kind not in TYPES:
        raise SpaceError(f"{label}: {key}: unknown type {kind!r}; known: {', '.join(TYPES)}")
    required, optional = TYPES[kind]
    known = (*COMMON_KEYS, *required, *optional)
    for option in options:
        if option not in known:
            raise SpaceError(f"{label}: {key}: unknown key {option!r} for {kind}; known: {', '.join(known)}")
    for option in required:
        if option not in options:
            raise SpaceError(f"{label}: {key}: {kind} needs {option}")
    if kind in ("Int", "Float"):
        low, high = options["min_value"], options["max_value"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
            raise SpaceError(f"{label}: {key}: expected numbers min_value <= max_value, found {low!r}, {high!r}")
        sampling = options.get("sampling", "linear")
        if sampling not in SAMPLINGS:
            raise SpaceError(f"{label}: {key}: unknown sampling {sampling!r}; known: {', '.join(SAMPLINGS)}")
        if sampling != "linear" and low <= 0:
            raise SpaceError(f"{label}: {key}: {sampling} sampling needs min_value > 0")
    if kind == "Choice" and (not isinstance(options["values"], list) or not options["values"]):
        raise SpaceError(f"{label}: {key}: values: expected a non-empty list")
    if kind == "Choice" and "default" in options and options["default"] not in options["values"]:
        raise SpaceError(f"{label}: {key}: default {options['default']!r} is not one of values")
    conditions = options.get("conditions")
    if conditions is not None:
        if not isinstance(conditions, dict) or len(conditions) != 1:
            raise SpaceError(f"{label}: {key}: conditions: expected one parent, as {{parent: [values]}}")
        (parent, _), = conditions.items()
        if parent not in earlier:
            raise SpaceError(
                f"{label}: {key}: conditions: unknown parent {parent!r}; known (defined above): "
                f"{', '.join(earlier) or 'none'}"
            )
    return dict(options)


def check_names(space: SearchSpace, allowed: set[str], owner: str) -> None:
    """Every hyperparameter is one `owner` takes (its model's hyperparameters or TrainConfig's
    fields, for instance): the check that a trial would otherwise fail, after Ray started."""
    for name in space.hyperparameters:
        if name not in allowed:
            raise space.error(
                f"hyperparameters.{name}",
                f"neither {owner} nor training knows it; known: {', '.join(sorted(allowed))}",
            )


def suggest(space: SearchSpace, trial) -> dict:
    """Sample a trial's values define-by-run from an Optuna trial (or Ray Tune's captor of
    one), in the file's order: a hyperparameter whose `conditions:` do not hold (its parent
    inactive, or set to another value) is never sampled, so a sampler learns only from values
    trials used. Keras Tuner's meanings: an Int or Float `step` is its grid (dropped with log
    sampling, which Optuna cannot combine with a step), `reverse_log` samples as `log`, a
    Boolean is a choice of True and False, and a Fixed value is returned without sampling."""
    values = {}
    for name, options in space.hyperparameters.items():
        conditions = options.get("conditions")
        if conditions:
            (parent, allowed), = conditions.items()
            if parent not in values or values[parent] not in allowed:
                continue
        kind = options["type"]
        log = options.get("sampling", "linear") != "linear"
        step = None if log else options.get("step")
        if kind == "Int":
            values[name] = trial.suggest_int(name, options["min_value"], options["max_value"], step=step or 1, log=log)
        elif kind == "Float":
            values[name] = trial.suggest_float(name, options["min_value"], options["max_value"], step=step, log=log)
        elif kind == "Choice":
            values[name] = trial.suggest_categorical(name, options["values"])
        elif kind == "Boolean":
            values[name] = trial.suggest_categorical(name, [True, False])
        else:  # Fixed
            values[name] = options["value"]
    return values
