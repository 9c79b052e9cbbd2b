"""The kinds of search, and the search-space files checked for the one that runs them.

A kind of search is registered once, in `SEARCHES` (its function, its default search-space
file, and where its model comes from), by `@register_search` in its own module; the CLI builds
its `search` subcommands from it. This module imports none of them: the package's face does.

Search spaces are YAML files in Keras Tuner's vocabulary (`search_spaces/*.yaml`, checked by
`spaces.read_space`): the file's `search:` must be the kind being run, its `metric:` chooses
the best trial, and its hyperparameters must all be known to the model or to TrainConfig;
`check_space` checks all of it without TensorFlow or Ray, before anything is created.

Which model a search trains has one owner per kind:
- cnn3v2: the space file's `model:` names it (TrainConfig.model is replaced by it);
- head: the file names no model; the backbone is TrainConfig.model (the CLI's `--backbone`),
  which must be a transfer model;
- fine_tune: the head search's (its backbone, weights, image size and best head).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from dogbreeds import models, spaces
from dogbreeds.config import TrainConfig


# ---------------------------------------------------------------------------------------------
# The registry of searches.


@dataclasses.dataclass(frozen=True)
class SearchKind:
    """A kind of search: what the CLI's `search <name>` runs, and what its space file holds."""

    name: str
    run: Callable[..., dict]  # (data_config, train_config, search_config, output, ...) -> best
    default_space: str  # a packaged search space (search_spaces/<name>.yaml)
    description: str
    # Where the model comes from: "space" (the file's `model:`), "backbone" (TrainConfig.model,
    # a transfer model: `--backbone`) or "head_search" (a finished head search's best head).
    model_from: str


SEARCHES: dict[str, SearchKind] = {}


def register_search(name: str, *, default_space: str, description: str, model_from: str):
    """Register a search function under `name` (the space files' `search:` value)."""

    def decorator(run):
        SEARCHES[name] = SearchKind(name, run, default_space, description, model_from)
        return run

    return decorator


# ---------------------------------------------------------------------------------------------
# Search spaces, checked for the search that runs them.


def check_space(space: str | os.PathLike, kind: str | None = None, model: str | None = None) -> spaces.SearchSpace:
    """Read a search-space file and check it for the search `kind` (None: the file's own),
    without TensorFlow or Ray: `search:` is that registered kind, the model is the file's
    `model:` (a cnn3v2 search) or `model`, a transfer model (a head search; None checks the
    names against every transfer model's), and every hyperparameter is the model's or
    TrainConfig's. Errors are one line naming the file and the key."""
    checked = spaces.read_space(space)
    if checked.search is None:
        raise checked.error("search", f"missing; known: {', '.join(SEARCHES)}")
    if checked.search not in SEARCHES:
        raise checked.error("search", f"unknown search {checked.search!r}; known: {', '.join(SEARCHES)}")
    kind = kind or checked.search
    if kind not in SEARCHES:
        raise ValueError(f"unknown search {kind!r}; known: {', '.join(SEARCHES)}")
    if checked.search != kind:
        raise checked.error(
            "search",
            f"the file is for the {checked.search} search, not {kind} (its default space is "
            f"{SEARCHES[kind].default_space})",
        )
    if SEARCHES[kind].model_from == "space":
        if checked.model is None:
            raise checked.error("model", f"missing: a {kind} search trains the model the file names; known: {', '.join(models.list_models())}")
        if checked.model not in models.list_models():
            raise checked.error("model", f"unknown model {checked.model!r}; known: {', '.join(models.list_models())}")
        names = _hyperparameter_names([checked.model])
        owner = checked.model
    elif SEARCHES[kind].model_from == "head_search":
        if checked.model is not None:
            raise checked.error("model", f"a {kind} search trains the head search's model (--head-search): remove model:")
        names, owner = _hyperparameter_names([]), "training (TrainConfig)"
    else:
        if checked.model is not None:
            raise checked.error("model", f"a {kind} search trains a head on the backbone it is given (--backbone): remove model:")
        backbones = transfer_models()
        if model is not None and model not in backbones:
            raise ValueError(f"{model} is not a transfer model (it has no backbone); known: {', '.join(backbones)}")
        names = _hyperparameter_names([model] if model else backbones)
        owner = model or "the transfer models"
    spaces.check_names(checked, names, owner)
    return checked


def transfer_models() -> list[str]:
    """The registered models on a frozen backbone: what a head search may use."""
    return [name for name in models.list_models() if models.get_model_spec(name).backbone]


# TrainConfig fields a search space may not set: what a trial trains is decided above.
_NOT_SEARCHABLE = ("model", "hparams", "head_weights")


def _hyperparameter_names(model_names: list[str]) -> set[str]:
    """What a search space may set: the models' hyperparameters, or TrainConfig's fields."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} - set(_NOT_SEARCHABLE)
    for name in model_names:
        names |= set(models.get_model_spec(name).hparams)
    return names


def split_values(model: str, values: dict) -> tuple[dict, dict]:
    """Split a trial's values into (model hyperparameters, TrainConfig fields)."""
    model_keys = set(models.get_model_spec(model).hparams)
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - model_keys - train_keys)
    if unknown:
        raise ValueError(f"search space has keys for neither {model} nor training: {unknown}")
    return (
        {k: v for k, v in values.items() if k in model_keys},
        {k: v for k, v in values.items() if k in train_keys},
    )
