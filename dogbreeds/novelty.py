"""Novelty: is a photo like the dogs the model was trained on, or something else entirely?

A classifier names a breed for anything, a cat included. The model already knows better: its
penultimate features of a cat lie far from those of every training dog. "Deep kNN" (Sun et
al., 2022, "Out-of-distribution detection with deep nearest neighbors") turns that into a
score: L2-normalise the features and take the cosine distance to the k-th nearest training
dog. The threshold is a quantile of the validation dogs' scores, so a known share of real
dogs (98% by default) is never flagged.

    reference, info = calibrate(model, data_config, image_size)   # at export
    probabilities, features = build_feature_model(model).predict_on_batch(images)
    scores = novelty_scores(features, reference)
    verdicts(probabilities, scores, info["threshold"], confidence_threshold=0.5)
    # -> ["breed", "unsure", "not_a_dog", ...]

`dogbreeds.bench.bench_novelty(bundle_dir, not_dog_dirs)` measures what the verdicts do on dogs
the model has not seen (validation, test, whole photos) and on folders of photos that are not dogs. On the quick
pipeline's bundle (mobilenet_025 at 128 px, six breeds of 64 px photos), calibrated at 95%, it keeps 96% of the
test dogs and flags 67% of ../shared/data/not_dogs_64 and 4 of the 10 ../shared/data/not_dogs:
the frozen MobileNet 0.25's pooled features do not separate more (every score tried, Deep kNN
included, ranks a non-dog above a test dog at most 94% of the time).
"""

from __future__ import annotations

import numpy as np

from dogbreeds.config import CONFIDENCE_THRESHOLD  # the served default's one home
from dogbreeds.evaluate import predict_in_batches

# The three verdicts, in the order of how much the answer can be trusted.
VERDICTS = ("breed", "unsure", "not_a_dog")
# Deep kNN: cosine distance to the k-th nearest training feature. On the quick bundle it beat
# Mahalanobis (43% of not_dogs_64 flagged vs 67%), energy (30%), max softmax (17%) and PCA
# residuals (45%); centring, whitening or clipping the features before it only hurt.
METHOD = "knn_cosine"
# k: one neighbour is noisy, hundreds blur into the class mean; 1 to 50 were within 5 points.
NEIGHBOURS = 10
# Share of validation dogs that must stay unflagged: the threshold is this quantile. Not the 95%
# unseen dogs must keep: calibrated at 0.95 on the cpu bundle's 960 validation dogs, it kept
# 95.0% of its 2,400 test dogs and 87.4% of whole photos (flagging 98.2% of not_dogs_64); at
# 0.98: 97.5%, 92.0% and 94.8%; at 0.99: 98.7%, 96.0% and 90.7%.
KEEP_QUANTILE = 0.98
# Training photos kept per breed as the reference: enough for a stable k-th neighbour, and
# small enough that 120 breeds of Xception's 2048 features stay ~50 MB in float16.
REFERENCE_PER_CLASS = 100
# float16 halves the reference; the scores move by < 1e-4 (measured), their spread is 0.04.
REFERENCE_DTYPE = np.float16
# Photos per forward pass while calibrating: bounded memory at 299 px on a CPU.
BATCH_SIZE = 64
# The final Dense layer of every model here (a transfer model's nested in its head, `HEAD_LAYER`):
# its input is the model's penultimate features. On the cpu profile's bundle (120 breeds) they
# set whole photos of dogs apart from non-dogs better than the backbone's pooled features (the
# head's input, what bundles exported before used and still name as `head`): 92.0% of whole
# photos kept and 94.8% of not_dogs_64 flagged, against 84.1% and 94.8% (ranked: 0.984 vs 0.959).
PREDICTIONS_LAYER = "predictions"
HEAD_LAYER = "head"


# ---------------------------------------------------------------------------------------------
# 1. Features: one forward pass gives the probabilities and the penultimate features.


def feature_tensor(model, layer: str = PREDICTIONS_LAYER):
    """The input of `layer` (at the model's top level, or else inside its nested head), as a
    tensor of the model's graph: by default the penultimate features."""
    names = {item.name for item in model.layers}
    if layer in names:
        # A nested Model's own `.input` is its private Input; the tensor that feeds it inside
        # `model` is the input of its last inbound node (for a plain layer, the same as `.input`).
        return model.get_layer(layer).inbound_nodes[-1].input_tensors
    if HEAD_LAYER in names and layer in {item.name for item in model.get_layer(HEAD_LAYER).layers}:
        import tf_keras as keras

        head = model.get_layer(HEAD_LAYER)
        to_layer = keras.Model(head.input, head.get_layer(layer).input)  # the head's own weights
        return to_layer(feature_tensor(model, HEAD_LAYER))
    raise ValueError(f"model {model.name!r} has no layer {layer!r}, so its penultimate features are unknown")


