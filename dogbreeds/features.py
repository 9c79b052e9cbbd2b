"""A frozen backbone's features, computed once by a Ray Data job and cached.

The backbone is more than 98% of a transfer model's compute and its output never changes, so
the head search computes the pooled features of every augmented view of the training photos
(and of the validation photos) once, and every head trial trains on them. The photos stream
through the job in blocks (Ray Data): tasks decode a block, actors holding the backbone turn
it into the features of its views, so no object ever holds the whole decoded split:

    paths = cache_features(index, "mobilenet_025", weights, 128, views=2, data_config, "feats")
    train = np.load(paths["train"])  # features [N * views, D], labels [N * views]

The cache key covers the backbone, its weights, the image size, the views, the augmentation
and a fingerprint of the data, so a second search over the same data reuses the features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import numpy as np

from dogbreeds import console, data, models
from dogbreeds.config import DataConfig

logger = logging.getLogger(__name__)


# Photos per block of the feature job: the most decoded photos one object holds (17 MB at
# 299 px), and how often progress is logged. Ray Data keeps a few blocks in flight, so memory
# does not grow with the split.
BLOCK_PHOTOS = 64


def _decode_block(block: dict, split: data.Split, image_size: int, tfds_dir: str | None) -> dict:
    """A Ray Data task: photos [start, stop) of the split, decoded and resized as training does;
    what does not decode is left out (the driver counts it)."""
    (start,), (stop,) = block["start"], block["stop"]
    images, kept, _ = data.decode_photos(split.take(range(start, stop)), image_size, tfds_dir)
    return {"position": start + kept, "image": images, "label": split.labels[start + kept]}


class FeatureExtractor:
    """A Ray Data actor: loads the backbone once, then turns blocks of photos into the
    features of each of their views.

    Example id `i` is view `i // N` of photo `i % N` of the split (N photos), augmented with
    seed (seed, i): the same fixed views that `data.make_dataset(..., augmented_views=views)`
    trains on end to end (when every photo decodes)."""

    def __init__(self, count: int, backbone: str, weights, image_size: int, views: int, data_config: DataConfig):
        import tensorflow as tf

        self.count, self.views = count, max(views, 1)
        self.model = models.build_backbone(backbone, image_size, weights)
        ops = data.build_ops(data.augment_chain(data_config)) if views else (lambda example: example)
        seed = data_config.seed

        @tf.function
        def prepare(images, ids):
            def one(args):
                image, item = args
                example = {"image": image, "seed": tf.stack([tf.constant(seed, tf.int64), item])}
                return ops(example)["image"]

            return tf.cast(tf.map_fn(one, (images, ids), fn_output_signature=tf.uint8), tf.float32)

        self.prepare = prepare

    def __call__(self, batch: dict) -> dict:
        positions = batch["position"].astype(np.int64)
        ids = (np.arange(self.views)[:, None] * self.count + positions).ravel()  # view-major
        images = np.tile(batch["image"], (self.views, 1, 1, 1))
        features = self.model.predict_on_batch(self.prepare(images, ids))
        return {"id": ids, "features": np.asarray(features, np.float32), "label": np.tile(batch["label"], self.views)}


def extract_features(split: data.Split, backbone: str, weights, image_size: int, views: int,
                     data_config: DataConfig, actors: int = 1, gpus_per_actor: float = 0,
                     batch_size: int = 64, block_photos: int = BLOCK_PHOTOS):
    """The features of `max(views, 1)` views of every photo of `split`, by a streaming Ray
    Data job: tasks read and decode blocks of `block_photos` photos, `actors` actors holding
    the backbone expand each photo into its views (`views` = 0: one view without
    augmentation, for validation and test) and compute their features, about `batch_size`
    at a time. Progress is logged as `features of SPLIT (BACKBONE): done/total examples`.

    Returns (features [kept * max(views, 1), D] in example order, their labels, skipped
    [(key, reason)]); an empty split, or one of which no photo decodes, is a ValueError."""
    import ray

    if not len(split):
        raise ValueError(f"the {split.name} split has no photos")

    # `progress` below reports; Ray Data's own bars (and its notice that they are off) are noise,
    # and so are its execution plans, which its console handler prints at INFO (its log file
    # under the Ray session keeps them): only with --verbose.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # Its high-memory check warns every 30 s that a feature actor requests no memory
    # (Xception's at 299 px holds 3.2 GB: 27 warnings in 20 minutes of the full profile's head
    # stage); their number is `actors`, and the README gives their memory, measured.
    if not console.verbose():
        context.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(console.log_level())
    count, per_photo = len(split), max(views, 1)
    blocks = [{"start": start, "stop": min(start + block_photos, count)} for start in range(0, count, block_photos)]
    dataset = (
        ray.data.from_items(blocks, override_num_blocks=max(len(blocks), 1))
        .map_batches(_decode_block, batch_size=1, num_cpus=1,
                     fn_kwargs=dict(split=split, image_size=image_size, tfds_dir=data_config.tfds_dir))
        .map_batches(
            FeatureExtractor,
            fn_constructor_kwargs=dict(count=count, backbone=backbone, weights=weights,
                                       image_size=image_size, views=views, data_config=data_config),
            batch_size=max(1, batch_size // per_photo),
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=1,
            num_gpus=gpus_per_actor,
        )
    )
    ids, features, labels = [], [], []
    progress = data.Progress(f"features of {split.name} ({backbone})", count * per_photo, unit="examples", log=logger)
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        ids.append(batch["id"])
        features.append(batch["features"])
        labels.append(batch["label"])
        progress.advance(len(batch["id"]))
    if not ids:
        skipped = [(key, data.why_undecodable(key)) for key in split.keys]
        raise ValueError(f"no photo of {split.name} decodes: {data.describe_skipped(skipped)}")
    ids = np.concatenate(ids)
    decoded = set((ids % count).tolist())
    skipped = [(key, data.why_undecodable(key)) for position, key in enumerate(split.keys) if position not in decoded]
    order = np.argsort(ids)
    return np.concatenate(features)[order], np.concatenate(labels)[order].astype(np.int32), skipped


def cache_key(index: data.DatasetIndex, backbone: str, weights, image_size: int, views: int,
              data_config: DataConfig) -> str:
    """What the features depend on: backbone, weights, size, views, augmentation and data."""
    weights_id = weights
    if weights not in (None, "imagenet"):
        with open(weights, "rb") as handle:
            weights_id = hashlib.sha256(handle.read()).hexdigest()
    parts = {
        "backbone": backbone, "weights": weights_id, "image_size": image_size, "views": views,
        "augment": data.augment_chain(data_config), "seed": data_config.seed,
        "data": {name: split.keys for name, split in index.splits.items() if name != "test"},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def cache_features(index: data.DatasetIndex, backbone: str, weights, image_size: int | None, views: int,
                   data_config: DataConfig, features_dir: str, actors: int = 1,
                   gpus_per_actor: float = 0) -> dict:
    """The train (`views` augmented views per image) and validation features, computed once.

    `image_size` None is the backbone's own (`models.resolve_input`).
    Returns {"train": path, "validation": path, "cached": bool, "seconds": float}; each .npz
    holds `features` and `labels`. Missing weights are a ValueError before any work."""
    image_size = models.resolve_input(backbone, image_size).image_size
    models.check_weights(backbone, weights, image_size)
    directory = os.path.join(features_dir, cache_key(index, backbone, weights, image_size, views, data_config))
    paths = {split: os.path.join(directory, f"{split}.npz") for split in ("train", "validation")}
    if all(os.path.exists(path) for path in paths.values()):
        logger.info("features of %s at %d px: reused from %s", backbone, image_size, directory)
        return {**paths, "cached": True, "seconds": 0.0}
    started = time.time()
    os.makedirs(directory, exist_ok=True)
    for split, split_views in (("train", views), ("validation", 0)):
        features, labels, skipped = extract_features(index.splits[split], backbone, weights, image_size, split_views,
                                                     data_config, actors, gpus_per_actor)
        if skipped:
            logger.warning("features of %s: %d photos skipped (%s)", split, len(skipped), data.describe_skipped(skipped))
        temporary = f"{paths[split]}.{os.getpid()}.tmp.npz"
        np.savez(temporary, features=features, labels=labels)
        os.replace(temporary, paths[split])
    seconds = round(time.time() - started, 2)
    logger.info("features of %s at %d px: computed in %.1f s into %s", backbone, image_size, seconds, directory)
    return {**paths, "cached": False, "seconds": seconds}
