"""Honest evaluation: top-1, top-5, macro precision and recall, accuracy per breed, and the
breed pairs the model confuses most (the study's error analysis)."""

from __future__ import annotations

import csv

import numpy as np


def evaluate_predictions(probabilities: np.ndarray, labels: np.ndarray, class_names: list[str]):
    """Metrics of predicted class probabilities [N, C] against integer labels [N].

    Returns (metrics, confusions): `metrics` has top1, top5, precision, recall (macro over the
    breeds present), num_images and per_breed_accuracy; `confusions` lists every
    (true, predicted) pair with a mistake, most frequent first.
    """
    num_classes = len(class_names)
    labels = np.asarray(labels, int)
    predicted = probabilities.argmax(axis=1)
    top_k = min(5, num_classes)
    top5 = np.argsort(-probabilities, axis=1)[:, :top_k]
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    support = confusion.sum(axis=1)
    predicted_count = confusion.sum(axis=0)
    correct = np.diag(confusion)
    present = support > 0
    recall = np.divide(correct, support, out=np.zeros(num_classes), where=present)
    # A breed that is never predicted has precision 0, as in scikit-learn's macro average.
    precision = np.divide(correct, predicted_count, out=np.zeros(num_classes), where=predicted_count > 0)
    metrics = {
        "top1": float((predicted == labels).mean()) if len(labels) else 0.0,
        "top5": float((top5 == labels[:, None]).any(axis=1).mean()) if len(labels) else 0.0,
        "precision": float(precision[present].mean()) if present.any() else 0.0,
        "recall": float(recall[present].mean()) if present.any() else 0.0,
        "num_images": int(len(labels)),
        "per_breed_accuracy": {
            class_names[c]: float(recall[c]) for c in range(num_classes) if present[c]
        },
    }
    mistakes = [
        (int(confusion[t, p]), t, p)
        for t, p in zip(*np.nonzero(confusion))
        if t != p
    ]
    confusions = [
        {
            "true_breed": class_names[t],
            "predicted_breed": class_names[p],
            "count": count,
            "fraction_of_true": round(count / support[t], 4),
        }
        for count, t, p in sorted(mistakes, key=lambda m: (-m[0], m[1], m[2]))
    ]
    return metrics, confusions


def predict_in_batches(predict_batch, images: np.ndarray, test_time_flip: bool = False, batch_size: int = 64):
    """`predict_batch`'s outputs (an array, or a list of arrays, a row per image) for uint8
    images [N, S, S, 3], `batch_size` of them at a time as float32. With `test_time_flip` each
    batch goes in with its mirror images, in one call, and each output row is the mean of the
    photo's and its mirror's (`DataConfig.test_time_flip`). The one place a model sees photos
    after training: final evaluation, the not-a-dog check's calibration and the bundle."""
    outputs = []
    for start in range(0, max(len(images), 1), batch_size):  # no images: one empty call
        batch = np.asarray(images[start:start + batch_size], np.float32)
        if test_time_flip:
            batch = np.concatenate([batch, batch[:, :, ::-1]])  # [N, H, W, C]: W mirrored
        result = predict_batch(batch)
        result = [np.asarray(item) for item in (result if isinstance(result, (list, tuple)) else [result])]
        if test_time_flip:
            half = len(batch) // 2
            result = [(item[:half] + item[half:]) / 2 for item in result]
        outputs.append(result)
    joined = [np.concatenate(parts) for parts in zip(*outputs)]
    return joined if len(joined) > 1 else joined[0]


def evaluate_model(model, images: np.ndarray, labels: np.ndarray, class_names, batch_size=64,
                   test_time_flip: bool = False):
    """`evaluate_predictions` of a Keras model on uint8 images [N, S, S, 3]."""
    probabilities = predict_in_batches(model.predict_on_batch, images, test_time_flip, batch_size)
    return evaluate_predictions(probabilities, labels, class_names)


def write_confusions(path: str, confusions: list[dict]) -> None:
    """The most confused breed pairs as CSV, most frequent first."""
    fields = ["true_breed", "predicted_breed", "count", "fraction_of_true"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(confusions)
