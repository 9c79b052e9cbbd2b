"""Shared fixtures: the real stand-in data in ../shared and a local Ray per test module."""

import json
import pathlib
import socket

import pytest

import dogbreeds  # noqa: F401 - sets TF_USE_LEGACY_KERAS before TensorFlow loads

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SAMPLE_DIR = SHARED / "data" / "stanford_dogs_sample"
TINY_DIR = SHARED / "data" / "tiny_dogs_64"
NOT_DOGS_DIR = SHARED / "data" / "not_dogs"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
ARTIFACTS = ROOT / "test-artifacts"  # screenshots and reports kept after a run


def free_port() -> int:
    """A port nothing listens on now (other Ray clusters and servers run on this machine too)."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One image cache for the whole session, as a user's ~/.cache would be."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray for each test module (whatever a module leaves reserved dies with it).
    Four logical CPUs on two cores: a run of two workers plus its driver must fit, and
    TensorFlow's thread counts are set per worker."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def tiny_run_dir(path: pathlib.Path, model=None) -> str:
    """A finished run as training leaves it (model.keras, metrics.json, config.json), of a
    16-pixel, two-class tf_keras model: a real bundle in a second, for checks that need no
    trained weights."""
    import tf_keras as keras

    if model is None:
        inputs = keras.Input((16, 16, 3), name="image")
        x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
        model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="predictions")(x))
    path.mkdir(parents=True, exist_ok=True)
    model.save(path / "model.keras")
    metrics = {"model": "cnn1", "image_size": 16, "class_names": ["a", "b"], "test": {"top1": 0.5}}
    (path / "metrics.json").write_text(json.dumps(metrics))
    (path / "config.json").write_text(json.dumps({"train": {"model": "cnn1"}}))
    return str(path)


@pytest.fixture
def tiny_bundle_dir(tmp_path) -> pathlib.Path:
    """`tiny_run_dir` exported as a bundle."""
    from dogbreeds.export import export_bundle

    export_bundle(tiny_run_dir(tmp_path / "run"), str(tmp_path / "bundle"))
    return tmp_path / "bundle"


@pytest.fixture(scope="session")
def mobilenet_run_dir(tmp_path_factory, cache_dir) -> str:
    """mobilenet_025 on the real backbone, one epoch at 128 px on tiny_dogs_64: one training
    run for the session, which each module that serves it exports as it needs. On the Ray of
    the module that asks first, or a local Ray of its own."""
    import ray

    from dogbreeds import cli

    run_dir = str(tmp_path_factory.mktemp("mobilenet") / "mobilenet")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        assert cli.main([
            "train", "mobilenet_025", "--data-dir", str(TINY_DIR), "--image-size", "128", "--epochs", "1",
            "--workers", "1", "--weights", str(MOBILENET_WEIGHTS), "--output", run_dir, "--cache-dir", cache_dir,
        ]) == 0
    finally:
        if started:
            ray.shutdown()
    return run_dir


@pytest.fixture(scope="session")
def mobilenet_bundle_dir(mobilenet_run_dir, tmp_path_factory) -> str:
    """`mobilenet_run_dir` exported as a bundle (read-only for the tests that share it)."""
    from dogbreeds import cli

    bundle = tmp_path_factory.mktemp("mobilenet_bundle") / "bundle"
    assert cli.main(["export", mobilenet_run_dir, "--output", str(bundle)]) == 0
    return str(bundle)
