"""The study's cnn3v2 search: each trial a Ray Train run of the space file's model (the Train
V2 pattern: Tune calls a driver function that launches a `TensorflowTrainer`), on a subset of
the data as in the study; the best configuration is then retrained on all of it and tested once.
"""

from __future__ import annotations

import dataclasses
import os

from dogbreeds import runs
from dogbreeds.config import DataConfig, SearchConfig, TrainConfig
from dogbreeds.search.final import earlier_best, final_stands
from dogbreeds.search.registry import check_space, register_search, split_values
from dogbreeds.search.train_trials import TRAIN_TRIAL_RESOURCES, release_stopped_runs, training_trial
from dogbreeds.search.tuning import finish_search, run_tuner, start_search, write_results


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
    # Each trial's model (and the final one) is its best epoch by the metric that scores it.
    train_config = dataclasses.replace(train_config, model=space.model, keep_best_by=space.metric)
    data_config, train_config = absolute_paths(data_config, train_config)
    output = start_search(output, data_config, train_config, search, space, resume)
    trials_dir = os.path.join(output, runs.TRIALS)
    trainable = tune.with_parameters(
        training_trial, data_config=data_config, train_config=train_config,
        trials_dir=trials_dir,
    )
    trainable = tune.with_resources(trainable, TRAIN_TRIAL_RESOURCES)
    results = run_tuner(trainable, space, search, output, resume, data_config.seed,
                        callbacks=[release_stopped_runs(trials_dir)])
    earlier = earlier_best(output)
    best = write_results(results, list(space.hyperparameters), output, "cnn3v2", space.metric)
    if search.retrain_best and not final_stands(output, earlier, best):
        model_hparams, overrides = split_values(train_config.model, best["hparams"])
        final_data = dataclasses.replace(data_config, subset_per_class=None, subset_fraction=None)
        final_train = dataclasses.replace(train_config, hparams=model_hparams, **overrides)
        final = run_training(final_data, final_train, os.path.join(output, runs.FINAL), resume=resume)
        best["final"] = {"validation": final["validation"]["top1"], "test": final["test"]["top1"]}
    return finish_search(output, best)
