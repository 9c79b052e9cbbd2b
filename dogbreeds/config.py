"""The one typed configuration of a run: every field has a default and a reason.

A run directory keeps the resolved configuration as `config.json`, and an exported bundle
keeps it too, so every number can be traced to what produced it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split and augmented."""

    # None reads TFDS `stanford_dogs` (downloads on a connected machine); a path reads a
    # folder in the layout of the official images.tar (`Images/<synset>-<breed>/*`).
    data_dir: str | None = None
    # Where TFDS keeps its downloads and prepared records; None is TFDS's own default.
    tfds_dir: str | None = None
    # None uses the model's own input size (299 for the study); small sizes fit a CPU.
    image_size: int | None = None
    # Share of train carved out for early stopping and model selection (never the test split).
    validation_fraction: float = 0.1
    # Share held out as test when a folder has no official lists/*.mat split.
    test_fraction: float = 0.2
    # The study searched on part of the data: keep at most this many train images per class...
    subset_per_class: int | None = None
    # ...or this fraction of each class of the train split (applied after subset_per_class).
    subset_fraction: float | None = None
    # One seed for the splits, the subset and the augmentation order.
    seed: int = 0
    # Random rotation as a fraction of a full turn (0.1 is +-36 degrees); 0 turns it off.
    rotation_factor: float = 0.1
    # Random horizontal flip of train images; dogs look the same mirrored.
    horizontal_flip: bool = True
    # The study's offline augmentation: this many augmented views of each train image
    # (it used 9). 0 augments on the fly instead, a fresh view every epoch.
    augmented_views: int = 0
    # Resized images are cached here as .npy, keyed by the files and the image size, so the
    # JPEG decoding happens once per machine, not once per epoch or trial.
    cache_dir: str = os.path.join(os.path.expanduser("~"), ".cache", "dogbreeds")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What to train and how, following the study's common setup."""

    # A name from the model registry (`dogbreeds models`).
    model: str = "cnn3v2"
    # The model's hyperparameters (filters, dropout rates, ...); the registry has defaults.
    hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Transfer backbones: "imagenet" (Keras' download), a local .h5 path, or None (random).
    weights: str | None = "imagenet"
    # The study trained for 20 epochs, with early stopping cutting most runs short.
    epochs: int = 20
    # Images per worker and step; the global batch is this times the number of workers.
    per_worker_batch_size: int = 32
    # Adam's default learning rate, the study's choice.
    learning_rate: float = 1e-3
    # Stop after this many epochs without a better validation loss, keeping the best weights.
    early_stopping_patience: int = 8
    # Lower the learning rate when validation loss stalls this many epochs...
    reduce_lr_patience: int = 3
    # ...multiplying it by this factor.
    reduce_lr_factor: float = 0.2
    # Label smoothing of the cross-entropy; 0 is the study's plain loss.
    label_smoothing: float = 0.0
    # Ray Train workers; each holds a full model replica (MultiWorkerMirroredStrategy).
    workers: int = 1
    # GPUs per worker; 0 trains on CPUs.
    gpus_per_worker: float = 0
    # CPUs per worker; also TensorFlow's thread count there, so workers do not fight.
    cpus_per_worker: int = 1
    # How often Ray Train restarts the workers from the last checkpoint after a failure.
    max_failures: int = 2
    # Seed of the weights' initialisation.
    seed: int = 0


def from_dict(cls: type, values: Mapping[str, Any]):
    """Build `cls` from a mapping; an unknown key is an error that lists the known ones."""
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known: {sorted(known)}")
    return cls(**values)


def to_dict(config) -> dict[str, Any]:
    """A JSON-ready dict of a configuration."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
