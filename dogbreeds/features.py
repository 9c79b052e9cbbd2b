"""A frozen backbone's features, computed once by a Ray Data job and cached.

The backbone is more than 98% of a transfer model's compute and its output never changes, so
the head search computes the pooled features of every augmented view of the training photos
(and of the validation photos) once, and every head trial trains on them:

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

from dogbreeds import data, models
from dogbreeds.config import DataConfig

logger = logging.getLogger(__name__)


class FeatureExtractor:
    """A Ray Data actor: loads the backbone once, then turns example ids into features.

    Example id `i` is view `i // N` of image `i % N`, augmented with seed (seed, i): the same
    fixed views that `data.make_dataset(..., augmented_views=views)` trains on end to end."""

    def __init__(self, images, backbone: str, weights, image_size: int, views: int, data_config: DataConfig):
        import ray
        import tensorflow as tf

        self.images = ray.get(images) if isinstance(images, ray.ObjectRef) else images
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
        ids = batch["id"].astype(np.int64)
        images = self.images[ids % len(self.images)]
        features = self.model.predict_on_batch(self.prepare(images, ids))
        return {"id": ids, "features": np.asarray(features, np.float32)}


def extract_features(images: np.ndarray, backbone: str, weights, image_size: int, views: int,
                     data_config: DataConfig, actors: int = 1, gpus_per_actor: float = 0,
                     batch_size: int = 64, what: str = "photos") -> np.ndarray:
    """Features [len(images) * max(views, 1), D] by a Ray Data job over `actors` actors;
    `views` = 0 is one view without augmentation (validation and test). Progress is logged
    as `features of WHAT: done/total examples`."""
    import ray

    count = len(images) * max(views, 1)
    dataset = ray.data.range(count).map_batches(
        FeatureExtractor,
        fn_constructor_kwargs=dict(
            images=ray.put(images), backbone=backbone, weights=weights,
            image_size=image_size, views=views, data_config=data_config,
        ),
        batch_size=batch_size,
        concurrency=actors,
        num_cpus=1,
        num_gpus=gpus_per_actor,
    )
    ids, features = [], []
    progress = data.Progress(f"features of {what}", count, unit="examples", log=logger)
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        ids.append(batch["id"])
        features.append(batch["features"])
        progress.advance(len(batch["id"]))
    ids, features = np.concatenate(ids), np.concatenate(features)
    return features[np.argsort(ids)]


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
        images, labels, _ = data.load_images(index.splits[split], image_size, data_config)
        features = extract_features(images, backbone, weights, image_size, split_views,
                                    data_config, actors, gpus_per_actor, what=f"{split} ({backbone})")
        temporary = f"{paths[split]}.{os.getpid()}.tmp.npz"
        np.savez(temporary, features=features, labels=np.tile(labels, max(split_views, 1)))
        os.replace(temporary, paths[split])
    seconds = round(time.time() - started, 2)
    logger.info("features of %s at %d px: computed in %.1f s into %s", backbone, image_size, seconds, directory)
    return {**paths, "cached": False, "seconds": seconds}