def build_feature_model(model, layer: str = PREDICTIONS_LAYER):
    """A Keras model with the same input and outputs [probabilities, the input of `layer`]."""
    import tf_keras as keras

    return keras.Model(model.input, [model.output, feature_tensor(model, layer)], name=f"{model.name}_features")


# ---------------------------------------------------------------------------------------------
# 2. Scores and verdicts, vectorised.


def normalize(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); all-zero rows stay zero."""
    features = np.asarray(features, np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def novelty_scores(features: np.ndarray, reference: dict) -> np.ndarray:
    """Cosine distance [N] from each feature row to its k-th nearest reference feature:
    0 is a training dog's twin, 1 is unrelated. `reference` is what `calibrate` returns."""
    known = np.asarray(reference["features"], np.float32)
    neighbours = min(int(reference["neighbours"]), len(known))
    similarities = normalize(features) @ known.T
    # The k-th largest similarity of each row, without sorting the rest.
    kth = np.partition(similarities, len(known) - neighbours, axis=1)[:, len(known) - neighbours]
    return 1.0 - kth


def verdicts(probabilities: np.ndarray, scores: np.ndarray, threshold: float,
             confidence_threshold: float = CONFIDENCE_THRESHOLD) -> np.ndarray:
    """One verdict per photo: `not_a_dog` when the novelty score is above the threshold,
    else `breed` when the top probability reaches `confidence_threshold`, else `unsure`."""
    top = np.asarray(probabilities).max(axis=1)
    confident = np.where(top >= confidence_threshold, VERDICTS[0], VERDICTS[1])
    return np.where(np.asarray(scores) > threshold, VERDICTS[2], confident)


# ---------------------------------------------------------------------------------------------
# 3. Calibration: reference features from the training split, threshold from validation.


def reference_positions(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    """Sorted positions of at most `per_class` examples of each class, drawn with `seed`."""
    labels = np.asarray(labels)
    if per_class is None:
        return np.arange(len(labels))
    generator = np.random.default_rng(seed)
    chosen = [
        generator.permutation(np.flatnonzero(labels == label))[:per_class]
        for label in np.unique(labels)
    ]
    return np.sort(np.concatenate(chosen)) if chosen else np.arange(0)


def calibrate(model, data_config, image_size: int, *, neighbours: int = NEIGHBOURS,
              keep_quantile: float = KEEP_QUANTILE, reference_per_class: int | None = REFERENCE_PER_CLASS,
              batch_size: int = BATCH_SIZE) -> tuple[dict, dict]:
    """Reference features of the training split and the threshold from the validation split.

    `data_config` is the run's DataConfig (or its dict, as in a run's config.json). Returns
    (reference arrays for `novelty_scores`, to save with np.savez; info for bundle.json:
    method, k, layer, quantile, threshold and the share of validation dogs kept).
    """
    from dogbreeds import data
    from dogbreeds.config import DataConfig, from_dict

    if not 0 < keep_quantile <= 1:
        raise ValueError(f"keep_quantile must be in (0, 1], not {keep_quantile}")
    if neighbours < 1:
        raise ValueError(f"neighbours must be at least 1, not {neighbours}")
    if not isinstance(data_config, DataConfig):
        data_config = from_dict(DataConfig, data_config)
    index = data.load_index(data_config)
    feature_model = build_feature_model(model)

    train = index.splits["train"]
    chosen = train.take(reference_positions(train.labels, reference_per_class, data_config.seed))
    train_images, train_labels, _ = data.load_images(chosen, image_size, data_config)
    flip = data_config.test_time_flip  # features as the bundle computes them
    _, train_features = predict_in_batches(feature_model.predict_on_batch, train_images, flip, batch_size)
    reference = {
        "features": normalize(train_features).astype(REFERENCE_DTYPE),
        "labels": train_labels.astype(np.int32),
        "neighbours": np.asarray(neighbours, np.int32),
    }

    validation_images, _, _ = data.load_images(index.splits["validation"], image_size, data_config)
    _, validation_features = predict_in_batches(feature_model.predict_on_batch, validation_images, flip, batch_size)
    scores = novelty_scores(validation_features, reference)
    # "higher": the threshold is a real validation score, so at least the quantile stays below.
    threshold = float(np.quantile(scores, keep_quantile, method="higher"))
    info = {
        "method": METHOD,
        "neighbours": neighbours,
        "layer": PREDICTIONS_LAYER,
        "feature_dim": int(train_features.shape[1]),
        "reference_size": int(len(train_labels)),
        "reference_per_class": reference_per_class,
        "reference_dtype": np.dtype(REFERENCE_DTYPE).name,
        "keep_quantile": keep_quantile,
        "threshold": threshold,
        "validation_size": int(len(scores)),
        "validation_kept": float(np.mean(scores <= threshold)),
    }
    return reference, info
