"""The evaluation metrics on predictions whose right answers can be counted by hand."""

import csv

import numpy as np

from dogbreeds import evaluate

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
