"""The searches for real on a local Ray: the search-space files, a 2-trial search of each
kind, killing and resuming a search, and a head trained on cached features against the same
head trained end to end on the photos."""

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dogbreeds import cli, models, search, spaces
from dogbreeds.search.final import final_stands
from dogbreeds.search.head import fit_head
from dogbreeds.search.tuning import run_tuner, start_search, write_results
from dogbreeds.config import DataConfig, TrainConfig
from dogbreeds.config import SearchConfig
from tests.conftest import (
    MOBILENET_WEIGHTS, ROOT, TINY_DIR, assert_study_holds, dashboard_studies, finished_in_tune_state, free_port,
)

SPACE_FILES = sorted((ROOT / "search_spaces").glob("*.yaml"))


def test_every_search_has_its_space_file():
    assert [p.stem for p in SPACE_FILES] == ["cnn3v2", "fine_tune", "transfer_head"]


def _samples(space, count, seed=0) -> list[dict]:
    """`count` trials' values drawn from a checked space as a random search draws them."""
    import optuna

    study_ = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [spaces.suggest(space, study_.ask()) for _ in range(count)]


@pytest.mark.parametrize("path", SPACE_FILES, ids=lambda p: p.stem)
def test_space_file_parses_and_samples(path):
    text = path.read_text()
    assert text.startswith("#") and "dogbreeds search" in text.split("\nsearch:")[0]
    space = search.check_space(path)
    model = space.model or "mobilenet_025"
    for values in _samples(space, 30):
        for name, value in values.items():
            options = space.hyperparameters[name]
            if "min_value" in options:
                assert options["min_value"] <= value <= options["max_value"] + 1e-9
            if "values" in options:
                assert value in options["values"]
        model_hparams, train_overrides = search.split_values(model, values)
        models.resolve_hparams(model, model_hparams)  # every key is the model's or training's
        assert set(train_overrides) <= {"learning_rate", "label_smoothing", "fine_tune_fraction"}


def test_fine_tuning_takes_the_heads_values_but_not_over_the_callers():
    """The head search's best trial gives fine-tuning its head and its label smoothing, not
    its learning rate; a label smoothing the caller set (`--label-smoothing 0.1`) stays."""
    from dogbreeds.search.fine_tune import from_head

    head = {"dropout_rate": 0.3, "hidden_layer": False, "learning_rate": 7e-4, "label_smoothing": 0.1}
    config = from_head(TrainConfig(learning_rate=3e-5, epochs=8), "mobilenet_025", head)
    assert config.hparams == {"dropout_rate": 0.3, "hidden_layer": False}
    assert (config.label_smoothing, config.learning_rate, config.epochs) == (0.1, 3e-5, 8)
    mine = from_head(TrainConfig(label_smoothing=0.2), "mobilenet_025", head)
    assert mine.label_smoothing == 0.2 and mine.hparams == config.hparams


@pytest.mark.parametrize("name, child, parent", [("transfer_head", "hidden_units", "hidden_layer"),
                                                 ("cnn3v2", "dropout_rate", "dropout_1")])
def test_a_conditional_hyperparameter_is_sampled_only_when_its_parent_allows(name, child, parent):
    samples = _samples(search.check_space(name), 40)
    assert {values[parent] for values in samples} == {True, False}
    for values in samples:
        assert (child in values) == values[parent], values


def test_unknown_space_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: \\['cnn3v2', 'fine_tune', 'transfer_head'\\]"):
        search.check_space("nope")


def test_every_search_is_registered_with_its_default_space():
    assert sorted(search.SEARCHES) == ["cnn3v2", "fine_tune", "head"]
    for kind, entry in search.SEARCHES.items():
        assert search.check_space(entry.default_space, kind).search == kind
    assert search.SEARCHES["cnn3v2"].run is search.search_cnn3v2
    assert search.SEARCHES["head"].run is search.search_head
    assert search.SEARCHES["fine_tune"].run is search.search_fine_tune


