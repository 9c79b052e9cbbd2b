"""The two searches of the study on Ray Tune, and the best trial's way to a final model.

- `search_cnn3v2`: each trial is a Ray Train run (`run_training`, the Train V2 pattern: Tune
  calls a driver function that launches a `TensorflowTrainer`), on a subset of the data as in
  the study; the best configuration is then retrained on all of it and tested once.
- `search_head`: the frozen backbone's features are computed once (`features.py`); every head
  trial trains on them, then the best head is joined to the backbone and tested end to end.

Search spaces are YAML files in Keras Tuner's vocabulary (`search_spaces/*.yaml`), loaded into
`keras_tuner.HyperParameters` and turned into a Ray Tune space by `to_tune_space`.

A search directory holds `results.csv` (a row per trial), `best.json`, `trials/<id>/` (each
trial's history and TensorBoard logs), `tune/` (Ray Tune's state, for `--resume`), `final/`
(the best configuration retrained and tested) and `report.html`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib

from dogbreeds import models
from dogbreeds.config import DataConfig, TrainConfig

SEARCH_SPACES_DIR = pathlib.Path(__file__).resolve().parents[1] / "search_spaces"


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """How a search runs; the data and training configurations say what each trial does."""

    # A YAML file in search_spaces/ (its `search:` says which search it is).
    space: str
    # How many configurations to try.
    trials: int = 8
    # Trials running at once; each takes `workers` x `cpus_per_worker` CPUs (and GPUs).
    concurrent_trials: int = 1
    # "random" (Tune's random search) or "tpe" (Optuna's Bayesian TPE through Ray Tune).
    algorithm: str = "random"
    # "asha" stops poor trials early (Keras Tuner's Hyperband idea); "none" runs all to the end.
    scheduler: str = "asha"
    # Retries of a crashed trial (it resumes from its last checkpoint).
    max_trial_failures: int = 2
    # Retrain the best configuration without the subset and evaluate it once on the test split.
    retrain_best: bool = True


# ---------------------------------------------------------------------------------------------
# Search spaces: YAML -> keras_tuner.HyperParameters -> Ray Tune.


def load_space(path: str | os.PathLike):
    """Read a search-space file into (keras_tuner.HyperParameters, the file's other keys)."""
    import keras_tuner
    import yaml

    path = pathlib.Path(path)
    if not path.is_file():
        path = SEARCH_SPACES_DIR / f"{path}.yaml" if not path.suffix else path
    if not path.is_file():
        known = sorted(p.stem for p in SEARCH_SPACES_DIR.glob("*.yaml"))
        raise ValueError(f"search space not found: {path}; known: {known}")
    spec = yaml.safe_load(path.read_text())
    hp = keras_tuner.HyperParameters()
    kinds = {"Int": hp.Int, "Float": hp.Float, "Choice": hp.Choice, "Boolean": hp.Boolean, "Fixed": hp.Fixed}
    for name, options in spec.pop("hyperparameters").items():
        options = dict(options)
        kind, conditions = options.pop("type"), options.pop("conditions", {})
        if kind not in kinds:
            raise ValueError(f"{path.name}: {name} has unknown type {kind!r}; known: {sorted(kinds)}")
        if len(conditions) > 1:
            raise ValueError(f"{path.name}: {name} may depend on one parent only")
        if conditions:
            (parent, values), = conditions.items()
            with hp.conditional_scope(parent, values):
                kinds[kind](name, **options)
        else:
            kinds[kind](name, **options)
    return hp, spec


def to_tune_space(hp) -> dict:
    """The Ray Tune space of a keras_tuner.HyperParameters (conditions are applied per trial
    by `active_values`)."""
    from ray import tune

    space = {}
    for parameter in hp.space:
        config = parameter.get_config()
        kind = type(parameter).__name__
        if kind == "Int":
            log = config["sampling"] == "log"
            step = config["step"] or 1
            space[parameter.name] = (
                tune.lograndint(config["min_value"], config["max_value"] + 1)
                if log else tune.qrandint(config["min_value"], config["max_value"], step)
            )
        elif kind == "Float":
            low, high, step = config["min_value"], config["max_value"], config["step"]
            if config["sampling"] == "log":
                space[parameter.name] = tune.loguniform(low, high)
            elif step:
                space[parameter.name] = tune.quniform(low, high, step)
            else:
                space[parameter.name] = tune.uniform(low, high)
        elif kind == "Choice":
            space[parameter.name] = tune.choice(config["values"])
        elif kind == "Boolean":
            space[parameter.name] = tune.choice([True, False])
        else:  # Fixed
            space[parameter.name] = config["value"]
    return space


def active_values(hp, config: dict) -> dict:
    """A trial's values, leaving out the ones whose conditions do not hold."""
    trial = hp.copy()
    trial.values.update({p.name: config[p.name] for p in hp.space if p.name in config})
    return {p.name: config[p.name] for p in hp.space if p.name in config and trial.is_active(p)}


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


# ---------------------------------------------------------------------------------------------
# The Tune side, common to both searches.


def run_tuner(trainable, hp, search: SearchConfig, output: str, name: str, resume: bool, seed: int,
              callbacks: list | None = None):
    """Run (or with `resume`, continue) a Ray Tune search; returns its ResultGrid.

    `callbacks` are Tune callbacks (a restored search keeps the ones it started with)."""
    import ray
    from ray import tune

    if not ray.is_initialized():
        ray.init()
    storage = os.path.join(os.path.abspath(output), "tune")
    path = os.path.join(storage, name)
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        return tuner.fit()
    if os.path.exists(path):
        raise ValueError(f"{output} holds a search already: pass --resume, or choose another --output")
    if search.algorithm == "tpe":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        algorithm = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed))
    elif search.algorithm == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        algorithm = BasicVariantGenerator(random_state=seed, max_concurrent=search.concurrent_trials)
    else:
        raise ValueError(f"unknown algorithm {search.algorithm!r}; known: random, tpe")
    scheduler = None
    if search.scheduler == "asha":
        scheduler = tune.schedulers.ASHAScheduler(grace_period=1, reduction_factor=3)
    elif search.scheduler != "none":
        raise ValueError(f"unknown scheduler {search.scheduler!r}; known: asha, none")
    tuner = tune.Tuner(
        trainable,
        param_space=to_tune_space(hp),
        tune_config=tune.TuneConfig(
            metric="val_accuracy",
            mode="max",
            num_samples=search.trials,
            # Random search limits concurrency itself (above); Optuna through Tune's limiter.
            max_concurrent_trials=None if search.algorithm == "random" else search.concurrent_trials,
            search_alg=algorithm,
            scheduler=scheduler,
            # A stopped trial's actor must end: a cnn3v2 trial's driver is blocked in its Ray
            # Train run, which would otherwise train on and keep its CPUs (or GPUs) reserved.
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=search.max_trial_failures),
            callbacks=callbacks,
        ),
    )
    return tuner.fit()


