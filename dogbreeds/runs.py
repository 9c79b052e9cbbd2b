"""The layout of the directories dogbreeds writes, and their writers: the one place a file name
of a training run, a search or a pipeline is spelled.

    runs/x/                      a training run (`dogbreeds train`, a search's `final/`, a trial)
      config.json  model.keras  metrics.json  history.json  confusions.csv  tensorboard/  ray/
    runs/search/                 a search (`dogbreeds search cnn3v2|head`)
      search.json  study.journal  results.csv  best.json  trials/<id>/  tune/  final/  features/
      report.html
    runs/pipeline/               a pipeline (`dogbreeds pipeline`)
      pipeline.json  cnn3v2/  head/  bundle/  report.html

Other modules ask for `os.path.join(run_dir, runs.METRICS)`, never for "metrics.json".
Standard library only: the CLI and the report read these names without TensorFlow or Ray.
"""

from __future__ import annotations

import json
import os
import shutil

# ---------------------------------------------------------------------------------------------
# A training run (train.py; also each cnn3v2 trial and every search's final/).

CONFIG = "config.json"  # the resolved data and training configuration, and the versions
MODEL = "model.keras"  # the trained Keras model, raw photo in, breed probabilities out
METRICS = "metrics.json"  # validation (and test) metrics, class names, image size, timings
HISTORY = "history.json"  # one row per epoch: loss, accuracy, val_* (live during training)
CONFUSIONS = "confusions.csv"  # the most confused breed pairs of the last split evaluated
TENSORBOARD = "tensorboard"  # TensorBoard logs (folder), written by rank 0 only
RAY = "ray"  # Ray Train's storage (folder): a checkpoint each epoch, for resuming
RAY_TRAIN = "train"  # the run's name under ray/: present once a run has started there
PLACEMENT_GROUP = "placement_group.json"  # under ray/: the workers' placement group (below)
CHECKPOINT_WEIGHTS = "weights.h5"  # in a Ray checkpoint: the model's weights
CHECKPOINT_STATE = "state.json"  # in a Ray checkpoint: epochs done, history, learning rate
# The files of a finished run, copied from its final Ray checkpoint into the run directory.
RUN_FILES = (MODEL, METRICS, CONFUSIONS, HISTORY)

# ---------------------------------------------------------------------------------------------
# A search (the search package).

SEARCH_CONFIG = "search.json"  # the resolved data, training and search configuration, versions
RESULTS = "results.csv"  # one row per trial: status, seconds, best val_accuracy, values
BEST = "best.json"  # the best trial, its values, and the final model's metrics
TRIALS = "trials"  # one folder per trial, named by its Tune trial id
TUNE = "tune"  # Ray Tune's state (folder), for `--resume`
TUNE_NAME = "search"  # the experiment's name under tune/, and the study's name in STUDY
STUDY = "study.journal"  # the search's Optuna study (JournalStorage): what `dashboard` shows
FINAL = "final"  # the best configuration as a training run (folder)
FEATURES = "features"  # the head search's cached backbone features (folder)
HEAD_WEIGHTS = "head.weights.h5"  # in a head trial's folder: the trained head's weights
REPORT = "report.html"  # `dogbreeds report`'s page, beside what it reports

# ---------------------------------------------------------------------------------------------
# A pipeline (pipeline.py).

PIPELINE = "pipeline.json"  # which search's final model was exported, and why; the comparison table
LADDER = "ladder"  # a pipeline's study ladder (folder): one training run per model
BUNDLE = "bundle"  # the exported bundle (folder; export.py owns its contents)


def write_json(path: str | os.PathLike, value) -> None:
    """Write `value` as indented JSON, the format of every JSON file in a run directory."""
    with open(path, "w") as handle:
        json.dump(value, handle, indent=1)


def read_json(path: str | os.PathLike):
    """A JSON file of a run directory."""
    with open(path) as handle:
        return json.load(handle)


def write_final_run(run_dir: str, *, model, metrics: dict, history: list, confusions: list[dict],
                    config: dict | None = None) -> None:
    """Write a finished run's files into `run_dir`: the one writer of a final run, used by a
    training run (train.py, into the checkpoint its driver copies with `copy_run_files`) and by
    a search's tested model (search/final.py's `evaluate_final`: the joined head, fine-tuning's).

    `model` is a Keras model (saved) or the path of a saved `model.keras` (copied unless it is
    already there); `confusions` are `evaluate.confusions`' rows; `config` (config.json) is
    written when given (a training run writes its own when it starts).
    """
    from dogbreeds import evaluate

    os.makedirs(run_dir, exist_ok=True)
    model_path = os.path.join(run_dir, MODEL)
    if isinstance(model, (str, os.PathLike)):
        if os.path.abspath(model) != os.path.abspath(model_path):
            shutil.copy(model, model_path)
    else:
        model.save(model_path)
    write_json(os.path.join(run_dir, METRICS), metrics)
    write_json(os.path.join(run_dir, HISTORY), history)
    evaluate.write_confusions(os.path.join(run_dir, CONFUSIONS), confusions)
    if config is not None:
        write_json(os.path.join(run_dir, CONFIG), config)


def copy_run_files(source_dir: str, run_dir: str) -> None:
    """Copy a finished run's files (`RUN_FILES`, as `write_final_run` wrote them) from its final
    Ray checkpoint into the run directory."""
    for name in RUN_FILES:
        shutil.copy(os.path.join(source_dir, name), os.path.join(run_dir, name))


# ---------------------------------------------------------------------------------------------
# The placement-group handshake between a training run and the search around it.


def record_placement_group(run_dir: str, group) -> None:
    """Record the Ray placement group of a training run's workers (rank 0 calls it).

    Why a file: a cnn3v2 trial's Ray Train run lives in an actor that Tune ends when its
    scheduler stops the trial; the run's controller dies with it, before it can remove its
    workers' placement group, and such a group outlives its creator (ray-project/ray#54305).
    The search (search/train_trials.py's `release_stopped_runs`, a Tune callback in the
    driver) must free it, and the only thing both sides share is the trial's directory. `group`
    is a `ray.util.placement_group.PlacementGroup`; its id is written as hex.
    """
    directory = os.path.join(run_dir, RAY)
    os.makedirs(directory, exist_ok=True)
    write_json(os.path.join(directory, PLACEMENT_GROUP), {"id": group.id.hex()})


def recorded_placement_group(run_dir: str) -> str | None:
    """The hex id `record_placement_group` wrote for the run in `run_dir`, or None (a run that
    has not started its workers, or that ran outside a placement group)."""
    path = os.path.join(run_dir, RAY, PLACEMENT_GROUP)
    if not os.path.exists(path):
        return None
    return read_json(path)["id"]


def trial_dir(search_dir: str, trial_id: str) -> str:
    """The folder of one trial of the search in `search_dir`."""
    return os.path.join(search_dir, TRIALS, trial_id)
