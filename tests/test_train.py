"""Real training on a local Ray, on the real tiny_dogs_64 photos: the README's runs, from
scratch on two Ray Train workers and by transfer learning on the real ImageNet weights; and a
worker killed mid-run."""

import json
import os
import pathlib
import threading
import time

import psutil
import pytest
import tf_keras as keras

from dogbreeds import cli
from tests.conftest import TINY_DIR

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cnn3v2_run(cnn3v2_run_dir):
    """The README's `train cnn3v2` (8 epochs at 64 px on two workers; tests/conftest.py)."""
    return cnn3v2_run_dir, json.loads((cnn3v2_run_dir / "metrics.json").read_text())


def test_cnn3v2_on_two_workers_beats_chance(cnn3v2_run):
    output, metrics = cnn3v2_run
    # Two workers, and one MultiWorkerMirroredStrategy over both (each alone would count 1).
    assert metrics["workers"] == metrics["replicas_in_sync"] == 2 and metrics["epochs_run"] >= 1
    test = metrics["test"]
    assert test["num_images"] == 600
    assert test["top1"] > 0.25, test  # chance is 1/6
    assert test["top5"] >= test["top1"] and 0 <= test["precision"] <= 1
    assert set(test["per_breed_accuracy"]) == set(metrics["class_names"])
    assert (output / "confusions.csv").read_text().startswith("true_breed,predicted_breed")
    assert any("events" in name for _, _, names in os.walk(output / "tensorboard") for name in names)
    config = json.loads((output / "config.json").read_text())
    assert config["train"]["workers"] == 2 and config["versions"]["ray"].startswith("2.60")
    model = keras.models.load_model(output / "model.keras")
    assert model.input_shape == (None, 64, 64, 3) and model.output_shape == (None, 6)
    # The run's model holds its weights, not Adam's two moments of each: a third of the size
    # (tf-keras reads a compiled Xception's back in 40 s, and a bundle copies it).
    assert getattr(model, "optimizer", None) is None


def test_transfer_on_imagenet_weights_beats_training_from_scratch(cnn3v2_run, mobilenet_run_dir):
    """The README's two runs on the same photos: mobilenet_025 on ImageNet weights (128 px, not
    the backbone's 224) in no more epochs than cnn3v2 from scratch. Measured: test top-1 0.57
    in 5 epochs against cnn3v2's 0.29 in 8."""
    output, scratch = cnn3v2_run
    transfer_dir = pathlib.Path(mobilenet_run_dir)
    transfer = json.loads((transfer_dir / "metrics.json").read_text())
    epochs = {name: json.loads((run / "config.json").read_text())["train"]["epochs"]
              for name, run in (("transfer", transfer_dir), ("scratch", output))}
    assert transfer["model"] == "mobilenet_025" and epochs["transfer"] <= epochs["scratch"]
    assert transfer["test"]["num_images"] == scratch["test"]["num_images"]
    print("test top-1: cnn3v2", scratch["test"]["top1"], "mobilenet_025", transfer["test"]["top1"])
    assert transfer["test"]["top1"] > scratch["test"]["top1"] + 0.1


def test_existing_run_needs_resume(cnn3v2_run):
    output, _ = cnn3v2_run
    argv = ["train", "cnn3v2", "--data-dir", str(TINY_DIR), "--output", str(output)]
    assert cli.main(argv) == 1


def _train_workers():
    """The Ray Train workers of this test's Ray (its processes descend from this one): other
    test sessions on the machine run workers of their own."""
    def is_worker(process):
        try:
            return "RayTrainWorker" in " ".join(process.cmdline())
        except psutil.Error:  # ended meanwhile
            return False

    return [p for p in psutil.Process().children(recursive=True) if is_worker(p)]