def write_results(results, hp, output: str, search_name: str) -> dict:
    """`results.csv` (a row per trial) and `best.json` from a ResultGrid; returns the best."""
    rows = []
    for result in results:
        history = result.metrics_dataframe
        trial_id = (result.metrics or {}).get("trial_id") or os.path.basename(result.path)
        values = active_values(hp, result.config)
        best_accuracy = float(history["val_accuracy"].max()) if history is not None and "val_accuracy" in history else None
        best_row = history.loc[history["val_accuracy"].idxmax()] if best_accuracy is not None else {}
        rows.append({
            "trial_id": trial_id,
            "status": "error" if result.error else "done",
            "seconds": round(float((result.metrics or {}).get("time_total_s", 0.0)), 2),
            "val_accuracy": best_accuracy,
            "val_loss": float(best_row["val_loss"]) if best_accuracy is not None else None,
            "epochs": int(history["epoch"].max()) if history is not None and "epoch" in history else 0,
            **{f"hp_{name}": values.get(name) for name in (p.name for p in hp.space)},
        })
    rows.sort(key=lambda row: row["trial_id"])
    with open(os.path.join(output, "results.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    finished = [row for row in rows if row["val_accuracy"] is not None]
    if not finished:
        raise ValueError("no trial finished an epoch: see the errors in results.csv")
    best_row = max(finished, key=lambda row: row["val_accuracy"])
    best = {
        "search": search_name,
        "trial_id": best_row["trial_id"],
        "val_accuracy": best_row["val_accuracy"],
        "hparams": {k[3:]: v for k, v in best_row.items() if k.startswith("hp_") and v is not None},
        "trials": len(rows),
    }
    with open(os.path.join(output, "best.json"), "w") as handle:
        json.dump(best, handle, indent=1)
    return best


# ---------------------------------------------------------------------------------------------
# The cnn3v2 search: a Ray Train run per trial.


def _cnn3v2_trial(config, *, hp, data_config, train_config, trials_dir):
    """One trial: a Ray Train run whose epochs are reported to Tune as they end."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from dogbreeds.train import run_training

    model_hparams, overrides = split_values(train_config.model, active_values(hp, config))
    trial_config = dataclasses.replace(train_config, hparams=model_hparams, **overrides)
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
    and cannot restart them in a new group (removing a group with live workers could).
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
            path = os.path.join(trials_dir, trial.trial_id, "ray", "placement_group.json")
            if os.path.exists(path):  # written by the run's rank 0 (train.py)
                with open(path) as handle:
                    self.groups.add(json.load(handle)["id"])

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


def search_cnn3v2(
    data_config: DataConfig, train_config: TrainConfig, search: SearchConfig, output: str,
    resume: bool = False,
) -> dict:
    """The study's cnn3v2 search on Ray Tune, then the best configuration retrained on all the
    training data (no subset) and tested once. Returns best.json's contents."""
    from ray import tune

    from dogbreeds.train import absolute_paths, run_training

    hp, spec = load_space(search.space)
    output = os.path.abspath(output)
    os.makedirs(output, exist_ok=True)
    data_config, train_config = absolute_paths(data_config, dataclasses.replace(train_config, model=spec["model"]))
    trials_dir = os.path.join(output, "trials")
    trainable = tune.with_parameters(
        _cnn3v2_trial, hp=hp, data_config=data_config, train_config=train_config,
        trials_dir=trials_dir,
    )
    # The trial's driver only waits for its Ray Train workers, which hold the resources; a
    # whole CPU for it would leave a 2-worker trial waiting forever on a 2-CPU machine (Tune
    # refuses an empty request, hence a sliver).
    trainable = tune.with_resources(trainable, {"CPU": 0.01})
    results = run_tuner(trainable, hp, search, output, "search", resume, data_config.seed,
                        callbacks=[_release_stopped_runs(trials_dir)])
    best = write_results(results, hp, output, "cnn3v2")
    if search.retrain_best:
        model_hparams, overrides = split_values(train_config.model, best["hparams"])
        final_data = dataclasses.replace(data_config, subset_per_class=None, subset_fraction=None)
        final_train = dataclasses.replace(train_config, hparams=model_hparams, **overrides)
        final = run_training(final_data, final_train, os.path.join(output, "final"), resume=resume)
        best["final"] = {"validation": final["validation"]["top1"], "test": final["test"]["top1"]}
        with open(os.path.join(output, "best.json"), "w") as handle:
            json.dump(best, handle, indent=1)
    return best


# ---------------------------------------------------------------------------------------------
# The transfer-head search: every trial trains a head on cached backbone features.


def fit_head(values: dict, train_config: TrainConfig, features: dict, num_classes: int,
             trial_dir: str, report=None):
    """Train one head on cached features with the study's setup; returns (head, history).

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
        callbacks=build_callbacks(train_config, os.path.join(trial_dir, "tensorboard")) + [Report()],
        verbose=0,
    )
    head.save_weights(os.path.join(trial_dir, "head.weights.h5"))
    with open(os.path.join(trial_dir, "history.json"), "w") as handle:
        json.dump(history, handle, indent=1)
    return head, history


def _head_trial(config, *, hp, train_config, features, num_classes, trials_dir):
    """One head trial, in the Tune trial's own process: the head is a few hundred thousand
    parameters on a feature matrix, where a Ray Train worker group would cost more than the
    training itself."""
    from ray import tune

    trial_dir = os.path.join(trials_dir, tune.get_context().get_trial_id())
    os.makedirs(trial_dir, exist_ok=True)
    fit_head(active_values(hp, config), train_config, features, num_classes, trial_dir, tune.report)


def search_head(
    data_config: DataConfig, train_config: TrainConfig, search: SearchConfig, output: str,
    views: int = 2, features_dir: str | None = None, actors: int = 1, gpus_per_actor: float = 0,
    resume: bool = False,
) -> dict:
    """The transfer-head search for `train_config.model` (a transfer model): features once,
    head trials on them, then the best head joined to its backbone and tested end to end on
    the test photos. Returns best.json's contents."""
    from ray import tune

    from dogbreeds import data
    from dogbreeds.features import cache_features
    from dogbreeds.train import absolute_paths

    spec = models.get_model_spec(train_config.model)
    if not spec.backbone:
        raise ValueError(f"{train_config.model} has no backbone; known: {[m for m in models.list_models() if models.get_model_spec(m).backbone]}")
    hp, _ = load_space(search.space)
    output = os.path.abspath(output)
    os.makedirs(output, exist_ok=True)
    data_config, train_config = absolute_paths(data_config, train_config)
    image_size = models.resolve_input(train_config.model, data_config.image_size).image_size
    index = data.load_index(data_config)
    features = cache_features(
        index, train_config.model, train_config.weights, image_size, views, data_config,
        features_dir or os.path.join(output, "features"), actors, gpus_per_actor,
    )
    print(f"features: {'reused' if features['cached'] else 'computed'} in {features['seconds']} s: {os.path.dirname(features['train'])}")
    trainable = tune.with_parameters(
        _head_trial, hp=hp, train_config=train_config, features=features,
        num_classes=index.num_classes, trials_dir=os.path.join(output, "trials"),
    )
    trainable = tune.with_resources(trainable, {"CPU": train_config.cpus_per_worker, "GPU": train_config.gpus_per_worker})
    results = run_tuner(trainable, hp, search, output, "search", resume, data_config.seed)
    best = write_results(results, hp, output, "head")
    best["features"] = features

    metrics = _join_best_head(output, best, index, data_config, train_config, image_size, views)
    best["final"] = {"validation": metrics["validation"]["top1"], "test": metrics["test"]["top1"]}
    with open(os.path.join(output, "best.json"), "w") as handle:
        json.dump(best, handle, indent=1)
    return best


def _join_best_head(output, best, index, data_config, train_config, image_size, views) -> dict:
    """The best head joined to its backbone as one Keras model (raw photo in, breed out),
    evaluated end to end, written as `final/` like a training run; returns its metrics."""
    import shutil

    from dogbreeds import data, evaluate
    from dogbreeds.config import to_dict
    from dogbreeds.train import versions

    final_dir = os.path.join(output, "final")
    trial_dir = os.path.join(output, "trials", best["trial_id"])
    os.makedirs(final_dir, exist_ok=True)
    head_hparams, overrides = split_values(train_config.model, best["hparams"])
    model = models.create_model(train_config.model, index.num_classes, image_size, train_config.weights, head_hparams)
    model.get_layer("head").load_weights(os.path.join(trial_dir, "head.weights.h5"))
    model.save(os.path.join(final_dir, "model.keras"))
    metrics = {"model": train_config.model, "image_size": image_size, "class_names": index.class_names}
    skipped = list(index.skipped)
    for split in ("validation", "test"):
        images, labels, split_skipped = data.load_images(index.splits[split], image_size, data_config)
        metrics[split], confusions = evaluate.evaluate_model(model, images, labels, index.class_names)
        skipped += split_skipped
    metrics["skipped"] = [list(item) for item in skipped]
    evaluate.write_confusions(os.path.join(final_dir, "confusions.csv"), confusions)
    shutil.copy(os.path.join(trial_dir, "history.json"), os.path.join(final_dir, "history.json"))
    config = {
        "data": to_dict(data_config),
        "train": to_dict(dataclasses.replace(train_config, hparams=head_hparams, **overrides)),
        "views": views,
        "versions": versions(),
    }
    for name, value in (("metrics.json", metrics), ("config.json", config)):
        with open(os.path.join(final_dir, name), "w") as handle:
            json.dump(value, handle, indent=1)
    return metrics
