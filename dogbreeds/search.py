"""The study's searches on Ray Tune, and the best trial's way to a final model.

- `search_cnn3v2`: each trial is a Ray Train run (`run_training`, the Train V2 pattern: Tune
  calls a driver function that launches a `TensorflowTrainer`), on a subset of the data as in
  the study; the best configuration is then retrained on all of it and tested once.
- `search_head`: the frozen backbone's features are computed once (`features.py`); every head
  trial trains on them, then the best head is joined to its backbone and tested end to end.
- `search_fine_tune`: a head search's best head on its backbone, the top of the backbone
  unfrozen; each trial a Ray Train run (how much unfrozen, the learning rate: the space's),
  the best by validation tested once.

A kind of search is registered once, in `SEARCHES` (its function, its default search-space
file, and where its model comes from); the CLI builds its `search` subcommands from it.

Search spaces are YAML files in Keras Tuner's vocabulary (`search_spaces/*.yaml`, checked by
`spaces.read_space`): the file's `search:` must be the kind being run, its `metric:` chooses
the best trial, and its hyperparameters must all be known to the model or to TrainConfig;
`check_space` checks all of it without TensorFlow or Ray, before anything is created.

Which model a search trains has one owner per kind:
- cnn3v2: the space file's `model:` names it (TrainConfig.model is replaced by it);
- head: the file names no model; the backbone is TrainConfig.model (the CLI's `--backbone`),
  which must be a transfer model;
- fine_tune: the head search's (its backbone, weights, image size and best head).

A search directory (names in `runs.py`) holds `search.json` (its resolved configuration),
`results.csv` (a row per trial), `best.json`, `trials/<id>/` (each trial's history and
TensorBoard logs), `tune/` (Ray Tune's state, for `--resume`: `search/`, then each extension's
`search-2/`, ...), `study.journal` (the search's Optuna study, study.py), `final/` (the best
configuration as a training run, tested once) and `report.html`.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
from typing import Callable

from dogbreeds import models, runs, spaces, study
from dogbreeds.config import DataConfig, SearchConfig, TrainConfig, to_dict


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


def _start_search(output: str, data_config: DataConfig, train_config: TrainConfig,
                  search: SearchConfig, space: spaces.SearchSpace, resume: bool) -> str:
    """Create the search directory and save the search's resolved configuration there
    (`runs.SEARCH_CONFIG`); a directory holding another search is an error unless `resume`."""
    from dogbreeds.train import versions

    output = os.path.abspath(output)
    if os.path.exists(os.path.join(output, runs.TUNE, runs.TUNE_NAME)) and not resume:
        raise ValueError(f"{output} holds a search already: pass --resume, or choose another --output")
    os.makedirs(output, exist_ok=True)
    runs.write_json(os.path.join(output, runs.SEARCH_CONFIG), {
        "data": to_dict(data_config), "train": to_dict(train_config), "search": to_dict(search),
        "space": space.as_dict(), "versions": versions(),
    })
    return output


# ---------------------------------------------------------------------------------------------
# The Tune side, common to every search.


def run_tuner(trainable, space: spaces.SearchSpace, search: SearchConfig, output: str, resume: bool,
              seed: int, callbacks: list | None = None) -> list:
    """Run the Ray Tune search of `output`, its trials sampled by and recorded in the search's
    Optuna study (study.py), selecting on the space's metric; returns every trial's Result.

    With `resume`, the search's Tune experiments are restored and finished first (no finished
    trial runs again); then, if `search.trials` is more than they hold, one more experiment
    (`tune/search-2`, ...) runs the missing trials on the same study, so its sampler knows
    every earlier trial. `callbacks` are Tune callbacks (a restored experiment keeps its own)."""
    import ray
    from ray import tune

    if not ray.is_initialized():
        ray.init()
    storage = os.path.join(os.path.abspath(output), runs.TUNE)
    names = _experiments(storage)
    if names and not resume:
        raise ValueError(f"{output} holds a search already: pass --resume, or choose another --output")
    results = []
    for name in names:
        restored = tune.Tuner.restore(os.path.join(storage, name), trainable=trainable,
                                      resume_unfinished=True, resume_errored=True)
        results += list(restored.fit())
    if search.trials > len(results):
        scheduler = None
        if search.scheduler == "asha":
            scheduler = study.asha(output, runs.TUNE_NAME)
        elif search.scheduler != "none":
            raise ValueError(f"unknown scheduler {search.scheduler!r}; known: asha, none")
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=space.metric,
                mode=space.mode,
                num_samples=search.trials - len(results),
                max_concurrent_trials=search.concurrent_trials,
                # Seeded past the earlier trials, so an extension draws new values.
                search_alg=study.searcher(space, search.algorithm, seed + len(results), output, runs.TUNE_NAME),
                scheduler=scheduler,
                # A stopped trial's actor must end: a cnn3v2 trial's driver is blocked in its
                # Ray Train run, which would otherwise train on and keep its CPUs (or GPUs).
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name=runs.TUNE_NAME if not names else f"{runs.TUNE_NAME}-{len(names) + 1}",
                storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=search.max_trial_failures),
                callbacks=callbacks,
            ),
        )
        results += list(tuner.fit())
    study.reconcile(output, runs.TUNE_NAME)
    return results


def _experiments(storage: str) -> list[str]:
    """The search's Tune experiments under `storage` that can be restored, in the order they
    ran: `search`, then each extension (`search-2`, ...)."""
    from ray import tune

    names, number = [], 1
    while True:
        name = runs.TUNE_NAME if number == 1 else f"{runs.TUNE_NAME}-{number}"
        if not os.path.isdir(os.path.join(storage, name)):
            return names
        if tune.Tuner.can_restore(os.path.join(storage, name)):
            names.append(name)
        number += 1


def write_results(results, names: list[str], output: str, search_name: str,
                  metric: str = spaces.DEFAULT_METRIC) -> dict:
    """`results.csv` (a row per trial, at each trial's best epoch by `metric`) and `best.json`
    (the best trial by `metric`) from Tune's Results; `names` are the space's hyperparameters (a
    trial's config holds the active ones). Returns the best."""
    better = max if spaces.METRICS[metric] == "max" else min
    rows = []
    for result in results:
        history = result.metrics_dataframe
        trial_id = (result.metrics or {}).get("trial_id") or os.path.basename(result.path)
        reported = history is not None and metric in history and history[metric].notna().any()
        best_epoch = history.loc[getattr(history[metric], f"idx{spaces.METRICS[metric]}")()] if reported else {}
        rows.append({
            "trial_id": trial_id,
            "status": "error" if result.error else "done",
            "seconds": round(float((result.metrics or {}).get("time_total_s", 0.0)), 2),
            **{name: _number(best_epoch, name) if reported else None
               for name in dict.fromkeys(("val_accuracy", "val_loss", metric))},
            "epochs": int(history["epoch"].max()) if history is not None and "epoch" in history else 0,
            **{f"hp_{name}": result.config.get(name) for name in names},
        })
    rows.sort(key=lambda row: row["trial_id"])
    with open(os.path.join(output, runs.RESULTS), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    finished = [row for row in rows if row[metric] is not None]
    if not finished:
        raise ValueError(f"no trial reported {metric}: see the errors in {runs.RESULTS}")
    best_row = better(finished, key=lambda row: row[metric])
    best = {
        "search": search_name,
        "trial_id": best_row["trial_id"],
        "metric": metric,
        metric: best_row[metric],
        "val_accuracy": best_row["val_accuracy"],
        "hparams": {k[3:]: v for k, v in best_row.items() if k.startswith("hp_") and v is not None},
        "seconds": best_row["seconds"],
        "epochs": best_row["epochs"],
        "trials": len(rows),
    }
    runs.write_json(os.path.join(output, runs.BEST), best)
    return best


def _finish(output: str, best: dict) -> dict:
    """best.json with the hyperparameters' importance (the study's), and the final model's
    error analysis attached to the best trial in the study (its optuna-dashboard note)."""
    best["importance"] = {"evaluator": study.IMPORTANCE_EVALUATOR,
                          "values": study.importance(output, runs.TUNE_NAME)}
    if "final" in best:
        study.note_final(output, runs.TUNE_NAME, best["trial_id"])
    runs.write_json(os.path.join(output, runs.BEST), best)
    return best


def _number(row, name: str) -> float | None:
    """A metric of a history row, or None when the trial did not report it."""
    value = row.get(name) if hasattr(row, "get") else None
    return None if value is None or value != value else float(value)  # NaN: not reported


# ---------------------------------------------------------------------------------------------
# Searches whose trials are Ray Train runs (cnn3v2, fine_tune): the trial, and freeing a stopped one.

# What such a trial's own process reserves: no CPU, since it only waits for its Ray Train
# workers, which hold the CPUs and GPUs (even a sliver of a CPU would leave a trial of 2
# one-CPU workers waiting forever on 2 CPUs). Tune refuses an empty request, hence a MiB.
TRAIN_TRIAL_RESOURCES = {"CPU": 0, "memory": 2**20}


def _training_trial(config, *, data_config, train_config, trials_dir):
    """One trial: a Ray Train run whose epochs are reported to Tune as they end."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from dogbreeds.train import run_training

    model_hparams, overrides = split_values(train_config.model, config)
    trial_config = dataclasses.replace(train_config, hparams={**train_config.hparams, **model_hparams}, **overrides)
    trial_dir = os.path.join(trials_dir, tune.get_context().get_trial_id())
    # resume=True: a retried or restored trial continues its Ray Train run from its checkpoint.
    run_training(data_config, trial_config, trial_dir, callbacks=[TuneReportCallback()],
                 resume=True, evaluate_test=False)


def _release_stopped_runs(trials_dir: str):
    """A Tune callback that frees the Ray Train placement group of a trial stopped mid-run.

    Tune ends a stopped trial's actor, and the Ray Train controller that actor owns dies with
    it before it can remove its workers' placement group; a group made by an actor (not by a
    driver) then lasts as long as the driver (ray-project/ray#54305). Ray Train's own cleaner
    asks the dashboard's State API whether the controller lives, which a Ray without a
    dashboard, or a machine running several Rays, does not answer. So the search removes the
    group of each finished trial once its workers are gone: its controller is dead by then
    and cannot restart them in a new group (removing a group with live workers could). The
    trial's run records its group with `runs.record_placement_group`.
    """
    import time

    import ray
    from ray import tune
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    def workers_gone(group_id: str) -> bool:  # nothing holds the group's `*_group_<id>` resources
        total, available = ray.cluster_resources(), ray.available_resources()
        suffix = f"_group_{group_id}"
        return all(available.get(key) == value for key, value in total.items() if key.endswith(suffix))

    class ReleaseStoppedRuns(tune.Callback):
        def __init__(self):
            self.groups = set()  # placement groups of finished trials, not yet removed

        def on_trial_complete(self, iteration, trials, trial, **info):
            group_id = runs.recorded_placement_group(os.path.join(trials_dir, trial.trial_id))
            if group_id:
                self.groups.add(group_id)

        on_trial_error = on_trial_complete

        def release(self):
            for group_id in list(self.groups):
                group = PlacementGroup(ray.PlacementGroupID.from_hex(group_id))
                state = ray.util.placement_group_table(group).get("state", "REMOVED")
                if state == "CREATED" and workers_gone(group_id):
                    remove_placement_group(group)
                    state = "REMOVED"
                if state == "REMOVED":
                    self.groups.discard(group_id)

        def on_step_end(self, iteration, trials, **info):
            self.release()

        def on_experiment_end(self, trials, **info):
            deadline = time.time() + 60  # the last trial's workers may take a moment to go
            while self.groups and time.time() < deadline:
                self.release()
                time.sleep(0.5)

    return ReleaseStoppedRuns()


@register_search(
    "cnn3v2", default_space="cnn3v2", model_from="space",
    description="the study's cnn3v2 search: a Ray Train run per trial",
)
def search_cnn3v2(
    data_config: DataConfig, train_config: TrainConfig, search: SearchConfig, output: str,
    resume: bool = False,
) -> dict:
    """The study's search of the space file's model on Ray Tune, then the best configuration
    retrained on all the training data (no subset) and tested once. Returns best.json's
    contents."""
    from ray import tune

    from dogbreeds.train import absolute_paths, run_training

    space = check_space(search.space, "cnn3v2")  # before anything is created
    train_config = dataclasses.replace(train_config, model=space.model)
    data_config, train_config = absolute_paths(data_config, train_config)
    output = _start_search(output, data_config, train_config, search, space, resume)
    trials_dir = os.path.join(output, runs.TRIALS)
    trainable = tune.with_parameters(
        _training_trial, data_config=data_config, train_config=train_config,
        trials_dir=trials_dir,
    )
    trainable = tune.with_resources(trainable, TRAIN_TRIAL_RESOURCES)
    results = run_tuner(trainable, space, search, output, resume, data_config.seed,
                        callbacks=[_release_stopped_runs(trials_dir)])
    earlier = _earlier_best(output)
    best = write_results(results, list(space.hyperparameters), output, "cnn3v2", space.metric)
    if search.retrain_best and not _final_stands(output, earlier, best):
        model_hparams, overrides = split_values(train_config.model, best["hparams"])
        final_data = dataclasses.replace(data_config, subset_per_class=None, subset_fraction=None)
        final_train = dataclasses.replace(train_config, hparams=model_hparams, **overrides)
        final = run_training(final_data, final_train, os.path.join(output, runs.FINAL), resume=resume)
        best["final"] = {"validation": final["validation"]["top1"], "test": final["test"]["top1"]}
    return _finish(output, best)


def _earlier_best(output: str) -> dict:
    """best.json of a resumed search before it is rewritten ({} if none)."""
    path = os.path.join(output, runs.BEST)
    return runs.read_json(path) if os.path.exists(path) else {}


def _final_stands(output: str, earlier: dict, best: dict) -> bool:
    """Whether the final model of an extended search is still the best trial's: the best trial
    did not change and its final/ was finished (then `best` keeps its numbers). A final/ of
    another trial is removed, to be trained afresh."""
    if earlier.get("final") and earlier.get("trial_id") == best["trial_id"]:
        best["final"] = earlier["final"]
        return True
    if earlier.get("trial_id") not in (None, best["trial_id"]):
        shutil.rmtree(os.path.join(output, runs.FINAL), ignore_errors=True)
    return False


# ---------------------------------------------------------------------------------------------
# The transfer-head search: every trial trains a head on cached backbone features.


def fit_head(values: dict, train_config: TrainConfig, features: dict, num_classes: int,
             trial_dir: str, report=None, metric: str = spaces.DEFAULT_METRIC):
    """Train one head on cached features with the study's setup; returns (head, history).

    The trial keeps its best epoch's head by `metric` (the epoch results.csv reports, as Keras
    Tuner keeps each trial's best checkpoint), so the joined model is the one that was chosen.
    `report(row)` is called after each epoch (a Tune trial reports to Tune with it)."""
    import numpy as np
    import tf_keras as keras

    from dogbreeds.train import build_callbacks, compile_model

    head_hparams, overrides = split_values(train_config.model, values)
    train_config = dataclasses.replace(train_config, **overrides)
    train, validation = (np.load(features[split]) for split in ("train", "validation"))
    keras.utils.set_random_seed(train_config.seed)
    head = models.build_head(
        models.resolve_hparams(train_config.model, head_hparams), num_classes,
        train["features"].shape[1],
    )
    compile_model(head, train_config)
    history = []

    class Report(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            history.append({"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}})
            if report:
                report(history[-1])

    head.fit(
        train["features"], keras.utils.to_categorical(train["labels"], num_classes),
        batch_size=train_config.per_worker_batch_size,
        epochs=train_config.epochs,
        validation_data=(validation["features"], keras.utils.to_categorical(validation["labels"], num_classes)),
        callbacks=build_callbacks(train_config, os.path.join(trial_dir, runs.TENSORBOARD)) + [
            keras.callbacks.ModelCheckpoint(os.path.join(trial_dir, runs.HEAD_WEIGHTS), monitor=metric,
                                            mode=spaces.METRICS[metric], save_best_only=True, save_weights_only=True),
            Report(),
        ],
        verbose=0,
    )
    runs.write_json(os.path.join(trial_dir, runs.HISTORY), history)
    return head, history


def _head_trial(config, *, train_config, features, num_classes, trials_dir, metric):
    """One head trial, in the Tune trial's own process: the head is a few hundred thousand
    parameters on a feature matrix, where a Ray Train worker group would cost more than the
    training itself."""
    from ray import tune

    trial_dir = os.path.join(trials_dir, tune.get_context().get_trial_id())
    os.makedirs(trial_dir, exist_ok=True)
    fit_head(config, train_config, features, num_classes, trial_dir, tune.report, metric)


@register_search(
    "head", default_space="transfer_head", model_from="backbone",
    description="the transfer-head search on cached backbone features",
)
def search_head(
    data_config: DataConfig, train_config: TrainConfig, search: SearchConfig, output: str,
    features_dir: str | None = None, actors: int = 1, gpus_per_actor: float = 0,
    resume: bool = False,
) -> dict:
    """The transfer-head search on the backbone `train_config.model` (a transfer model):
    features once (`max(data_config.augmented_views, 1)` augmented views of each train photo,
    as training uses), head trials on them, then the best head joined to its backbone and
    tested end to end on the test photos. Returns best.json's contents."""
    from ray import tune

    from dogbreeds import data
    from dogbreeds.features import cache_features
    from dogbreeds.train import absolute_paths

    space = check_space(search.space, "head", train_config.model)  # before anything is created
    data_config, train_config = absolute_paths(data_config, train_config)
    output = _start_search(output, data_config, train_config, search, space, resume)
    image_size = models.resolve_input(train_config.model, data_config.image_size).image_size
    views = max(data_config.augmented_views, 1)
    index = data.load_index(data_config)
    features = cache_features(
        index, train_config.model, train_config.weights, image_size, views, data_config,
        features_dir or os.path.join(output, runs.FEATURES), actors, gpus_per_actor,
    )
    print(f"features: {'reused' if features['cached'] else 'computed'} in {features['seconds']} s: {os.path.dirname(features['train'])}")
    trainable = tune.with_parameters(
        _head_trial, train_config=train_config, features=features, num_classes=index.num_classes,
        trials_dir=os.path.join(output, runs.TRIALS), metric=space.metric,
    )
    trainable = tune.with_resources(trainable, {"CPU": train_config.cpus_per_worker, "GPU": train_config.gpus_per_worker})
    results = run_tuner(trainable, space, search, output, resume, data_config.seed)
    earlier = _earlier_best(output)
    best = write_results(results, list(space.hyperparameters), output, "head", space.metric)
    best["features"] = features
    if not _final_stands(output, earlier, best):
        metrics = _join_best_head(output, best, index, data_config, train_config, image_size)
        best["final"] = {"validation": metrics["validation"]["top1"], "test": metrics["test"]["top1"]}
    return _finish(output, best)


def _join_best_head(output, best, index, data_config, train_config, image_size) -> dict:
    """The best head joined to its backbone as one Keras model (raw photo in, breed out),
    evaluated end to end, written as `final/` like a training run; returns its metrics."""
    trial_dir = runs.trial_dir(output, best["trial_id"])
    head_hparams, overrides = split_values(train_config.model, best["hparams"])
    model = models.create_model(train_config.model, index.num_classes, image_size, train_config.weights, head_hparams)
    model.get_layer("head").load_weights(os.path.join(trial_dir, runs.HEAD_WEIGHTS))
    train_config = dataclasses.replace(train_config, hparams=head_hparams, **overrides)
    history = runs.read_json(os.path.join(trial_dir, runs.HISTORY))
    facts = {"epochs_run": len(history), "train_seconds": best["seconds"],  # on the cached features
             "num_train_images": len(index.splits["train"]) * max(data_config.augmented_views, 1)}
    return _test_final(output, model, trial_dir, index, data_config, train_config, image_size, facts)


def _test_final(output, model, trial_dir, index, data_config, train_config, image_size, facts: dict) -> dict:
    """The best trial's model evaluated on validation and, once, on test, written as `final/`
    like a training run (with the trial's history and `facts`: epochs_run, train_seconds,
    num_train_images); returns its metrics."""
    from dogbreeds import data, evaluate
    from dogbreeds.train import versions

    metrics = {"model": train_config.model, "image_size": image_size, "class_names": index.class_names, **facts}
    skipped = list(index.skipped)
    for split in ("validation", "test"):
        images, labels, split_skipped = data.load_images(index.splits[split], image_size, data_config)
        metrics[split], confusions = evaluate.evaluate_model(model, images, labels, index.class_names)
        skipped += split_skipped
    metrics["skipped"] = [list(item) for item in skipped]
    config = {"data": to_dict(data_config), "train": to_dict(train_config), "versions": versions()}
    runs.write_final_run(
        os.path.join(output, runs.FINAL), model=model, metrics=metrics,
        history=runs.read_json(os.path.join(trial_dir, runs.HISTORY)), confusions=confusions,
        config=config,
    )
    return metrics


# ---------------------------------------------------------------------------------------------
# Fine-tuning: the head search's best head with the top of its backbone, on Ray Train.


# The data settings that decide which photo is in which split.
SPLIT_FIELDS = ("data_dir", "tfds_dir", "validation_fraction", "test_fraction", "subset_per_class",
                "subset_fraction", "seed")


@register_search(
    "fine_tune", default_space="fine_tune", model_from="head_search",
    description="fine-tuning of a head search's best head and the top of its backbone, on Ray Train",
)
def search_fine_tune(
    data_config: DataConfig, train_config: TrainConfig, search: SearchConfig, output: str,
    head_search: str | None = None, resume: bool = False,
) -> dict:
    """Fine-tune the best head of the head search in `head_search` (the model, its backbone
    weights, image size and head come from there; `train_config` says how to train): each
    trial a Ray Train run from that head with the top `fine_tune_fraction` of the backbone
    unfrozen, augmentation on the fly; the best trial by validation is tested once as
    `final/`. Returns best.json's contents."""
    from ray import tune

    from dogbreeds import data
    from dogbreeds.train import absolute_paths

    space = check_space(search.space, "fine_tune")
    if not head_search or not os.path.isfile(os.path.join(head_search, runs.BEST)):
        raise ValueError(f"not a finished head search (no {runs.BEST}): {head_search}")
    head_search = os.path.abspath(head_search)
    head = runs.read_json(os.path.join(head_search, runs.SEARCH_CONFIG))
    head_best = runs.read_json(os.path.join(head_search, runs.BEST))
    backbone = head["train"]["model"]
    head_hparams, overrides = split_values(backbone, head_best["hparams"])
    overrides.pop("learning_rate", None)  # the head's; fine-tuning has its own
    train_config = dataclasses.replace(
        train_config, **overrides, model=backbone, weights=head["train"]["weights"], hparams=head_hparams,
        head_weights=os.path.join(runs.trial_dir(head_search, head_best["trial_id"]), runs.HEAD_WEIGHTS),
    )
    # The head's size; a new view of each photo every epoch (not the head's fixed views).
    data_config = dataclasses.replace(data_config, image_size=head["data"]["image_size"], augmented_views=0)
    data_config, train_config = absolute_paths(data_config, train_config)
    differ = [f"{field} {head['data'][field]!r} there, {getattr(data_config, field)!r} here"
              for field in SPLIT_FIELDS if getattr(data_config, field) != head["data"][field]]
    if differ:  # else photos that trained the head would validate (or test) fine-tuning
        raise ValueError(f"fine-tuning must split the photos as its head search did: {'; '.join(differ)}")
    earlier = os.path.join(output, runs.SEARCH_CONFIG)
    if resume and os.path.isfile(earlier) and runs.read_json(earlier)["train"]["head_weights"] != train_config.head_weights:
        print(f"the head search's best head is now {head_best['trial_id']}: fine-tuning it afresh in {output}")
        shutil.rmtree(output)
    output = _start_search(output, data_config, train_config, search, space, resume)
    trials_dir = os.path.join(output, runs.TRIALS)
    trainable = tune.with_parameters(_training_trial, data_config=data_config, train_config=train_config,
                                     trials_dir=trials_dir)
    trainable = tune.with_resources(trainable, TRAIN_TRIAL_RESOURCES)
    results = run_tuner(trainable, space, search, output, resume, data_config.seed,
                        callbacks=[_release_stopped_runs(trials_dir)])
    earlier = _earlier_best(output)
    best = write_results(results, list(space.hyperparameters), output, "fine_tune", space.metric)
    best["frozen_head"] = {"search": head_search, "trial_id": head_best["trial_id"], "final": head_best.get("final")}
    if not _final_stands(output, earlier, best):
        import tf_keras as keras

        trial_dir = runs.trial_dir(output, best["trial_id"])
        _, trial_overrides = split_values(backbone, best["hparams"])
        index = data.load_index(data_config)
        trained = runs.read_json(os.path.join(trial_dir, runs.METRICS))
        facts = {key: trained[key] for key in ("epochs_run", "train_seconds", "num_train_images", "workers")}
        metrics = _test_final(output, keras.models.load_model(os.path.join(trial_dir, runs.MODEL)), trial_dir, index,
                              data_config, dataclasses.replace(train_config, **trial_overrides), data_config.image_size,
                              facts)
        best["final"] = {"validation": metrics["validation"]["top1"], "test": metrics["test"]["top1"]}
    return _finish(output, best)
