"""The report's photos: thumbnails of each breed, and the model's predictions on a few test photos."""

from __future__ import annotations

import base64
import functools
import io
import os

from dogbreeds import runs
from dogbreeds.report.run import TrainingRun

# Example photos of each breed beside a confused pair.
PHOTOS_PER_BREED = 3
# Thumbnails are square crops of this many pixels: sharp enough to recognise a breed, small
# enough that a report with dozens of them stays a few hundred kilobytes.
THUMBNAIL_SIZE = 96
# Sample predictions: this many random test photos are predicted (cheap even for Xception)...
SAMPLE_POOL = 48
# ...and up to this many shown, half right and half wrong, so both kinds are seen.
SAMPLES_SHOWN = 10


@functools.lru_cache(maxsize=1024)
def thumbnail(path: str, size: int = THUMBNAIL_SIZE) -> str | None:
    """A square JPEG thumbnail as a data URI; None for a file that is not a readable image."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            image = ImageOps.fit(image, (size, size), Image.Resampling.LANCZOS)
    except (OSError, ValueError):
        return None
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def breed_photos(data_dir: str) -> dict[str, list[str]]:
    """Readable breed name -> the first few photos of its folder (`Images/<synset>-<breed>/`)."""
    from dogbreeds.data import IMAGE_EXTENSIONS, breed_name

    images_dir = os.path.join(data_dir, "Images")
    if not os.path.isdir(images_dir):
        images_dir = data_dir  # the data module accepts the breed folders directly, too
    photos = {}
    for folder in sorted(os.listdir(images_dir)):
        folder_path = os.path.join(images_dir, folder)
        if os.path.isdir(folder_path):
            names = sorted(n for n in os.listdir(folder_path) if n.lower().endswith(IMAGE_EXTENSIONS))
            # A few spare photos, in case some do not open.
            names = names[: 2 * PHOTOS_PER_BREED]
            photos[breed_name(folder)] = [os.path.join(folder_path, n) for n in names]
    return photos


def predict_samples(training: TrainingRun) -> tuple[list[dict], int]:
    """Predict `SAMPLE_POOL` random test photos with the run's model; return up to
    `SAMPLES_SHOWN` of them (half right, half wrong when there are enough of each), each
    {path, true_breed, correct, top: [(breed, probability)] * 3}, and the number predicted."""
    import numpy as np
    import tensorflow as tf
    import tf_keras as keras

    from dogbreeds import data, evaluate
    from dogbreeds.config import DataConfig, from_dict

    data_config = from_dict(DataConfig, training.config["data"])
    index = data.load_index(data_config)
    if index.class_names != training.metrics["class_names"]:
        raise ValueError(f"the breeds in {data_config.data_dir} are no longer the run's")
    test = index.splits["test"]
    rng = np.random.default_rng(data_config.seed)
    images, kept = [], []
    for position in rng.permutation(len(test))[:SAMPLE_POOL]:
        try:
            with open(test.keys[position], "rb") as handle:
                images.append(data.decode_and_resize(handle.read(), training.metrics["image_size"]))
            kept.append(position)
        except (OSError, tf.errors.OpError):
            continue  # a photo that does not decode is skipped, as in training
    if not images:
        return [], 0
    model = keras.models.load_model(os.path.join(training.directory, runs.MODEL), compile=False)
    probabilities = evaluate.predict_in_batches(model.predict_on_batch, np.stack(images), data_config.test_time_flip)
    names = training.metrics["class_names"]
    samples = []
    for position, row in zip(kept, probabilities):
        top = np.argsort(-row)[:3]
        samples.append({
            "path": test.keys[position],
            "true_breed": names[test.labels[position]],
            "correct": int(top[0]) == int(test.labels[position]),
            "top": [(names[k], float(row[k])) for k in top],
        })
    right = [s for s in samples if s["correct"]]
    wrong = [s for s in samples if not s["correct"]]
    show_wrong = min(len(wrong), max(SAMPLES_SHOWN // 2, SAMPLES_SHOWN - len(right)))
    show_right = min(len(right), SAMPLES_SHOWN - show_wrong)
    return right[:show_right] + wrong[:show_wrong], len(samples)
