"""The study in one command: the cnn3v2 search, the transfer-head search, fine-tuning of the
best head with the top of its backbone, the final models tested once, the best one (by
validation accuracy, never test) exported as a bundle, and the report; for the study's table,
also frozen heads on other backbones and the ladder of CNNs from scratch.

    run_pipeline("quick", "runs/quick", data={"data_dir": "../shared/data/tiny_dogs_64"},
                 train={"weights": "../shared/weights/mobilenet_2_5_224_tf_no_top.h5"})

Each stage's configuration is resolved in one order: the classes' defaults, then the profile's
values for that stage, then the caller's (the command line's and `--config`'s), which apply to
both stages, then the caller's for one stage (`--set head.trials=6`, `--backbone`). The
resolved configurations are written to pipeline.json before anything runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time

from dogbreeds import runs
from dogbreeds.config import DataConfig, SearchConfig, TrainConfig, to_dict
from dogbreeds.search import search_cnn3v2, search_fine_tune, search_head

# The cpu profile's zoom-out: stanford_dogs_224's photos are box crops, and the served model
# sees whole photos, where the dog is smaller and off centre. Every stage shrinks its photos to
# a random 1 - zoom_out to all of their side; chosen on validation measured twice, on the crops
# and on the crops shrunk to a whole photo's scale (`bench novelty`'s `validation_shrunk`).
# The profile's runs at 224 px, without test-time flip (validation crops / shrunk; the
# sample's 301 whole photos / test crops):
# - 0.4 in every stage: 0.639 / 0.493; 47.8% / 57.7% (0.83);
# - 0.6 in every stage: 0.607 / 0.498; 48.5% / 56.1% (0.86);
# - 0.4, and 0.6 in fine-tuning: 0.621 / 0.517; 52.2% / 56.0% (0.93);
# - 0.4, and 0.5 in fine-tuning: 0.629 / 0.521; 52.8% / 57.4% (0.92): the best mean of the two.
# The frozen head learns from two cached views of each photo: a wide zoom-out leaves it few
# near the crops' scale (its test top-1: 0.568 at 0.4, 0.538 at 0.6). Fine-tuning draws a new
# view every epoch, 8 in all, and can afford the wider range.
ZOOM_OUT_CPU = 0.4
ZOOM_OUT_FINE_TUNE_CPU = 0.5
# Test-time flip in every stage of the cpu profile (fine-tuning takes the head's): on its
# fine-tuned model, validation 0.633 against 0.629 on the crops and 0.546 against 0.521 shrunk,
# for twice the inference compute (README, "cpu profile").
TEST_TIME_FLIP_CPU = True

# Each profile: the cnn3v2 search, the head search (its augmented views per photo in
# `augmented_views`) and fine-tuning (its model, data, size and head are the head search's), as
# (data, train, search) overrides of the classes' defaults.
PROFILES = {
    # A laptop CPU in minutes: small images, a subset for the cnn3v2 search, few short trials.
    # Validation is a fifth of the training photos (480 of tiny_dogs_64's 2,400), not a tenth:
    # on 240 a photo is 0.4%, and the best epoch of the best trial, picked on so few, flatters
    # the frozen head (many cheap trials and epochs) more than the gap to fine-tuning.
    "quick": {
        "cnn3v2": (
            {"image_size": 64, "subset_per_class": 100, "validation_fraction": 0.2},
            {"epochs": 3, "workers": 1},
            {"space": "cnn3v2", "trials": 2, "concurrent_trials": 2},
        ),
        "head": (
            {"image_size": 128, "augmented_views": 2, "validation_fraction": 0.2},
            {"model": "mobilenet_025", "epochs": 10},
            {"space": "transfer_head", "trials": 4, "concurrent_trials": 2},
        ),
        "fine_tune": (
            {},
            # 8 epochs, the rate warmed up over the first: best validation 0.671 against the
            # frozen head's 0.669 (6 epochs: 0.665 with the warm-up and without).
            {"epochs": 8, "warmup_epochs": 1, "workers": 1},
            # No ASHA: a fine-tuned model's first epoch dips before it climbs.
            {"space": "fine_tune", "trials": 2, "concurrent_trials": 2, "scheduler": "none"},
        ),
    },
    # The whole study on all 120 breeds of stanford_dogs_224 (12,000 photos) on 2 CPU cores
    # within an hour; each value measured for what it buys per minute (README, "cpu profile").
    "cpu": {
        "cnn3v2": (
            # 64 px: 224 would cost 12x the compute for a CNN from scratch that reaches 7-8%
            # here; the search on 40 photos a breed, as the study searched on part of the
            # data, then the best retrained on all of them.
            {"image_size": 64, "subset_per_class": 40, "zoom_out": ZOOM_OUT_CPU, "test_time_flip": TEST_TIME_FLIP_CPU},
            {"epochs": 8, "workers": 1},
            {"space": "cnn3v2", "trials": 4, "concurrent_trials": 2},
        ),
        "head": (
            # 288 px, the 224 px crops enlarged: the exported model's validation 0.668 against
            # 0.633 at the backbone's own 224 (shrunk crops 0.571 against 0.546, test 0.605
            # against 0.587), for fine-tuning at 625 s against 493 s (its two trials 8.9 GB each
            # against 5.7); at 128 px a frozen head reached 0.415 test top-1. Two views a photo.
            {"image_size": 288, "augmented_views": 2, "zoom_out": ZOOM_OUT_CPU, "test_time_flip": TEST_TIME_FLIP_CPU},
            # 30 epochs: on cached features an epoch is a second, and the best is at 16-25.
            {"model": "mobilenet_025", "epochs": 30},
            {"space": "transfer_head", "trials": 8, "concurrent_trials": 2},
        ),
        "fine_tune": (
            {"zoom_out": ZOOM_OUT_FINE_TUNE_CPU},
            # 255 photos/s with half the backbone training at 224 px: 35 s an epoch. 12 epochs
            # (3.5 minutes more; at 224 px, without test-time flip): validation 0.642 on the
            # crops against 0.629, shrunk 0.521 as with 8; test 0.577 against 0.574, whole
            # photos 0.515 against 0.528.
            {"epochs": 8, "workers": 1},
            {"space": "fine_tune", "trials": 2, "concurrent_trials": 2, "scheduler": "none"},
        ),
    },
    # The study's settings on a GPU cluster: 299x299, 20 epochs, all data, Xception.
    "full": {
        "cnn3v2": (
            {"image_size": 299, "subset_fraction": 0.3},  # the study searched on part of it
            {"epochs": 20, "workers": 2, "gpus_per_worker": 1, "cpus_per_worker": 4},
            {"space": "cnn3v2", "trials": 20, "concurrent_trials": 2, "algorithm": "tpe"},
        ),
        "head": (
            {"image_size": 299, "augmented_views": 9},  # the study's nine views per photo
            {"model": "xception", "epochs": 20, "gpus_per_worker": 0.25},
            {"space": "transfer_head", "trials": 32, "concurrent_trials": 8, "algorithm": "tpe"},
        ),
        "fine_tune": (
            {},
            {"epochs": 10, "workers": 2, "gpus_per_worker": 1, "cpus_per_worker": 4},
            {"space": "fine_tune", "trials": 4, "concurrent_trials": 1, "algorithm": "tpe", "scheduler": "none"},
        ),
    },
}


logger = logging.getLogger(__name__)

# The pipeline's stages, in the order they run (each profile sets each).
STAGES = ("cnn3v2", "head", "fine_tune")
# The study compares each backbone's frozen head: a head search on each of these too (besides
# the head stage's own backbone), with the head stage's settings, in OUTPUT/head_<backbone>/,
# for the table only (the export weighs the three stages). `--compare-backbones`.
COMPARED_BACKBONES = {"quick": (), "cpu": (), "full": ("resnet50v2",)}


def stage_kind(stage: str) -> str:
    """The search a stage runs: its own name, or "head" for a compared backbone's head_<backbone>."""
    return "head" if stage.startswith("head_") else stage


