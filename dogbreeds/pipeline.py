"""The study in one command: the cnn3v2 search, the transfer-head search, the final models
tested once, the better one (by validation accuracy, never test) exported as a bundle, and
the report.

    run_pipeline("quick", DataConfig(data_dir="../shared/data/tiny_dogs_64"), "runs/quick",
                 weights="../shared/weights/mobilenet_2_5_224_tf_no_top.h5")
"""

from __future__ import annotations

import dataclasses
import json
import os

from dogbreeds.config import DataConfig, TrainConfig
from dogbreeds.search import SearchConfig, search_cnn3v2, search_head

# Each profile: the cnn3v2 search and the head search, as (data, train, search) overrides.
PROFILES = {
    # A laptop CPU in minutes: small images, a subset for the cnn3v2 search, few short trials.
    "quick": {
        "cnn3v2": (
            {"image_size": 64, "subset_per_class": 100},
            {"epochs": 3, "workers": 1},
            {"space": "cnn3v2", "trials": 2, "concurrent_trials": 2},
        ),
        "head": (
            {"image_size": 128},
            {"model": "mobilenet_025", "epochs": 10},
            {"space": "transfer_head", "trials": 4, "concurrent_trials": 2},
        ),
        "views": 2,
    },
    # The study's settings on a GPU cluster: 299x299, 20 epochs, all data, Xception.
    "full": {
        "cnn3v2": (
            {"image_size": 299, "subset_fraction": 0.3},  # the study searched on part of it
            {"epochs": 20, "workers": 2, "gpus_per_worker": 1, "cpus_per_worker": 4},
            {"space": "cnn3v2", "trials": 20, "concurrent_trials": 2, "algorithm": "tpe"},
        ),
        "head": (
            {"image_size": 299},
            {"model": "xception", "epochs": 20, "gpus_per_worker": 0.25},
            {"space": "transfer_head", "trials": 32, "concurrent_trials": 8, "algorithm": "tpe"},
        ),
        "views": 9,  # the study's nine augmented views per photo
    },
}


def run_pipeline(profile: str, data_config: DataConfig, output: str, weights: str | None = "imagenet",
                 resume: bool = False, feature_actors: int = 1, gpus_per_actor: float = 0) -> dict:
    """Run the whole study; returns where each artefact went."""
    from dogbreeds.export import export_bundle

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {sorted(PROFILES)}")
    settings = PROFILES[profile]
    output = os.path.abspath(output)

    def configs(stage):
        data_overrides, train_overrides, search_overrides = settings[stage]
        return (
            dataclasses.replace(data_config, **data_overrides),
            TrainConfig(**{"weights": weights, **train_overrides}),
            SearchConfig(**search_overrides),
        )

    results = {
        "cnn3v2": search_cnn3v2(*configs("cnn3v2"), os.path.join(output, "cnn3v2"), resume=resume),
        "head": search_head(
            *configs("head"), os.path.join(output, "head"), views=settings["views"],
            features_dir=os.path.join(output, "features"), actors=feature_actors,
            gpus_per_actor=gpus_per_actor, resume=resume,
        ),
    }
    chosen = max(results, key=lambda stage: results[stage]["final"]["validation"])
    bundle = export_bundle(os.path.join(output, chosen, "final"), os.path.join(output, "bundle"))
    summary = {
        "profile": profile,
        "chosen": chosen,
        "final": {stage: result["final"] for stage, result in results.items()},
        "bundle": {"path": os.path.join(output, "bundle"), "name": bundle["name"], "version": bundle["version"]},
        "artefacts": {
            "cnn3v2 search": os.path.join(output, "cnn3v2", "results.csv"),
            "head search": os.path.join(output, "head", "results.csv"),
            "best configurations": [os.path.join(output, stage, "best.json") for stage in results],
            "bundle": os.path.join(output, "bundle"),
            "report": os.path.join(output, "report.html"),
            "tensorboard": f"tensorboard --logdir {output}",
        },
    }
    with open(os.path.join(output, "pipeline.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    return summary