@pytest.mark.long  # over a minute: the second tier
def test_a_killed_worker_resumes_from_its_checkpoint(ray_cluster, cache_dir, tmp_path):
    argv = [
        "train", "cnn3v2", "--data-dir", str(TINY_DIR), "--image-size", "32", "--epochs", "6",
        "--workers", "2", "--output", str(tmp_path), "--cache-dir", cache_dir,
    ]
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("code", cli.main(argv)))
    thread.start()
    checkpoints = tmp_path / "ray" / "train"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(checkpoints.glob("checkpoint_*"))) < 2:
        time.sleep(0.5)
    victims = _train_workers()
    assert len(victims) == 2, "two Ray Train workers should be running"
    victims[1].kill()
    thread.join(timeout=600)
    assert outcome.get("code") == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] >= 1  # from a checkpoint, not from scratch
    history = json.loads((tmp_path / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, len(history) + 1))


def test_each_of_two_workers_validates_its_whole_share_at_its_own_batch(ray_cluster, cache_dir, tmp_path):
    """With 8 photos a step on each of two workers, an epoch's validation covers the 240
    validation photos once, so it scores the one epoch's model as the final evaluation on the
    whole split does. (Given a plain dataset, Keras took its batch for the global batch and gave
    each worker half of it: each trained on half its share an epoch and validated on half.)"""
    import numpy as np

    from dogbreeds import data
    from dogbreeds.config import DataConfig

    argv = [
        "train", "cnn3v2", "--data-dir", str(TINY_DIR), "--image-size", "32", "--epochs", "1",
        "--workers", "2", "--per-worker-batch-size", "8", "--output", str(tmp_path), "--cache-dir", cache_dir,
    ]
    assert cli.main(argv) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    (epoch,) = json.loads((tmp_path / "history.json").read_text())
    assert metrics["replicas_in_sync"] == 2 and metrics["validation"]["num_images"] == 240
    # The epoch's validation loss is the model's mean loss over the whole split, to float32's
    # roundings (2.5e-4 to 3.6e-4 of it on these machines; a mean over half the split strays
    # by about 4%). Accuracy can differ by the photos whose two likeliest breeds are nearly
    # tied, as roundings move each probability by about that much: on one CPU a photo, on
    # another (AVX-512 kernels) two, each of them within 1e-3.
    config = DataConfig(data_dir=str(TINY_DIR), cache_dir=cache_dir, image_size=32)
    images, labels, _ = data.load_images(data.load_index(config).splits["validation"], 32, config)
    probabilities = keras.models.load_model(tmp_path / "model.keras").predict(images.astype("float32"), verbose=0)
    loss = -np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1)).mean()
    assert epoch["val_loss"] == pytest.approx(float(loss), rel=1e-3)
    likeliest = np.sort(probabilities, axis=1)
    near_ties = int((likeliest[:, -1] - likeliest[:, -2] < 2e-3).sum())
    assert epoch["val_accuracy"] == pytest.approx(metrics["validation"]["top1"], abs=(near_ties + 1) / 240 + 1e-6)


def test_the_learning_rate_scales_with_the_workers_and_warms_up_linearly(tmp_path):
    """Two workers' global batch is twice one's: the rate doubles, reached over the first 1.5
    epochs' steps (6 of 4 a epoch here), then left alone."""
    import numpy as np

    from dogbreeds.config import TrainConfig
    from dogbreeds.train import build_callbacks, compile_model

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(80, 8)).astype("float32"), keras.utils.to_categorical(rng.integers(0, 3, 80), 3)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, activation="softmax")])
    config = TrainConfig(epochs=3, learning_rate=0.01, workers=2, warmup_epochs=1.5)
    compile_model(model, config)
    rates = []
    record = keras.callbacks.LambdaCallback(on_train_batch_begin=lambda batch, logs: rates.append(
        float(keras.backend.get_value(model.optimizer.learning_rate))))
    model.fit(x[:64], y[:64], batch_size=16, epochs=3, validation_data=(x[64:], y[64:]), verbose=0,
              callbacks=[*build_callbacks(config, str(tmp_path)), record])
    expected = [0.02 * min(1.0, step / 6) for step in range(1, 13)]
    np.testing.assert_allclose(rates, expected, rtol=1e-6)