def test_the_space_file_decides_the_model_and_the_metric():
    cnn3v2 = search.check_space("cnn3v2", "cnn3v2")
    assert (cnn3v2.model, cnn3v2.metric, cnn3v2.mode) == ("cnn3v2", "val_accuracy", "max")
    head = search.check_space("transfer_head", "head", "mobilenet_025")
    assert head.model is None and head.metric == "val_accuracy"


def test_the_type_table_is_keras_tuners():
    import inspect

    import keras_tuner

    hp = keras_tuner.HyperParameters()
    for kind, (required, optional) in spaces.TYPES.items():
        parameters = inspect.signature(getattr(hp, kind)).parameters
        names = [name for name in parameters if name not in ("name", "parent_name", "parent_values")]
        assert sorted(names) == sorted(required + optional), kind
        assert [n for n in names if parameters[n].default is inspect.Parameter.empty] == list(required)


VALID = {"search": "head", "metric": "val_accuracy",
         "hyperparameters": {"hidden_layer": {"type": "Boolean"},
                             "hidden_units": {"type": "Int", "min_value": 64, "max_value": 512,
                                              "conditions": {"hidden_layer": [True]}}}}


def _with(**changes):
    import copy

    spec = copy.deepcopy(VALID)
    for key, value in changes.items():
        if value is None:
            spec.pop(key)
        else:
            spec[key] = value
    return spec


def _hidden_units(**options):
    return {**VALID["hyperparameters"], "hidden_units": options}


@pytest.mark.parametrize("spec, kind, model, key, words", [
    ("search: head\nmetric: val_accuracy\n  bad: indent\nhyperparameters: {}\n", "head", None, "line 3",
     "not valid YAML: mapping values are not allowed here"),
    ("- just\n- a list\n", "head", None, "transfer_head.yaml: expected a mapping", "found list"),
    (_with(searh="head"), "head", None, "searh", "unknown key"),
    (_with(hyperparameters=None), "head", None, "hyperparameters", "missing"),
    (_with(hyperparameters=_hidden_units(min_value=64, max_value=512)), "head", None,
     "hyperparameters.hidden_units", "missing type"),
    (_with(hyperparameters=_hidden_units(type="Integer", min_value=64, max_value=512)), "head", None,
     "hyperparameters.hidden_units", "unknown type 'Integer'; known: Int, Float"),
    (_with(hyperparameters=_hidden_units(type="Int", minimum=64, max_value=512)), "head", None,
     "hyperparameters.hidden_units", "unknown key 'minimum' for Int; known: "),
    (_with(hyperparameters=_hidden_units(type="Int", min_value=64)), "head", None,
     "hyperparameters.hidden_units", "Int needs max_value"),
    (_with(hyperparameters=_hidden_units(type="Float", min_value=0, max_value=1, sampling="log")), "head",
     None, "hyperparameters.hidden_units", "log sampling needs min_value > 0"),
    (_with(hyperparameters=_hidden_units(type="Choice", values=[1, 2], default=3)), "head", None,
     "hyperparameters.hidden_units", "default 3 is not one of values"),
    (_with(hyperparameters=_hidden_units(type="Boolean", conditions={"hidden": [True]})), "head", None,
     "hyperparameters.hidden_units", "unknown parent 'hidden'; known (defined above): hidden_layer"),
    (_with(search="grid"), "head", None, "search", "unknown search 'grid'; known: cnn3v2, head"),
    (_with(search=None), "head", None, "search", "missing"),
    (_with(metric="accuracy"), "head", None, "metric", "unknown metric 'accuracy'; known: val_accuracy, val_loss"),
    (_with(search="cnn3v2", model="cnn4"), "cnn3v2", None, "model", "unknown model 'cnn4'; known: cnn1"),
    (_with(search="cnn3v2"), "cnn3v2", None, "model", "missing"),
    (_with(model="mobilenet_025"), "head", None, "model", "remove model:"),
    (_with(hyperparameters={"dropout_rat": {"type": "Float", "min_value": 0, "max_value": 0.5}}), "head",
     "mobilenet_025", "hyperparameters.dropout_rat", "neither mobilenet_025 nor training knows it; known: "),
    (_with(search="cnn3v2", model="cnn3v2"), "cnn3v2", None, "hyperparameters.hidden_layer",
     "neither cnn3v2 nor training knows it"),
    (VALID, "cnn3v2", None, "search", "the file is for the head search, not cnn3v2"),
])
def test_a_bad_space_file_is_one_line_naming_the_file_and_the_key(tmp_path, spec, kind, model, key, words):
    import yaml

    path = tmp_path / "transfer_head.yaml"
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(ValueError) as caught:
        search.check_space(path, kind, model)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    assert key in message and words in message, message


