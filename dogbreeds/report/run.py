"""Reading a run directory for the report: every file is optional, and what is missing is None."""

from __future__ import annotations

import csv
import dataclasses
import json
import os

from dogbreeds import runs


@dataclasses.dataclass
class TrainingRun:
    """The files of a training run (layout of `dogbreeds train`); a missing file is None."""

    directory: str
    config: dict | None
    metrics: dict | None
    history: list[dict] | None
    confusions: list[dict] | None


@dataclasses.dataclass
class SearchRun:
    """The files of a search: its trials, the best one, and the best retrained (`final`)."""

    directory: str
    results: list[dict]  # rows of results.csv, numbers parsed
    best: dict | None
    trial_histories: dict[str, list[dict]]
    trial_config: dict | None  # one trial's config.json, for the data and versions
    final: TrainingRun | None


@dataclasses.dataclass
class Run:
    """Everything in a run directory that a report can show."""

    directory: str
    training: TrainingRun | None
    search: SearchRun | None
    searches: dict[str, SearchRun]  # a pipeline's searches, by folder name
    bundle: dict | None
    pipeline: dict | None  # pipeline.json: which search's final model was exported, and why
    modified: float  # when the newest file read was written


def read_run(run_dir: str) -> Run:
    """Read whatever `run_dir` holds of a training run, a search or a pipeline."""
    if not os.path.isdir(run_dir):
        raise ValueError(f"run directory not found: {run_dir}")
    searches = {}
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if name not in (runs.TRIALS, runs.FINAL) and os.path.isdir(path):
            search = _read_search(path)
            if search:
                searches[name] = search
    bundle = _read_json(os.path.join(run_dir, runs.BUNDLE, "bundle.json"))
    bundle = bundle or _read_json(os.path.join(run_dir, "bundle.json"))
    pipeline = _read_json(os.path.join(run_dir, runs.PIPELINE))
    run = Run(run_dir, _read_training(run_dir), _read_search(run_dir), searches, bundle, pipeline, 0.0)
    if not (run.training or run.search or run.searches or run.bundle):
        raise ValueError(
            f"nothing to report in {run_dir}: expected a training run (metrics.json, "
            "history.json, confusions.csv, config.json), a search (results.csv, best.json, "
            "trials/) or a pipeline (search folders, bundle/bundle.json)"
        )
    names = (runs.METRICS, runs.HISTORY, runs.RESULTS, runs.BEST, runs.PIPELINE,
             os.path.join(runs.BUNDLE, "bundle.json"))
    times = [os.path.getmtime(os.path.join(run_dir, n)) for n in names
             if os.path.exists(os.path.join(run_dir, n))]
    run.modified = max(times or [os.path.getmtime(run_dir)])
    return run


def _read_training(directory: str) -> TrainingRun | None:
    run = TrainingRun(
        directory,
        _read_json(os.path.join(directory, runs.CONFIG)),
        _read_json(os.path.join(directory, runs.METRICS)),
        _read_json(os.path.join(directory, runs.HISTORY)),
        _read_csv(os.path.join(directory, runs.CONFUSIONS), keep_text=("true_breed", "predicted_breed")),
    )
    return run if (run.config or run.metrics or run.history or run.confusions) else None


def _read_search(directory: str) -> SearchRun | None:
    results = _read_csv(os.path.join(directory, runs.RESULTS), keep_text=("trial_id", "status"))
    best = _read_json(os.path.join(directory, runs.BEST))
    trials_dir = os.path.join(directory, runs.TRIALS)
    histories, trial_config = {}, None
    if os.path.isdir(trials_dir):
        for trial_id in sorted(os.listdir(trials_dir)):
            history = _read_json(os.path.join(trials_dir, trial_id, runs.HISTORY))
            if history:
                histories[trial_id] = history
            trial_config = trial_config or _read_json(os.path.join(trials_dir, trial_id, runs.CONFIG))
    if results is None and best is None and not histories:
        return None
    final = _read_training(os.path.join(directory, runs.FINAL))
    return SearchRun(directory, results or [], best, histories, trial_config, final)


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error


def _read_csv(path: str, keep_text: tuple[str, ...]) -> list[dict] | None:
    """Rows of a CSV file with numbers, booleans and empty cells (None) parsed, except in
    the `keep_text` columns (a trial id like 00001 is a name, not a number)."""
    if not os.path.isfile(path):
        return None
    with open(path, newline="") as handle:
        return [
            {key: value if key in keep_text else _parse_cell(value) for key, value in row.items()}
            for row in csv.DictReader(handle)
        ]


def _parse_cell(text: str | None):
    if text is None or text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