def resolve_stages(profile: str, data: dict | None = None, train: dict | None = None,
                   search: dict | None = None, stages: dict | None = None,
                   compare_backbones: tuple[str, ...] | None = None,
                   ) -> dict[str, tuple[DataConfig, TrainConfig, SearchConfig]]:
    """Each stage's (data, train, search) configuration: the profile's values over the
    classes' defaults, `data`, `train`, `search` (the caller's) over every stage, and
    `stages` ({stage: {section: {field: value}}}, the caller's for one stage) over that one.
    Then `head_<backbone>` for each compared backbone (None: the profile's): the head stage's
    configuration on that backbone."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {sorted(PROFILES)}")
    unknown = set(stages or {}) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage {sorted(unknown)[0]!r}; the pipeline's stages: {', '.join(STAGES)}")
    resolved, data_values = {}, {}
    for stage, (data_overrides, train_overrides, search_overrides) in PROFILES[profile].items():
        own = (stages or {}).get(stage, {})
        data_values[stage] = {**data_overrides, **(data or {}), **own.get("data", {})}
        resolved[stage] = (
            DataConfig(**data_values[stage]),
            TrainConfig(**{**train_overrides, **(train or {}), **own.get("train", {})}),
            SearchConfig(**{**search_overrides, **(search or {}), **own.get("search", {})}),
        )
    head_data, head_train, _ = resolved["head"]  # what fine-tuning starts from
    _, fine_train, fine_search = resolved["fine_tune"]
    resolved["fine_tune"] = (
        # The head search's photos and split (both validated on the same photos, none of the
        # head's training photos among fine-tuning's), at its size, a new view every epoch;
        # the profile's data values for fine-tuning (its zoom-out), the caller's over them.
        dataclasses.replace(head_data, **{**data_values["fine_tune"], "image_size": head_data.image_size, "augmented_views": 0}),
        dataclasses.replace(fine_train, model=head_train.model, weights=head_train.weights),
        fine_search,
    )
    compared = COMPARED_BACKBONES[profile] if compare_backbones is None else compare_backbones
    for backbone in dict.fromkeys(compared):
        if backbone != head_train.model:
            resolved[f"head_{backbone}"] = (head_data, dataclasses.replace(head_train, model=backbone), resolved["head"][2])
    return resolved


# How often a stage's memory is sampled: Ray's workers live seconds at least, so a peak held
# for less than this is missed, which an expensive sampler would not fix.
MEMORY_SAMPLE_S = 0.5


@contextlib.contextmanager
def measure_stage(stage: str, timings: dict):
    """Time a stage and sample the peak resident memory of this driver and of Ray's worker
    processes on this machine (`ray::...`: trials, Ray Train workers, feature actors) while it
    runs; logs a line as it starts and one as it ends, and records {seconds, peak_mb: {driver,
    largest_worker, all}} in `timings[stage]`."""
    import psutil

    peaks = {"driver": 0, "largest_worker": 0, "all": 0}
    done = threading.Event()

    def sample():
        me = os.getpid()
        while True:
            total = 0
            for process in psutil.process_iter(["pid", "name", "memory_info"]):
                rss = (process.info["memory_info"].rss if process.info["memory_info"] else 0) / 2**20
                if process.info["pid"] == me:
                    peaks["driver"] = max(peaks["driver"], rss)
                elif (process.info["name"] or "").startswith("ray::"):
                    peaks["largest_worker"] = max(peaks["largest_worker"], rss)
                else:
                    continue
                total += rss
            peaks["all"] = max(peaks["all"], total)
            if done.wait(MEMORY_SAMPLE_S):
                return

    sampler = threading.Thread(target=sample, name=f"memory of {stage}", daemon=True)
    logger.info("stage %s: started", stage)
    started = time.perf_counter()
    sampler.start()
    try:
        yield
    finally:
        done.set()
        sampler.join()
        timings[stage] = {"seconds": round(time.perf_counter() - started, 1),
                          "peak_mb": {key: round(value) for key, value in peaks.items()}}
        logger.info("stage %s: %.0f s; peak memory %s MB in the driver, %s MB in the largest Ray worker, "
                    "%s MB in all", stage, timings[stage]["seconds"], *(f"{round(v):,}" for v in peaks.values()))


# The study's ladder of CNNs from scratch, with its hyperparameters (the registry's defaults),
# trained on the cnn3v2 stage's data and settings without its subset; on by default in these
# profiles (`--ladder/--no-ladder`).
LADDER = ("cnn1", "cnn3", "cnn3v2")
LADDER_BY_DEFAULT = {"quick": False, "cpu": True, "full": True}


def run_pipeline(profile: str, output: str, data: dict | None = None, train: dict | None = None,
                 search: dict | None = None, stages: dict | None = None, resume: bool = False,
                 feature_actors: int = 1, gpus_per_actor: float = 0, ladder: bool | None = None,
                 compare_backbones: tuple[str, ...] | None = None) -> dict:
    """Run the whole study; returns where each artefact went and the comparison table (also in
    pipeline.json, with each stage's resolved configuration)."""
    from dogbreeds.export import export_bundle
    from dogbreeds.train import versions

    overrides = {"data": data or {}, "train": train or {}, "search": search or {}, "stages": stages or {}}
    stages = resolve_stages(profile, data, train, search, stages, compare_backbones)
    compared = [stage for stage in stages if stage not in STAGES]
    ladder = LADDER_BY_DEFAULT[profile] if ladder is None else ladder
    output = os.path.abspath(output)
    os.makedirs(output, exist_ok=True)
    settings = {
        "profile": profile,
        "overrides": overrides,
        "stages": {stage: {"data": to_dict(d), "train": to_dict(t), "search": to_dict(s)}
                   for stage, (d, t, s) in stages.items()},
        "ladder": list(LADDER) if ladder else [],
        "feature_actors": feature_actors,
        "gpus_per_actor": gpus_per_actor,
        "versions": versions(),
    }
    runs.write_json(os.path.join(output, runs.PIPELINE), {"settings": settings})  # before anything runs

    features_dir, timings, results = os.path.join(output, runs.FEATURES), {}, {}
    with measure_stage("cnn3v2", timings):
        results["cnn3v2"] = search_cnn3v2(*stages["cnn3v2"], os.path.join(output, "cnn3v2"), resume=resume)
    with measure_stage("head", timings):
        results["head"] = search_head(*stages["head"], os.path.join(output, "head"), features_dir=features_dir,
                                      actors=feature_actors, gpus_per_actor=gpus_per_actor, resume=resume)
    with measure_stage("fine_tune", timings):
        results["fine_tune"] = search_fine_tune(*stages["fine_tune"], os.path.join(output, "fine_tune"),
                                                head_search=os.path.join(output, "head"), resume=resume)
    chosen = max(results, key=lambda stage: results[stage]["final"]["validation"])
    for stage in compared:
        with measure_stage(stage, timings):
            results[stage] = search_head(*stages[stage], os.path.join(output, stage), features_dir=features_dir,
                                         actors=feature_actors, gpus_per_actor=gpus_per_actor, resume=resume)
    ladder_dirs = {}
    if ladder:
        with measure_stage("ladder", timings):
            ladder_dirs = train_ladder(*stages["cnn3v2"][:2], output, resume)
    bundle_dir = os.path.join(output, runs.BUNDLE)
    with measure_stage("export", timings):
        bundle = export_bundle(os.path.join(output, chosen, runs.FINAL), bundle_dir)
    summary = {
        "profile": profile,
        "chosen": chosen,
        "final": {stage: result["final"] for stage, result in results.items()},
        "table": comparison(output, ladder_dirs, chosen, ["cnn3v2", "head", *compared, "fine_tune"]),
        "bundle": {"path": bundle_dir, "name": bundle["name"], "version": bundle["version"]},
        "stages_run": timings,
        "artefacts": {
            **{f"{stage} search": os.path.join(output, stage, runs.RESULTS) for stage in results},
            "best configurations": [os.path.join(output, stage, runs.BEST) for stage in results],
            **({"ladder": os.path.join(output, runs.LADDER)} if ladder else {}),
            "bundle": bundle_dir,
            "report": os.path.join(output, runs.REPORT),
            "tensorboard": f"tensorboard --logdir {output}",
        },
        "settings": settings,
    }
    runs.write_json(os.path.join(output, runs.PIPELINE), summary)
    return summary


def train_ladder(data_config: DataConfig, train_config: TrainConfig, output: str, resume: bool) -> dict[str, str]:
    """The study's CNNs (`LADDER`) from scratch with its hyperparameters, each a Ray Train run
    (OUTPUT/ladder/<model>/) on all the training data, tested once; {model: run directory}.
    `resume` continues unfinished runs and keeps finished ones."""
    from dogbreeds.train import run_training

    data_config = dataclasses.replace(data_config, subset_per_class=None, subset_fraction=None)
    run_dirs = {name: os.path.join(output, runs.LADDER, name) for name in LADDER}
    for name, run_dir in run_dirs.items():
        if not (resume and os.path.isfile(os.path.join(run_dir, runs.METRICS))):
            run_training(data_config, dataclasses.replace(train_config, model=name, hparams={}), run_dir,
                         resume=resume)
    return run_dirs


# What each row of the comparison table is, by where its final model lives.
HOW = {
    "ladder": "from scratch, the study's hyperparameters",
    "cnn3v2": "cnn3v2, tuned (the search's best, retrained)",
    "head": "frozen backbone, searched head",
    "fine_tune": "fine-tuned: the best head and the top of its backbone",
}


def comparison(output: str, ladder_dirs: dict[str, str], chosen: str, searches=STAGES) -> list[dict]:
    """The study's table: a row per final model (the ladder's, then each of `searches`: the
    tuned cnn3v2, the frozen heads, the fine-tuned model) with its parameters, epochs, training
    time and speed, and its test top-1, top-5 and macro precision and recall. Training time is
    the final model's own (a head's: its trial on cached features, which cost `features`
    seconds once)."""
    import tf_keras as keras

    finals = {f"{name} (ladder)": (run_dir, "ladder") for name, run_dir in ladder_dirs.items()}
    for stage in searches:  # a compared backbone's head search is head_<backbone>: row "head (<backbone>)"
        kind = stage_kind(stage)
        name = f"head ({stage.removeprefix('head_')})" if kind != stage else stage
        finals[name] = (os.path.join(output, stage, runs.FINAL), kind)
    rows = []
    for name, (run_dir, kind) in finals.items():
        metrics = runs.read_json(os.path.join(run_dir, runs.METRICS))
        model = keras.models.load_model(os.path.join(run_dir, runs.MODEL), compile=False)
        epochs, seconds = metrics.get("epochs_run"), metrics.get("train_seconds")
        examples = metrics.get("num_train_images")
        rows.append({
            "name": name, "model": metrics["model"], "how": HOW[kind], "exported": name == chosen,
            "total_params": model.count_params(),
            "trainable_params": int(sum(keras.backend.count_params(w) for w in model.trainable_weights)),
            "epochs": epochs, "train_seconds": seconds,
            "images_per_s": round(examples * epochs / seconds, 1) if examples and epochs and seconds else None,
            "validation_top1": metrics["validation"]["top1"],
            **{f"test_{key}": metrics["test"][key] for key in ("top1", "top5", "precision", "recall")},
            "run": run_dir,
        })
    return rows

