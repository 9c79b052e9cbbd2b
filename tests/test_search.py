"""The searches for real on a local Ray: the search-space files, a 2-trial search of each
kind, killing and resuming a search, and a head trained on cached features against the same
head trained end to end on the photos."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dogbreeds import cli, models, search
from dogbreeds.config import DataConfig, TrainConfig
from tests.conftest import MOBILENET_WEIGHTS, ROOT, TINY_DIR

SPACE_FILES = sorted((ROOT / "search_spaces").glob("*.yaml"))


def test_there_are_both_search_spaces():
    assert [p.stem for p in SPACE_FILES] == ["cnn3v2", "transfer_head"]


@pytest.mark.parametrize("path", SPACE_FILES, ids=lambda p: p.stem)
def test_space_file_parses_and_samples(path):
    text = path.read_text()
    assert text.startswith("#") and "dogbreeds search" in text.split("\nsearch:")[0]
    hp, spec = search.load_space(path)
    space = search.to_tune_space(hp)
    assert set(space) == {p.name for p in hp.space}
    model = spec.get("model", "mobilenet_025")
    for _ in range(30):
        config = {name: domain.sample() for name, domain in space.items()}
        values = search.active_values(hp, config)
        for parameter in hp.space:
            settings = parameter.get_config()
            if parameter.name in values and "min_value" in settings:
                assert settings["min_value"] <= values[parameter.name] <= settings["max_value"] + 1e-9
        model_hparams, train_overrides = search.split_values(model, values)
        models.resolve_hparams(model, model_hparams)  # every key is the model's or training's
        assert set(train_overrides) <= {"learning_rate", "label_smoothing"}


def test_conditions_leave_out_inactive_values():
    hp, _ = search.load_space("transfer_head")
    config = {"dropout_rate": 0.1, "hidden_layer": False, "hidden_units": 128, "learning_rate": 1e-3, "label_smoothing": 0.0}
    assert "hidden_units" not in search.active_values(hp, config)
    assert search.active_values(hp, {**config, "hidden_layer": True})["hidden_units"] == 128


def test_unknown_space_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: \\['cnn3v2', 'transfer_head'\\]"):
        search.load_space("nope")


def _rows(output):
    with open(output / "results.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_cnn3v2_search_of_two_trials(ray_cluster, cache_dir, tmp_path):
    argv = [
        "search", "cnn3v2", "--data-dir", str(TINY_DIR), "--image-size", "32", "--epochs", "2",
        "--trials", "2", "--concurrent-trials", "2", "--subset-per-class", "60",
        "--cache-dir", cache_dir, "--output", str(tmp_path),
    ]
    assert cli.main(argv) == 0
    rows = _rows(tmp_path)
    assert len(rows) == 2 and all(row["status"] == "done" for row in rows)
    assert all(0 <= float(row["val_accuracy"]) <= 1 and row["hp_filters_1"] for row in rows)
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["val_accuracy"] == max(float(row["val_accuracy"]) for row in rows)
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


def _head_argv(output, features_dir, cache_dir, trials, epochs="6"):
    return [
        "search", "head", "--backbone", "mobilenet_025", "--weights", str(MOBILENET_WEIGHTS),
        "--data-dir", str(TINY_DIR), "--image-size", "96", "--epochs", epochs, "--views", "1",
        "--trials", str(trials), "--scheduler", "none", "--features-dir", str(features_dir),
        "--cache-dir", cache_dir, "--output", str(output),
    ]


@pytest.mark.slow
def test_head_search_of_two_trials(ray_cluster, cache_dir, tmp_path):
    assert cli.main(_head_argv(tmp_path / "run", tmp_path / "features", cache_dir, 2)) == 0
    rows = _rows(tmp_path / "run")
    assert len(rows) == 2
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    final = json.loads((tmp_path / "run" / "final" / "metrics.json").read_text())
    # The joined model (photo in, breed out) agrees with the head trained on features.
    assert abs(final["validation"]["top1"] - best["val_accuracy"]) < 0.02
    assert final["test"]["top1"] > 0.35  # chance is 1/6
    # A second search over the same data reuses the features.
    assert cli.main(_head_argv(tmp_path / "again", tmp_path / "features", cache_dir, 1)) == 0
    again = json.loads((tmp_path / "again" / "best.json").read_text())
    assert again["features"]["cached"] is True and best["features"]["cached"] is False


def _finished_in_tune_state(output):
    """Trial ids that Tune's own saved state records as finished."""
    states = sorted((output / "tune" / "search").glob("experiment_state-*.json"))
    if not states:
        return set()
    try:
        trials = [json.loads(t[0]) for t in json.loads(states[-1].read_text())["trial_data"]]
    except (ValueError, KeyError):  # being written
        return set()
    return {t["trial_id"] for t in trials if t["status"] == "TERMINATED"}


@pytest.mark.slow
def test_killed_search_resumes_without_rerunning_finished_trials(cache_dir, tmp_path):
    """The search's driver is killed (with the local Ray it started); --resume finishes it."""
    output, features = tmp_path / "run", tmp_path / "features"
    argv = [sys.executable, "-m", "dogbreeds.cli", *_head_argv(output, features, cache_dir, 5, epochs="12")]
    driver = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and len(_finished_in_tune_state(output)) < 2 and driver.poll() is None:
        time.sleep(0.2)
    finished = _finished_in_tune_state(output)
    assert len(finished) >= 2 and driver.poll() is None, "the search should be half way"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    before = {t: (output / "trials" / t / "head.weights.h5").stat().st_mtime_ns for t in finished}
    resumed = subprocess.run(argv + ["--resume"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = _rows(output)
    assert len(rows) == 5 and len({row["trial_id"] for row in rows}) == 5
    assert all(row["status"] == "done" for row in rows)
    for trial_id, mtime in before.items():  # finished trials were not run again
        assert (output / "trials" / trial_id / "head.weights.h5").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_cached_features_and_end_to_end_give_the_same_head(ray_cluster, cache_dir, tmp_path):
    """The same head (hyperparameters, epochs, augmented views) trained on cached features
    and trained end to end on the photos reaches the same validation accuracy within noise."""
    from dogbreeds import data
    from dogbreeds.features import cache_features
    from dogbreeds.train import run_training

    data_config = DataConfig(data_dir=str(TINY_DIR), image_size=96, cache_dir=cache_dir, augmented_views=2)
    train_config = TrainConfig(model="mobilenet_025", weights=str(MOBILENET_WEIGHTS), epochs=4)
    index = data.load_index(data_config)
    features = cache_features(index, "mobilenet_025", str(MOBILENET_WEIGHTS), 96, 2, data_config, str(tmp_path / "features"))
    (tmp_path / "cached").mkdir()
    _, history = search.fit_head({}, train_config, features, index.num_classes, str(tmp_path / "cached"))
    end_to_end = run_training(data_config, train_config, str(tmp_path / "e2e"), evaluate_test=False)
    cached_accuracy = history[-1]["val_accuracy"]
    e2e_accuracy = json.loads((tmp_path / "e2e" / "history.json").read_text())[-1]["val_accuracy"]
    print("validation accuracy: cached", cached_accuracy, "end to end", e2e_accuracy, end_to_end["validation"]["top1"])
    assert cached_accuracy > 0.35 and e2e_accuracy > 0.35
    assert abs(cached_accuracy - e2e_accuracy) < 0.08
    train_features = np.load(features["train"])
    assert train_features["features"].shape[0] == 2 * len(index.splits["train"])
