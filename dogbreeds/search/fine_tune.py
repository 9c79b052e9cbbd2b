"""Fine-tuning: a head search's best head on its backbone, the top of the backbone unfrozen;
each trial a Ray Train run (how much is unfrozen and the learning rate: the space's), the best
by validation tested once. The model, its backbone weights, image size, head and split of the
photos are the head search's.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

from dogbreeds import runs
from dogbreeds.config import DataConfig, SearchConfig, TrainConfig
from dogbreeds.search.final import earlier_best, evaluate_final, final_stands
from dogbreeds.search.registry import check_space, register_search, split_values
from dogbreeds.search.train_trials import TRAIN_TRIAL_RESOURCES, release_stopped_runs, training_trial
from dogbreeds.search.tuning import finish_search, run_tuner, start_search, write_results


# The data settings that decide which photo is in which split.
SPLIT_FIELDS = ("data_dir", "tfds_dir", "validation_fraction", "test_fraction", "subset_per_class",
                "subset_fraction", "seed")


def from_head(train_config: TrainConfig, backbone: str, head_values: dict) -> TrainConfig:
    """`train_config` with the head's hyperparameters and its training values (its label
    smoothing) from the head search's best trial, `head_values`; not its learning rate
    (fine-tuning has its own), nor a training value the caller changed from its default."""
    hparams, overrides = split_values(backbone, head_values)
    defaults = TrainConfig()
    overrides = {key: value for key, value in overrides.items()
                 if key != "learning_rate" and getattr(train_config, key) == getattr(defaults, key)}
    return dataclasses.replace(train_config, **overrides, hparams=hparams)


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
    train_config = dataclasses.replace(
        from_head(train_config, backbone, head_best["hparams"]), model=backbone, weights=head["train"]["weights"],
        head_weights=os.path.join(runs.trial_dir(head_search, head_best["trial_id"]), runs.HEAD_WEIGHTS),
        keep_best_by=space.metric,  # the trial's model, tested as final/, is the epoch it was scored by
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
    output = start_search(output, data_config, train_config, search, space, resume)
    trials_dir = os.path.join(output, runs.TRIALS)
    trainable = tune.with_parameters(training_trial, data_config=data_config, train_config=train_config,
                                     trials_dir=trials_dir)
    trainable = tune.with_resources(trainable, TRAIN_TRIAL_RESOURCES)
    results = run_tuner(trainable, space, search, output, resume, data_config.seed,
                        callbacks=[release_stopped_runs(trials_dir)])
    earlier = earlier_best(output)
    best = write_results(results, list(space.hyperparameters), output, "fine_tune", space.metric)
    best["frozen_head"] = {"search": head_search, "trial_id": head_best["trial_id"], "final": head_best.get("final")}
    if not final_stands(output, earlier, best):
        import tf_keras as keras

        trial_dir = runs.trial_dir(output, best["trial_id"])
        _, trial_overrides = split_values(backbone, best["hparams"])
        index = data.load_index(data_config)
        trained = runs.read_json(os.path.join(trial_dir, runs.METRICS))
        facts = {key: trained[key] for key in ("epochs_run", "train_seconds", "num_train_images", "workers")}
        metrics = evaluate_final(output, keras.models.load_model(os.path.join(trial_dir, runs.MODEL), compile=False), trial_dir, index,
                              data_config, dataclasses.replace(train_config, **trial_overrides), data_config.image_size,
                              facts)
        best["final"] = {"validation": metrics["validation"]["top1"], "test": metrics["test"]["top1"]}
    return finish_search(output, best)
