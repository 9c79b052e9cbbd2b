"""The transfer-head search: the frozen backbone's features are computed once (`features.py`);
every head trial trains a head on them in its Tune trial's own process, then the best head is
joined to its backbone as one Keras model (raw photo in, breed out) and tested end to end.
"""

from __future__ import annotations

import dataclasses
import os

from dogbreeds import models, runs, spaces
from dogbreeds.config import DataConfig, SearchConfig, TrainConfig
from dogbreeds.search.final import earlier_best, evaluate_final, final_stands
from dogbreeds.search.registry import check_space, register_search, split_values
from dogbreeds.search.tuning import finish_search, run_tuner, start_search, write_results


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
    output = start_search(output, data_config, train_config, search, space, resume)
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
    earlier = earlier_best(output)
    best = write_results(results, list(space.hyperparameters), output, "head", space.metric)
    best["features"] = features
    if not final_stands(output, earlier, best):
        metrics = _join_best_head(output, best, index, data_config, train_config, image_size)
        best["final"] = {"validation": metrics["validation"]["top1"], "test": metrics["test"]["top1"]}
    return finish_search(output, best)


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
    return evaluate_final(output, model, trial_dir, index, data_config, train_config, image_size, facts)
