"""A search's final model: the best trial's configuration as a training run in `final/`,
tested once.

A cnn3v2 search retrains its best configuration on all the data (train.py tests it); the
head and fine_tune searches test the best trial's own model with `evaluate_final`. An extended
search (`--resume` with more trials) keeps its final model if its best trial did not change
(`final_stands`), and trains a new one otherwise.
"""

from __future__ import annotations

import os
import shutil

from dogbreeds import runs
from dogbreeds.config import to_dict


def earlier_best(output: str) -> dict:
    """best.json of a resumed search before it is rewritten ({} if none)."""
    path = os.path.join(output, runs.BEST)
    return runs.read_json(path) if os.path.exists(path) else {}


def final_stands(output: str, earlier: dict, best: dict) -> bool:
    """Whether the final model of an extended search is still the best trial's: the best trial
    did not change and its final/ was finished (then `best` keeps its numbers). A final/ of
    another trial is removed, to be trained afresh."""
    if earlier.get("final") and earlier.get("trial_id") == best["trial_id"]:
        best["final"] = earlier["final"]
        return True
    if earlier.get("trial_id") not in (None, best["trial_id"]):
        shutil.rmtree(os.path.join(output, runs.FINAL), ignore_errors=True)
    return False


def evaluate_final(output, model, trial_dir, index, data_config, train_config, image_size, facts: dict) -> dict:
    """The best trial's model evaluated on validation and, once, on test, written as `final/`
    like a training run (with the trial's history and `facts`: epochs_run, train_seconds,
    num_train_images); returns its metrics."""
    from dogbreeds import data, evaluate
    from dogbreeds.train import versions

    metrics = {"model": train_config.model, "image_size": image_size, "class_names": index.class_names, **facts}
    skipped = list(index.skipped)
    for split in ("validation", "test"):
        images, labels, split_skipped = data.load_images(index.splits[split], image_size, data_config)
        metrics[split], confusions = evaluate.evaluate_model(
            model, images, labels, index.class_names, test_time_flip=data_config.test_time_flip)
        skipped += split_skipped
    metrics["skipped"] = [list(item) for item in skipped]
    config = {"data": to_dict(data_config), "train": to_dict(train_config), "versions": versions()}
    runs.write_final_run(
        os.path.join(output, runs.FINAL), model=model, metrics=metrics,
        history=runs.read_json(os.path.join(trial_dir, runs.HISTORY)), confusions=confusions,
        config=config,
    )
    return metrics