def test_the_good_space_file_of_the_bad_ones_passes(tmp_path):
    import yaml

    path = tmp_path / "transfer_head.yaml"
    path.write_text(yaml.safe_dump(VALID))
    assert list(search.check_space(path, "head", "mobilenet_025").hyperparameters) == ["hidden_layer", "hidden_units"]


def test_checking_a_space_imports_neither_tensorflow_nor_ray():
    """The CLI imports the search package to build its options and checks a file before Ray starts."""
    script = (
        "import sys; from dogbreeds import search; "
        "search.check_space('cnn3v2', 'cnn3v2'); search.check_space('transfer_head', 'head', 'xception'); "
        "print(sorted(m for m in ('tensorflow', 'ray', 'keras_tuner', 'tf_keras') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_a_head_search_needs_a_transfer_model():
    with pytest.raises(ValueError, match="cnn3v2 is not a transfer model.*known: mobilenet_025"):
        search.check_space("transfer_head", "head", "cnn3v2")


def test_a_space_of_another_kind_fails_before_anything_is_created(tmp_path):
    config = SearchConfig(space="transfer_head")
    with pytest.raises(ValueError, match="transfer_head.yaml: search: the file is for the head search, not cnn3v2"):
        search.search_cnn3v2(DataConfig(data_dir=str(TINY_DIR)), TrainConfig(), config, str(tmp_path / "out"))
    with pytest.raises(ValueError, match="cnn3v2.yaml: search: the file is for the cnn3v2 search, not head"):
        search.search_head(DataConfig(data_dir=str(TINY_DIR)), TrainConfig(model="mobilenet_025"),
                           SearchConfig(space="cnn3v2"), str(tmp_path / "out"))
    argv = ["search", "cnn3v2", "--space", "transfer_head", "--data-dir", str(TINY_DIR),
            "--output", str(tmp_path / "out")]
    assert cli.main(argv) != 0
    assert not (tmp_path / "out").exists()


def test_a_search_saves_its_resolved_configuration(tmp_path):
    space = search.check_space("cnn3v2", "cnn3v2")
    config = SearchConfig(space="cnn3v2", trials=3)
    output = start_search(str(tmp_path / "out"), DataConfig(image_size=32), TrainConfig(epochs=2),
                          config, space, resume=False)
    saved = json.loads((tmp_path / "out" / "search.json").read_text())
    assert saved["search"] == {**vars(config)} and saved["space"]["model"] == "cnn3v2"
    assert saved["data"]["image_size"] == 32 and saved["train"]["epochs"] == 2
    assert saved["space"]["metric"] == "val_accuracy" and saved["versions"]["python"]
    (tmp_path / "out" / "tune" / "search").mkdir(parents=True)  # a search ran here
    with pytest.raises(ValueError, match="holds a search already"):
        start_search(output, DataConfig(), TrainConfig(), SearchConfig(space="cnn3v2", trials=9), space, resume=False)
    assert json.loads((tmp_path / "out" / "search.json").read_text()) == saved  # left alone


@pytest.mark.parametrize("augmented_views, views", [(0, 1), (3, 3)])
def test_the_head_search_takes_its_views_from_the_data_config(monkeypatch, tmp_path, augmented_views, views):
    from dogbreeds import features

    def stop(index, backbone, weights, image_size, views, data_config, *rest):
        raise InterruptedError(views, data_config.augmented_views)

    monkeypatch.setattr(features, "cache_features", stop)
    data_config = DataConfig(data_dir=str(TINY_DIR), image_size=32, augmented_views=augmented_views, cache_dir=str(tmp_path))
    with pytest.raises(InterruptedError) as caught:
        search.search_head(data_config, TrainConfig(model="mobilenet_025", weights=None),
                           SearchConfig(space="transfer_head"), str(tmp_path / "out"))
    assert caught.value.args == (views, augmented_views)


class _Result:
    """What `write_results` reads of a Ray Tune Result."""

    def __init__(self, trial_id, rows, config):
        import pandas as pd

        self.metrics_dataframe = pd.DataFrame(rows)
        self.metrics = {"trial_id": trial_id, "time_total_s": 1.0}
        self.config, self.error, self.path = config, None, f"/nowhere/{trial_id}"


def test_the_space_metric_chooses_the_best_trial(tmp_path):
    names = list(search.check_space("transfer_head").hyperparameters)
    config = {"dropout_rate": 0.1, "hidden_layer": False, "learning_rate": 1e-3, "label_smoothing": 0.0}
    results = [  # the best accuracy is not the lowest loss
        _Result("a", [{"epoch": 1, "val_accuracy": 0.5, "val_loss": 1.2}, {"epoch": 2, "val_accuracy": 0.6, "val_loss": 1.1}], config),
        _Result("b", [{"epoch": 1, "val_accuracy": 0.4, "val_loss": 0.9}, {"epoch": 2, "val_accuracy": 0.45, "val_loss": 1.0}], config),
    ]
    by_loss = write_results(results, names, str(tmp_path), "head", "val_loss")
    assert (by_loss["trial_id"], by_loss["metric"], by_loss["val_loss"]) == ("b", "val_loss", 0.9)
    assert by_loss["val_accuracy"] == 0.4  # the accuracy at the trial's best epoch by loss
    assert json.loads((tmp_path / "best.json").read_text()) == by_loss
    by_accuracy = write_results(results, names, str(tmp_path), "head")
    assert (by_accuracy["trial_id"], by_accuracy["val_accuracy"]) == ("a", 0.6)


def test_an_extended_search_retrains_final_only_if_its_best_trial_changed(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "metrics.json").write_text("{}")
    earlier = {"trial_id": "a", "final": {"validation": 0.5, "test": 0.4}}
    same = {"trial_id": "a"}
    assert final_stands(str(tmp_path), earlier, same) and same["final"] == earlier["final"]
    assert final.is_dir()  # the best trial's final model stands
    unfinished = {"trial_id": "a"}  # a resumed search stopped while training final/: go on with it
    assert not final_stands(str(tmp_path), {"trial_id": "a"}, unfinished) and final.is_dir()
    other = {"trial_id": "b"}
    assert not final_stands(str(tmp_path), earlier, other) and "final" not in other
    assert not final.exists()  # another trial's final model: removed, to be trained afresh


def _rows(output):
    with open(output / "results.csv") as handle:
        return list(csv.DictReader(handle))


def _check_study(output, rows):
    """The search's Optuna study holds every Tune trial of results.csv exactly once, none left
    running, with its epochs as intermediate values and its value the row's best; conditional
    hyperparameters only where their parent is on. Returns the study."""
    from dogbreeds import study

    assert_study_holds(output, [row["trial_id"] for row in rows])
    record = study.load(str(output), "search")
    trials = [t for t in record.trials if t.user_attrs.get("ray_trial_id")]
    space = search.check_space(json.loads((output / "search.json").read_text())["space"]["path"])
    by_id = {row["trial_id"]: row for row in rows}
    for trial in trials:
        row = by_id[trial.user_attrs["ray_trial_id"]]
        assert trial.state.name in ("COMPLETE", "PRUNED"), trial
        assert trial.user_attrs["node"] and trial.user_attrs["trial_dir"].endswith(row["trial_id"])
        assert sorted(trial.intermediate_values) == list(range(1, int(row["epochs"]) + 1))
        assert max(trial.intermediate_values.values()) == pytest.approx(float(row["val_accuracy"]))
        assert (trial.state.name == "PRUNED") == ("pruned" in trial.user_attrs)
        for name, options in space.hyperparameters.items():
            if "conditions" in options:
                (parent, allowed), = options["conditions"].items()
                assert (name in trial.params) == (trial.params.get(parent) in allowed), trial.params
    return record


@pytest.mark.slow
def test_cnn3v2_search_of_two_trials(ray_cluster, readme_search_cnn3v2_dir):
    # The README's `search cnn3v2` (2 trials of 2 epochs at 32 px), run once for the session.
    tmp_path = readme_search_cnn3v2_dir
    rows = _rows(tmp_path)
    assert len(rows) == 2 and all(row["status"] == "done" for row in rows)
    assert all(0 <= float(row["val_accuracy"]) <= 1 and row["hp_filters_1"] for row in rows)
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["val_accuracy"] == max(float(row["val_accuracy"]) for row in rows)
    _check_study(tmp_path, rows)
    for row in rows:  # each trial a real Ray Train run, its curves kept even if ASHA stopped it
        trial = tmp_path / "trials" / row["trial_id"]
        history = json.loads((trial / "history.json").read_text())
        # The history may hold one epoch more than Tune saw when ASHA stopped the trial.
        assert [r["epoch"] for r in history] == list(range(1, len(history) + 1))
        assert len(history) >= int(row["epochs"]) >= 1
        assert (trial / "tensorboard").is_dir()
        if (trial / "metrics.json").exists():  # trials never touch the test split
            assert "test" not in json.loads((trial / "metrics.json").read_text())
    final = json.loads((tmp_path / "final" / "metrics.json").read_text())
    assert final["test"]["num_images"] == 600  # retrained without the subset, tested once
    # A trial that ASHA stopped released its Ray Train run's CPUs (no leaked placement groups).
    deadline = time.time() + 60
    while time.time() < deadline and ray_cluster.available_resources().get("CPU", 0) < ray_cluster.cluster_resources()["CPU"]:
        time.sleep(1)
    assert ray_cluster.available_resources().get("CPU", 0) == ray_cluster.cluster_resources()["CPU"]
    assert json.loads((tmp_path / "final" / "config.json").read_text())["data"]["subset_per_class"] is None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [os.path.join(d, n) for d, _, names in os.walk(tmp_path / "tune") for n in names if n.startswith("events.out")]
    assert len(events) == 2
    for path in events:  # Tune's TensorBoard logger writes the HParams view of each trial
        accumulator = EventAccumulator(path)
        accumulator.Reload()
        assert "_hparams_/session_start_info" in accumulator.PluginTagToContent("hparams")
        assert "ray/tune/val_accuracy" in accumulator.Tags()["scalars"]


def _toy_trial(config):
    """A Tune trial without TensorFlow: its accuracy grows with the learning rate, the hidden
    layer and the epoch, so that ASHA has trials to stop."""
    from ray import tune

    for epoch in range(1, 5):
        accuracy = min(1.0, config["learning_rate"] * 50 + 0.01 * epoch + (0.2 if config.get("hidden_layer") else 0))
        tune.report({"val_accuracy": accuracy, "epoch": epoch})


@pytest.mark.slow
def test_a_search_is_an_optuna_study_and_extends(ray_cluster, tmp_path):
    """Ray Tune's trials in the search's study: sampled define-by-run (a conditional
    hyperparameter only where its parent is on), an intermediate value per epoch, those ASHA
    stopped PRUNED; then 3 trials extended to 5 run exactly 2 new ones, on the same study."""
    from ray import tune

    from dogbreeds import study

    space = search.check_space("transfer_head")
    trainable = tune.with_resources(_toy_trial, {"CPU": 1})
    config = SearchConfig(space="transfer_head", trials=3, scheduler="asha")
    first = run_tuner(trainable, space, config, str(tmp_path), False, seed=0)
    more = run_tuner(trainable, space, dataclasses.replace(config, trials=5), str(tmp_path), True, seed=0)
    first_ids = {result.metrics["trial_id"] for result in first}
    assert len(first) == 3 and len(more) == 5
    record = study.load(str(tmp_path), "search")
    trials = {t.user_attrs["ray_trial_id"]: t for t in record.trials}
    assert len(record.trials) == len(trials) == 5 and first_ids < set(trials)
    new = [t for trial_id, t in trials.items() if trial_id not in first_ids]
    assert len(new) == 2 and all(t.params not in [o.params for o in record.trials if o not in new] for t in new)
    states = {t.state.name for t in record.trials}
    assert "PRUNED" in states and states <= {"COMPLETE", "PRUNED"}, states
    for trial in record.trials:
        assert ("hidden_units" in trial.params) == trial.params["hidden_layer"]
        epochs = sorted(trial.intermediate_values)
        assert epochs == list(range(1, trial.user_attrs["epochs"] + 1))
        if trial.state.name == "PRUNED":
            assert trial.user_attrs["pruned"].startswith("ASHA") and len(epochs) < 4
        else:
            assert len(epochs) == 4 and trial.value == max(trial.intermediate_values.values())
    importance = study.importance(str(tmp_path), "search")
    assert set(importance) <= set(space.hyperparameters) and importance["learning_rate"] == max(importance.values())


def _head_argv(output, features_dir, cache_dir, trials, epochs="6"):
    return [
        "search", "head", "--backbone", "mobilenet_025", "--weights", str(MOBILENET_WEIGHTS),
        "--data-dir", str(TINY_DIR), "--image-size", "96", "--epochs", epochs, "--views", "1",
        "--trials", str(trials), "--scheduler", "none", "--features-dir", str(features_dir),
        "--cache-dir", cache_dir, "--output", str(output),
    ]


@pytest.fixture(scope="module")
def head_features(readme_search_head_dir):
    """The features the README's head search computed (96 px, 1 view), which the searches here
    reuse."""
    return readme_search_head_dir / "features"


@pytest.mark.slow
def test_head_search(ray_cluster, readme_search_head_dir, head_features, cache_dir, tmp_path):
    # The README's `search head`, run once for the session.
    output = readme_search_head_dir
    rows = _rows(output)
    assert len(rows) == json.loads((output / "search.json").read_text())["search"]["trials"] == 4
    _check_study(output, rows)
    best = json.loads((output / "best.json").read_text())
    final = json.loads((output / "final" / "metrics.json").read_text())
    # The joined model (photo in, breed out) is the chosen epoch's head: it agrees with the head
    # trained on features to a photo or two (240 validation photos).
    assert abs(final["validation"]["top1"] - best["val_accuracy"]) < 0.01
    assert final["test"]["top1"] > 0.35  # chance is 1/6
    # A second search over the same data reuses the features.
    assert cli.main(_head_argv(tmp_path / "again", head_features, cache_dir, 1)) == 0
    again = json.loads((tmp_path / "again" / "best.json").read_text())
    assert again["features"]["cached"] is True and best["features"]["cached"] is False


@pytest.mark.slow
def test_fine_tuning_refuses_a_split_other_than_its_head_searchs(readme_search_head_dir, tmp_path, capsys):
    """With another seed, photos that trained the head would validate fine-tuning: one line, nothing run."""
    argv = ["search", "fine_tune", "--head-search", str(readme_search_head_dir), "--data-dir", str(TINY_DIR),
            "--seed", "3", "--output", str(tmp_path / "out")]
    assert cli.main(argv) == 1
    assert "split the photos as its head search did: seed 0 there, 3 here" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.long  # over a minute: the second tier
def test_killed_search_resumes_without_rerunning_finished_trials(cache_dir, head_features, tmp_path):
    """The search's driver is killed (with the local Ray it started) while the dashboard shows
    its study live; --resume finishes it, and with --trials 6 extends it by two new trials."""
    output = tmp_path / "run"
    argv = [sys.executable, "-m", "dogbreeds.cli", *_head_argv(output, head_features, cache_dir, 4, epochs="8")]
    driver = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # While it runs, the dashboard shows its study: finished trials and their epochs.
    deadline = time.time() + 300
    while time.time() < deadline and not (output / "study.journal").exists() and driver.poll() is None:
        time.sleep(0.2)
    port = free_port()
    dashboard = subprocess.Popen([sys.executable, "-m", "dogbreeds.cli", "dashboard", str(output), "--port", str(port)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = _dashboard_trials(port, lambda trials: any(t["state"] == "Complete" for t in trials), driver)
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)
    assert driver.poll() is None, "the search ended before the dashboard showed it"
    finished_seen = [t for t in seen if t["state"] == "Complete"]
    assert finished_seen and all(len(t["intermediate_values"]) == 8 for t in finished_seen), seen
    deadline = time.time() + 600
    while time.time() < deadline and len(finished_in_tune_state(output)) < 2 and driver.poll() is None:
        time.sleep(0.2)
    finished = finished_in_tune_state(output)
    assert len(finished) >= 2 and driver.poll() is None, "the search should be half way"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    before = {t: (output / "trials" / t / "head.weights.h5").stat().st_mtime_ns for t in finished}
    resumed = subprocess.run(argv + ["--resume", "--trials", "6"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = _rows(output)
    assert len(rows) == 6 and len({row["trial_id"] for row in rows}) == 6
    assert all(row["status"] == "done" for row in rows)
    first = finished_in_tune_state(output)
    assert len(first) == 4 and len(finished_in_tune_state(output, "search-2") - first) == 2
    assert json.loads((output / "best.json").read_text())["trials"] == 6
    for trial_id, mtime in before.items():  # finished trials were not run again
        assert (output / "trials" / trial_id / "head.weights.h5").stat().st_mtime_ns == mtime
    assert_study_holds(output, [row["trial_id"] for row in rows])


def _dashboard_trials(port, enough, driver, timeout=600) -> list[dict]:
    """The trials `dogbreeds dashboard` on `port` lists for its one study, polled until
    `enough(trials)` (or the search `driver` ends)."""
    deadline, trials = time.time() + timeout, []
    while time.time() < deadline and driver.poll() is None and not enough(trials):
        try:
            studies = dashboard_studies(port)
            if studies:
                (trials,) = studies.values()
        except OSError:
            pass
        time.sleep(0.5)
    return trials


@pytest.mark.slow
@pytest.mark.long  # over a minute: the second tier
def test_cached_features_and_end_to_end_give_the_same_head(ray_cluster, head_features, cache_dir, tmp_path):
    """The same head (hyperparameters, epochs, augmented view) trained on cached features (the
    README head search's) and trained end to end on the photos reaches the same validation
    accuracy within noise."""
    from dogbreeds import data
    from dogbreeds.features import cache_features
    from dogbreeds.train import run_training

    data_config = DataConfig(data_dir=str(TINY_DIR), image_size=96, cache_dir=cache_dir, augmented_views=1)
    train_config = TrainConfig(model="mobilenet_025", weights=str(MOBILENET_WEIGHTS), epochs=4)
    index = data.load_index(data_config)
    features = cache_features(index, "mobilenet_025", str(MOBILENET_WEIGHTS), 96, 1, data_config, str(head_features))
    assert features["cached"]
    (tmp_path / "cached").mkdir()
    _, history = fit_head({}, train_config, features, index.num_classes, str(tmp_path / "cached"))
    end_to_end = run_training(data_config, train_config, str(tmp_path / "e2e"), evaluate_test=False)
    cached_accuracy = history[-1]["val_accuracy"]
    e2e_accuracy = json.loads((tmp_path / "e2e" / "history.json").read_text())[-1]["val_accuracy"]
    print("validation accuracy: cached", cached_accuracy, "end to end", e2e_accuracy, end_to_end["validation"]["top1"])
    assert cached_accuracy > 0.35 and e2e_accuracy > 0.35
    assert abs(cached_accuracy - e2e_accuracy) < 0.08
    assert np.load(features["train"])["features"].shape[0] == len(index.splits["train"])


def test_feature_job_streams_blocks_into_the_views_training_sees(ray_cluster, cache_dir, tmp_path):
    """The feature job (blocks of 4 photos, 2 actors) gives the backbone's features of exactly
    the fixed views `make_dataset` trains on end to end, each with its photo's label; a photo
    that does not decode is skipped and counted, and a split of which none decodes is an error."""
    import ray

    from dogbreeds import data
    from dogbreeds.features import extract_features

    config = DataConfig(data_dir=str(TINY_DIR), image_size=32, augmented_views=2, cache_dir=cache_dir)
    split = data.load_index(config).splits["validation"].take(range(10))
    weights = str(MOBILENET_WEIGHTS)
    features, labels, skipped = extract_features(split, "mobilenet_025", weights, 32, 2, config,
                                                 actors=2, batch_size=6, block_photos=4)
    images, _, _ = data.load_images(split, 32, config)
    views = next(iter(data.make_dataset(images, split.labels, 6, 20, config, training=True)))
    backbone = models.build_backbone("mobilenet_025", 32, weights)
    expected = backbone.predict_on_batch(views[0])
    assert features.shape == expected.shape == (20, expected.shape[1]) and skipped == []
    # Ray Data's warning, every 30 s, that a feature actor requests no memory is off.
    assert ray.data.DataContext.get_current().issue_detectors_config.high_memory_detector_config.detection_time_interval_s == -1
    # make_dataset shuffles: match each of its views to the job's nearest feature row.
    distances = np.abs(expected[:, None, :] - features[None, :, :]).max(axis=2)
    nearest = distances.argmin(axis=1)
    assert sorted(nearest) == list(range(20)) and distances.min(axis=1).max() < 1e-4
    np.testing.assert_array_equal(labels[nearest], np.argmax(views[1], axis=1))
    np.testing.assert_array_equal(labels, np.tile(split.labels, 2))

    bad = tmp_path / "cut.jpg"
    bad.write_bytes(open(split.keys[0], "rb").read()[:500])
    with_bad = data.Split([split.keys[1], str(bad), split.keys[2]], split.labels[[1, 0, 2]], "validation")
    features, labels, skipped = extract_features(with_bad, "mobilenet_025", weights, 32, 0, config, block_photos=2)
    np.testing.assert_allclose(features, backbone.predict_on_batch(images[[1, 2]].astype(np.float32)), atol=1e-4)
    assert skipped == [(str(bad), "truncated JPEG image")] and list(labels) == list(split.labels[[1, 2]])
    with pytest.raises(ValueError, match="^no photo of validation decodes: 1 truncated JPEG image"):
        extract_features(data.Split([str(bad)], split.labels[:1], "validation"), "mobilenet_025", weights, 32, 0, config)
    with pytest.raises(ValueError, match="^the validation split has no photos$"):
        extract_features(data.Split([], split.labels[:0], "validation"), "mobilenet_025", weights, 32, 0, config)


@pytest.mark.slow
def test_feature_job_holds_blocks_not_the_split(readme_bench_heads):
    """The README's `bench heads`: at its peak the feature job held far less in Ray's object
    store than the decoded train photos (which it once put there as one object)."""
    peak, decoded = readme_bench_heads["feature_job_object_store_peak_mb"], readme_bench_heads["decoded_train_photos_mb"]
    assert decoded > 20 and 0 < peak < decoded / 2, readme_bench_heads
