"""Ray Tune's side of every search: the search directory, the trials run by Tune and recorded
in the search's Optuna study (study.py), and their results.

A search directory (names in `runs.py`) holds `search.json` (its resolved configuration),
`results.csv` (a row per trial), `best.json`, `trials/<id>/` (each trial's history and
TensorBoard logs), `tune/` (Ray Tune's state, for `--resume`: `search/`, then each extension's
`search-2/`, ...), `study.journal` (the search's Optuna study, study.py), `final/` (the best
configuration as a training run, tested once: final.py) and `report.html`.

A search runs `start_search`, then `run_tuner` on its trainable, then `write_results`; once its
final model is tested, `finish_search` completes best.json.
"""

from __future__ import annotations

import csv
import logging
import os
import time

from dogbreeds import console, runs, spaces, study
from dogbreeds.config import DataConfig, SearchConfig, TrainConfig, to_dict


# ---------------------------------------------------------------------------------------------
# The search directory.


def start_search(output: str, data_config: DataConfig, train_config: TrainConfig,
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
# Ray Tune, its trials sampled by and recorded in the search's study.


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
        console.init_ray()
    storage = os.path.join(os.path.abspath(output), runs.TUNE)
    # Tune's own tables and trial boxes with --verbose; else a line per trial as it starts,
    # its progress (`progress_lines`) and its end.
    if not console.verbose():
        callbacks = list(callbacks or []) + [progress_lines(output, space)]
        # Tune's newer console output prints each experiment's settings box at any verbosity.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
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
                verbose=None if console.verbose() else 0,
            ),
        )
        results += list(tuner.fit())
    study.reconcile(output, runs.TUNE_NAME)
    return results


# A running trial's progress line at most this often: a trial on cached features runs an epoch
# a second, a Ray Train trial's epoch takes half a minute or more.
PROGRESS_INTERVAL_S = 30


def progress_lines(output: str, space: spaces.SearchSpace):
    """A Tune callback logging a line per trial as it starts (its values), as it runs (its
    epoch and metric, at most every PROGRESS_INTERVAL_S), and as it ends or fails."""
    from ray import tune

    log = logging.getLogger("dogbreeds")
    search = os.path.basename(os.path.normpath(output))
    better = max if space.mode == "max" else min

    def values(config: dict) -> str:
        return ", ".join(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}"
                         for key, value in sorted(config.items()))

    class ProgressLines(tune.Callback):
        def __init__(self):
            # Per trial: (time, epoch) of its last line; (best metric, its epoch).
            self.last_line, self.best = {}, {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.last_line[trial.trial_id] = (time.time(), None)
            log.info("%s trial %s started: %s", search, trial.trial_id, values(trial.config))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get(space.metric) is None:
                return
            found = (result[space.metric], result.get("epoch"))
            earlier = self.best.get(trial.trial_id)
            self.best[trial.trial_id] = found if earlier is None else better(earlier, found, key=lambda item: item[0])
            shown_at, shown_epoch = self.last_line.get(trial.trial_id, (0, None))
            if time.time() - shown_at >= PROGRESS_INTERVAL_S and result.get("epoch") != shown_epoch:
                self.last_line[trial.trial_id] = (time.time(), result.get("epoch"))
                log.info("%s trial %s: epoch %s, %s %.3f", search, trial.trial_id, result.get("epoch"),
                         space.metric, result[space.metric])

        def on_trial_complete(self, iteration, trials, trial, **info):
            value, epoch = self.best.get(trial.trial_id, (None, None))
            best = f"best {space.metric} {value:.3f} at epoch {epoch}" if value is not None else "no result"
            log.info("%s trial %s ended: %s", search, trial.trial_id, best)

        def on_trial_error(self, iteration, trials, trial, **info):
            log.warning("%s trial %s failed (retried up to the search's max_trial_failures): see %s",
                        search, trial.trial_id, os.path.join(trial.path or "", "error.txt"))

    return ProgressLines()


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


# ---------------------------------------------------------------------------------------------
# The results: results.csv and best.json.


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


def finish_search(output: str, best: dict) -> dict:
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