@pytest.mark.parametrize("keep_best_by", ["val_accuracy", "val_loss"])
def test_a_run_keeps_the_epoch_its_metric_scores_best(tmp_path, keep_best_by):
    """A search trial's model is its best epoch by the search's metric (what results.csv
    reports and picks by), not the last one nor the best by validation loss; a plain run keeps
    early stopping's best validation loss, as the study did."""
    import dataclasses

    import numpy as np

    from dogbreeds.config import TrainConfig
    from dogbreeds.train import build_callbacks

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(96, 8)).astype("float32"), keras.utils.to_categorical(rng.integers(0, 3, 96), 3)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(keras.optimizers.Adam(0.3), "categorical_crossentropy", ["accuracy"])
    config = dataclasses.replace(TrainConfig(epochs=8), keep_best_by=keep_best_by)
    weights = []
    keep = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: weights.append(model.get_weights()))
    history = model.fit(x[:64], y[:64], validation_data=(x[64:], y[64:]), epochs=8, verbose=0,
                        callbacks=[keep, *build_callbacks(config, str(tmp_path))]).history
    scores = np.asarray(history[keep_best_by])
    best = int(np.argmax(scores) if keep_best_by == "val_accuracy" else np.argmin(scores))
    if keep_best_by == "val_accuracy":  # the case tells the best epoch from the last and from val_loss's
        assert best not in (len(scores) - 1, int(np.argmin(history["val_loss"]))), history
    for kept, expected in zip(model.get_weights(), weights[best]):
        np.testing.assert_array_equal(kept, expected)


def test_two_workers_see_disjoint_shares_of_every_epoch(cache_dir):
    """Each Ray Train worker trains on its own every-second photo: in each epoch (its steps of
    its repeated, reshuffled share) the two workers' examples are different photos, and two
    workers of 16 photos a step take the steps and photos of one worker of 32."""
    import dataclasses

    import numpy as np

    from dogbreeds import data
    from dogbreeds.config import DataConfig, TrainConfig
    from dogbreeds.train import _load_worker_data

    # No augmentation, so that every example is one of the cached photos, byte for byte.
    config = DataConfig(data_dir=str(TINY_DIR), cache_dir=cache_dir, image_size=16, rotation_factor=0.0,
                        horizontal_flip=False)
    photos = data.load_images(data.load_index(config).splits["train"], 16, config)[0]
    number = {image.tobytes(): position for position, image in enumerate(photos)}
    assert len(number) == len(photos)  # every photo tells itself apart

    def epochs(rank: int, world_size: int, batch_size: int, count: int = 2) -> list[list[int]]:
        train_config = TrainConfig(model="cnn3v2", per_worker_batch_size=batch_size)
        share = _load_worker_data(config, train_config, rank, world_size)
        batches = iter(share.train_dataset)
        return [[number[image.numpy().astype(np.uint8).tobytes()]
                 for _ in range(share.steps_per_epoch) for image in next(batches)[0]]
                for _ in range(count)]

    alone = epochs(0, 1, 32)
    first, second = epochs(0, 2, 16), epochs(1, 2, 16)
    for mine, theirs, one in zip(first, second, alone):
        assert not set(mine) & set(theirs)
        assert all(p % 2 == 0 for p in mine) and all(p % 2 == 1 for p in theirs)  # every second photo
        assert len(mine) == len(theirs) and len(mine) + len(theirs) == len(one)
        # An epoch is steps of a repeated stream: it may end in the share's next pass, so a few
        # photos come twice (16 of 2,128 in the second epoch).
        assert len(set(mine) | set(theirs)) >= 0.98 * len(one) >= 0.95 * len(photos)
    assert first[0] != first[1]  # reshuffled each epoch
