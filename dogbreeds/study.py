"""Each search is an Optuna study, kept in its search directory and fed by Ray Tune.

Ray Tune runs the trials; Optuna samples them and keeps their record. A search's study lives
in `<search>/study.journal` (`runs.STUDY`): Optuna's `JournalStorage` on a file, an append-only
log that several processes may read and write, with Optuna's default lock (a symlink, safe on
NFS and EFS, where a cluster keeps its runs). optuna-dashboard reads it live
(`dogbreeds dashboard`, dashboard.py).

- Sampling is define-by-run from the search-space file (`spaces.suggest`): a hyperparameter
  whose condition does not hold is never sampled. "random" is Optuna's `RandomSampler`, "tpe"
  its `TPESampler`; both are seeded with the data's seed.
- Each epoch's metric is an intermediate value (step = the epoch); a trial's value is its
  best epoch's, as `results.csv` reports it (a PRUNED trial's, Optuna's: its last epoch's).
- Each study trial carries its Ray trial id, folder, node, epochs and seconds (user attrs). A
  trial the scheduler (`asha`) stopped early is PRUNED, a crashed one FAIL.
- After a search, `reconcile` closes what a killed driver left open: a study trial still
  RUNNING (asked for, then lost with the driver) is marked FAIL.
"""

from __future__ import annotations

import functools
import logging
import os

from dogbreeds import runs, spaces

# Optuna's samplers by SearchConfig.algorithm.
SAMPLERS = ("random", "tpe")


def storage(path: str):
    """The JournalStorage of the study file `path` (created if missing)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(path))


def study_path(search_dir: str) -> str:
    """Where the study of the search in `search_dir` is kept."""
    return os.path.join(search_dir, runs.STUDY)


def make_sampler(algorithm: str, seed: int):
    """Optuna's sampler for SearchConfig.algorithm, seeded."""
    import optuna

    if algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if algorithm == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    raise ValueError(f"unknown algorithm {algorithm!r}; known: {', '.join(SAMPLERS)}")


