"""Benchmarks: commands that print their numbers and write JSON (never timed tests).

`bench_pipeline`: the input pipeline against a bare decode-and-resize loop over the same
files, measured in one run so that the ratio is fair on a noisy machine.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import numpy as np

from dogbreeds import data
from dogbreeds.config import DataConfig


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else float("inf")


def bench_pipeline(config: DataConfig, image_size: int) -> dict:
    """Images/s of: a bare PIL loop; the pipeline's first (decoding) pass; its cached pass;
    and a training epoch from the cache with augmentation, over every file of the dataset."""
    from PIL import Image

    index = data.load_index(config)
    splits = list(index.splits.values())
    split = data.Split(
        [key for s in splits for key in s.keys],
        np.concatenate([s.labels for s in splits]),
    )

    started = time.perf_counter()
    for path in split.keys:
        with Image.open(path) as image:
            image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
    bare_seconds = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as cache_dir:  # a cold cache, whatever ran before
        cold = dataclasses.replace(config, cache_dir=cache_dir)
        data.load_images(split.take(range(8)), image_size, cold)  # TensorFlow's warm-up
        started = time.perf_counter()
        images, labels, skipped = data.load_images(split, image_size, cold)
        decode_seconds = time.perf_counter() - started
        started = time.perf_counter()
        data.load_images(split, image_size, cold)
        cached_seconds = time.perf_counter() - started

    dataset = data.make_dataset(images, labels, index.num_classes, 32, config, training=True)
    started = time.perf_counter()
    count = sum(int(batch[0].shape[0]) for batch in dataset)
    epoch_seconds = time.perf_counter() - started

    count_files = len(split)
    return {
        "benchmark": "pipeline",
        "data": index.source,
        "image_size": image_size,
        "num_files": count_files,
        "skipped": len(skipped),
        "cpu_count": os.cpu_count(),
        "bare_pil_loop_images_per_s": _rate(count_files, bare_seconds),
        "pipeline_decode_images_per_s": _rate(count_files, decode_seconds),
        "pipeline_cached_load_images_per_s": _rate(count_files, cached_seconds),
        "augmented_epoch_from_cache_images_per_s": _rate(count, epoch_seconds),
        "decode_speedup_over_bare": round(bare_seconds / decode_seconds, 2),
    }
