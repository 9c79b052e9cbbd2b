"""The evaluation metrics on predictions whose right answers can be counted by hand."""

import csv
import subprocess
import sys
import textwrap

import numpy as np

from dogbreeds import evaluate
from tests.conftest import ROOT

NAMES = ["beagle", "boxer", "pug", "whippet", "vizsla", "saluki"]


def test_metrics_and_confusions_counted_by_hand(tmp_path):
    labels = np.array([0, 0, 0, 1, 1, 2])
    # Predicted: 0, 1, 1, 1, 0, 2 -> 3 of 6 right; pairs (0->1) twice, (1->0) once.
    probabilities = np.full((6, 6), 0.01)
    for row, (top, second) in enumerate([(0, 3), (1, 0), (1, 2), (1, 4), (0, 1), (2, 5)]):
        probabilities[row, top], probabilities[row, second] = 0.6, 0.3
    metrics, confusions = evaluate.evaluate_predictions(probabilities, labels, NAMES)
    assert metrics["top1"] == 3 / 6 and metrics["num_images"] == 6
    assert metrics["top5"] == 1.0
    # Recall: beagle 1/3, boxer 1/2, pug 1/1; precision: beagle 1/2, boxer 1/3, pug 1/1.
    assert np.isclose(metrics["recall"], (1 / 3 + 1 / 2 + 1) / 3)
    assert np.isclose(metrics["precision"], (1 / 2 + 1 / 3 + 1) / 3)
    assert metrics["per_breed_accuracy"] == {"beagle": 1 / 3, "boxer": 0.5, "pug": 1.0}
    assert [(c["true_breed"], c["predicted_breed"], c["count"]) for c in confusions] == [
        ("beagle", "boxer", 2),
        ("boxer", "beagle", 1),
    ]
    path = tmp_path / "confusions.csv"
    evaluate.write_confusions(str(path), confusions)
    rows = list(csv.DictReader(path.open()))
    assert rows[0] == {"true_breed": "beagle", "predicted_breed": "boxer", "count": "2", "fraction_of_true": "0.6667"}


def test_top5_misses_when_the_label_is_sixth():
    probabilities = np.array([[0.3, 0.25, 0.2, 0.15, 0.06, 0.04]])
    metrics, _ = evaluate.evaluate_predictions(probabilities, np.array([5]), NAMES)
    assert metrics["top5"] == 0.0 and metrics["top1"] == 0.0


def _asymmetric_model(outputs: int = 1):
    """A real tf_keras model that tells a photo from its mirror image (a dense layer on the
    pixels), with one output or two (probabilities and features, as novelty's feature model)."""
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    features = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    probabilities = keras.layers.Dense(4, activation="softmax", name="predictions")(features)
    return keras.Model(inputs, [probabilities, features] if outputs == 2 else probabilities)


def test_test_time_flip_answers_a_photo_and_its_mirror_image_alike():
    model = _asymmetric_model()
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    mirrored = images[:, :, ::-1]

    def predict(photos, flip=False, batch_size=64):
        return evaluate.predict_in_batches(model.predict_on_batch, photos, flip, batch_size)

    plain, plain_mirrored = predict(images), predict(mirrored)
    assert plain.shape == (5, 4) and not np.allclose(plain, plain_mirrored, atol=1e-3)
    # Batches of 2 and of 3 (a batch and its mirror go in together): the same mean.
    flipped = predict(images, True, batch_size=2)
    np.testing.assert_allclose(flipped, (plain + plain_mirrored) / 2, atol=1e-6)
    np.testing.assert_allclose(flipped, predict(mirrored, True, batch_size=3), atol=1e-6)
    probabilities, features = evaluate.predict_in_batches(_asymmetric_model(2).predict_on_batch, images, True)
    np.testing.assert_allclose(features, (images / 255 + mirrored / 255).reshape(5, -1) / 2, atol=1e-6)
    assert probabilities.shape == (5, 4)
    # Evaluation with the flip scores its answers right, where the photo's alone differ (2 of 5).
    labels = np.argmax(flipped, axis=1)
    assert evaluate.evaluate_model(model, images, labels, NAMES[:4], test_time_flip=True)[0]["top1"] == 1.0
    assert evaluate.evaluate_model(model, images, labels, NAMES[:4])[0]["top1"] < 1.0


def test_evaluation_holds_a_batch_at_a_time_not_a_float_copy_of_the_split():
    """Final evaluation at the full profile's size: Stanford Dogs' 8,580 test photos at 299 px
    are 2.3 GB of uint8, and Keras' model.predict on them all took three float32 copies (7.5 GB
    more for 2,400 of them here). A batch at a time, with the flip, it holds a few batches."""
    code = textwrap.dedent("""
        import resource, sys
        import numpy as np
        import tf_keras as keras
        from dogbreeds import evaluate
        inputs = keras.Input((299, 299, 3))
        model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inputs)))
        images = np.ones((int(sys.argv[1]), 299, 299, 3), np.uint8)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        evaluate.evaluate_model(model, images, np.zeros(len(images), int), list("abcd"), test_time_flip=True)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    photos = 1600
    done = subprocess.run([sys.executable, "-c", code, str(photos)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    grown_mb, float32_copy_mb = float(done.stdout.split()[-1]), photos * 299 * 299 * 3 * 4 / 2**20
    assert grown_mb < float32_copy_mb / 2, (grown_mb, float32_copy_mb)