def searcher(space: spaces.SearchSpace, algorithm: str, seed: int, search_dir: str, name: str):
    """Ray Tune's OptunaSearch over the study `name` of `search_dir`, sampling `space`
    define-by-run; the searcher records what Tune sees of each trial in the study."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    if not logging.getLogger("dogbreeds").isEnabledFor(logging.DEBUG):  # `--verbose` shows them
        optuna.logging.set_verbosity(optuna.logging.WARNING)

    class StudySearch(OptunaSearch):
        def suggest(self, trial_id):
            config = super().suggest(trial_id)
            _record(self._ot_trials[trial_id], ray_trial_id=trial_id,
                    trial_dir=runs.trial_dir(search_dir, trial_id))
            return config

        def on_trial_result(self, trial_id, result):
            if result.get(self.metric) is None or trial_id in self._completed_trials:
                return
            trial = self._ot_trials[trial_id]
            _record(trial, node=result.get("hostname") or result.get("node_ip"))
            # Once per epoch: a training run's last result repeats its last epoch, and a
            # restarted trial's first epochs were seen before.
            if _epoch(result) not in trial.storage.get_trial(trial._trial_id).intermediate_values:
                try:
                    trial.report(result[self.metric], _epoch(result))
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass  # finished before a killed driver's last snapshot: resumed, already known

        def on_trial_complete(self, trial_id, result=None, error=False):
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            trial = self._ot_trials[trial_id]
            result = result or {}
            self.on_trial_result(trial_id, result)  # the result a scheduler stopped it on comes only here
            steps = trial.storage.get_trial(trial._trial_id).intermediate_values
            _record(trial, epochs=_epoch(result), seconds=round(float(result.get("time_total_s") or 0.0), 2))
            value, state = None, optuna.trial.TrialState.FAIL
            if steps and not error and "pruned" in trial.storage.get_trial(trial._trial_id).user_attrs:
                state = optuna.trial.TrialState.PRUNED  # its value: its last epoch's
            elif steps and not error:  # its value: its best epoch's, as results.csv has it
                value = (max if self.mode == "max" else min)(steps.values())
                state = optuna.trial.TrialState.COMPLETE
            try:
                self._ot_study.tell(trial, value, state=state)
            except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError):
                pass  # told before a killed driver's last snapshot
            self._completed_trials.add(trial_id)

    return StudySearch(
        space=functools.partial(spaces.suggest, space),
        metric=space.metric, mode=space.mode,
        sampler=make_sampler(algorithm, seed),
        study_name=name, storage=storage(study_path(search_dir)),
    )


def asha(search_dir: str, name: str):
    """Ray Tune's ASHA (Keras Tuner's Hyperband idea), which also marks each trial it stops in
    the study (user attr `pruned`), so the searcher closes it as PRUNED."""
    from ray.tune.schedulers import ASHAScheduler

    class StudyASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(tune_controller, trial, result)
            epoch = result.get("training_iteration", 0)
            if decision == self.STOP and epoch < self._max_t:
                study = load(search_dir, name)
                for candidate in study.get_trials(deepcopy=False):
                    if candidate.user_attrs.get("ray_trial_id") == trial.trial_id and not candidate.state.is_finished():
                        study._storage.set_trial_user_attr(candidate._trial_id, "pruned", f"ASHA, after epoch {_epoch(result)}")
            return decision

    return StudyASHA(grace_period=1, reduction_factor=3)


def _epoch(result: dict):
    """The epoch of a Tune result: the trial's own count (Tune's iterations may count one more)."""
    return result.get("epoch") or result.get("training_iteration")


def _record(trial, **attrs) -> None:
    """Set the user attrs of a running study trial (not after it ended)."""
    import optuna

    for key, value in attrs.items():
        if value is None or trial.user_attrs.get(key) == value:
            continue
        try:
            trial.set_user_attr(key, value)
        except optuna.exceptions.UpdateFinishedTrialError:
            return


def reconcile(search_dir: str, name: str) -> None:
    """After a search has ended: a study trial still RUNNING (one a killed driver had asked for
    and its restored search never ran) is closed as FAIL, saying why."""
    import optuna

    study = load(search_dir, name)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(trial._trial_id, "closed", "still running when its search ended")
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)


def load(search_dir: str, name: str):
    """The study of the search in `search_dir`."""
    import optuna

    return optuna.load_study(study_name=name, storage=storage(study_path(search_dir)))


# The evaluator of hyperparameter importance: optuna-dashboard's, so the report and the
# dashboard agree.
IMPORTANCE_EVALUATOR = "PED-ANOVA (optuna.importance.PedAnovaImportanceEvaluator)"


def importance(search_dir: str, name: str) -> dict[str, float]:
    """Each hyperparameter's importance to the study's objective over its COMPLETE trials
    (PED-ANOVA, as optuna-dashboard computes it); empty with fewer than two."""
    import warnings

    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    record = load(search_dir, name)
    complete = record.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}
    sign = -1 if record.direction == optuna.study.StudyDirection.MAXIMIZE else 1  # it ranks low values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = get_param_importances(record, evaluator=PedAnovaImportanceEvaluator(),
                                       target=lambda trial: sign * trial.value)
    return {key: round(float(value), 4) for key, value in values.items()}


def note_final(search_dir: str, name: str, trial_id: str, confused_pairs: int = 5) -> str:
    """Attach the final model's error analysis (test top-1 and top-5, the most confused breed
    pairs) to the best trial as its optuna-dashboard note; returns the note."""
    import csv
    import types

    from optuna_dashboard import save_note

    metrics = runs.read_json(os.path.join(search_dir, runs.FINAL, runs.METRICS))
    with open(os.path.join(search_dir, runs.FINAL, runs.CONFUSIONS), newline="") as handle:
        pairs = list(csv.DictReader(handle))[:confused_pairs]
    test = metrics.get("test") or {}
    lines = [
        f"## The final model: this trial's configuration, tested once ({test.get('num_images', '?')} test photos)",
        "",
        f"Test top-1 **{test.get('top1', float('nan')):.3f}**, top-5 **{test.get('top5', float('nan')):.3f}**.",
        "",
        "| true breed | predicted as | photos | share of the breed |",
        "|---|---|---|---|",
        *(f"| {p['true_breed']} | {p['predicted_breed']} | {p['count']} | {float(p['fraction_of_true']):.0%} |"
          for p in pairs),
    ]
    note = "\n".join(lines)
    record = load(search_dir, name)
    (trial,) = [t for t in record.get_trials(deepcopy=False) if t.user_attrs.get("ray_trial_id") == trial_id]
    # save_note takes an optuna.Trial; a finished trial is reached through its storage and ids.
    save_note(types.SimpleNamespace(storage=record._storage, study=record, _trial_id=trial._trial_id), note)
    return note
