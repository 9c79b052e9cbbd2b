"""Trials that are Ray Train runs (the cnn3v2 and fine_tune searches): the trial, what it
reserves, and freeing the Ray Train run of a trial that Tune stopped.
"""

from __future__ import annotations

import dataclasses
import os

from dogbreeds import runs
from dogbreeds.search.registry import split_values

# What such a trial's own process reserves: no CPU, since it only waits for its Ray Train
# workers, which hold the CPUs and GPUs (even a sliver of a CPU would leave a trial of 2
# one-CPU workers waiting forever on 2 CPUs). Tune refuses an empty request, hence a MiB.
TRAIN_TRIAL_RESOURCES = {"CPU": 0, "memory": 2**20}


def training_trial(config, *, data_config, train_config, trials_dir):
    """One trial: a Ray Train run whose epochs are reported to Tune as they end."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from dogbreeds.train import run_training

    model_hparams, overrides = split_values(train_config.model, config)
    trial_config = dataclasses.replace(train_config, hparams={**train_config.hparams, **model_hparams}, **overrides)
    trial_dir = os.path.join(trials_dir, tune.get_context().get_trial_id())
    # resume=True: a retried or restored trial continues its Ray Train run from its checkpoint;
    # its epochs reach the console through the search's `tuning.progress_lines`.
    run_training(data_config, trial_config, trial_dir, callbacks=[TuneReportCallback()],
                 resume=True, evaluate_test=False, epoch_lines=False)


def release_stopped_runs(trials_dir: str):
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
